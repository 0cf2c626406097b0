"""The generate job and CLI on the tiny model: prompts files, compositional generation with a style
concept trained without faces, localized generation, and regeneration from an image's metadata."""

import numpy as np
import pytest
from _concepts import random_concept
from PIL import Image

from cli_helpers import assert_one_line_error, run_cli
from personamagic.cli import main
from personamagic.concept import Concept
from personamagic.jobs.generate import read_prompts_file
from personamagic.jobs.generate_config import GenerateConfig
from personamagic.jobs.image_record import read_image_metadata
from personamagic.pipeline.localized import localized_size

FAST = ["--steps", "2", "--num-images", "1"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    """A face concept (random mapper, saved) and a style concept trained through the CLI on two
    face-less "paintings" with --supercategory painting."""
    from personamagic.models import build_tiny_components

    root = tmp_path_factory.mktemp("concepts")
    random_concept(build_tiny_components(), window=(0, 1000)).save(root / "me")
    rng = np.random.default_rng(0)
    paintings = []
    for i in range(2):
        stripes = np.repeat(rng.integers(0, 256, (8, 1, 3)), 160 // 8, axis=0).repeat(160, axis=1)
        paintings.append(root / f"painting{i}.png")
        Image.fromarray(stripes.astype(np.uint8)).save(paintings[-1])
    code = main(["train", *map(str, paintings), "--supercategory", "painting", "--placeholder", "<style>",
                 "--mask", "none", "--model", "tiny", "--steps", "2", "--stage-window", "200:700",
                 "--checkpoint-every", "0", "--output", str(root / "style")])
    assert code == 0
    return root / "me", root / "style"


def test_style_concept_trains_without_faces_or_identity_loss(concepts):
    style = Concept.load(concepts[1])
    assert style.supercategory == "painting" and style.placeholder == "<style>"
    assert style.training["use_id_loss"] is False and style.extra["num_faces"] == [0, 0]
    assert style.image_embeds.shape[0] == 2  # few-shot: one CLIP embedding per painting


@pytest.fixture(scope="module")
def composed(concepts, tmp_path_factory):
    """Two concepts in one prompt, prompts from a file, two images in one batch."""
    folder = tmp_path_factory.mktemp("composed")
    prompts = folder / "prompts.txt"
    prompts.write_text("# compositions\n\na photo of <me> in the style of <style>\n  \n<me> smiling, <style>\n",
                       encoding="utf-8")
    code = main(["generate", *map(str, concepts), "--placeholder", "<me>", "--placeholder", "<style>",
                 "--prompts-file", str(prompts), *FAST, "--batch-size", "2", "--output", str(folder / "out")])
    assert code == 0
    return folder / "out"


def test_compositional_generation_from_a_prompts_file(composed, concepts):
    names = sorted(p.name for p in composed.iterdir())
    assert names == ["000-a-photo-of-me-in-the-style-of-style-seed0.png", "001-me-smiling-style-seed0.png", "grid.png"]
    meta = read_image_metadata(composed / names[1])
    assert [c["placeholder"] for c in meta["concepts"]] == ["<me>", "<style>"]
    assert [c["path"] for c in meta["concepts"]] == [str(p) for p in concepts]
    assert [c["fingerprint"] for c in meta["concepts"]] == [Concept.load(p).fingerprint() for p in concepts]
    assert meta["batch"] == {"jobs": [["a photo of <me> in the style of <style>", 0], ["<me> smiling, <style>", 0]],
                             "index": 1}
    assert (meta["device"], meta["dtype"], meta["scheduler"], meta["steps"]) == ("cpu", "fp32", "ddim", 2)


def test_from_image_reproduces_the_image(composed, tmp_path, capsys):
    original = composed / "001-me-smiling-style-seed0.png"
    code, out, err = run_cli(capsys, "generate", "--from-image", original, "--output", tmp_path)
    assert code == 0, err
    again = tmp_path / original.name  # the image keeps its own name
    assert again.is_file() and str(again) in out
    assert np.array_equal(pixels(again), pixels(original))  # the batch it came from is sampled again
    assert read_image_metadata(again)["batch"] == read_image_metadata(original)["batch"]


def test_from_image_checks_fingerprints_and_refuses_settings(composed, concepts, capsys, tmp_path):
    image = composed / "001-me-smiling-style-seed0.png"
    code, _, err = run_cli(capsys, "generate", "--from-image", image, *reversed(concepts), "-o", tmp_path)
    assert code == 2 and "fingerprint" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "generate", "--from-image", image, "--steps", 3, "-o", tmp_path)
    assert code == 2 and "drop --steps" in err
    assert run_cli(capsys, "generate", "--from-image", concepts[0] / "concept.safetensors", "-o", tmp_path)[0] == 2


def test_localized_generation_keeps_the_background_shape(concepts, tmp_path, capsys):
    background = np.random.default_rng(1).integers(0, 256, (200, 250, 3), dtype=np.uint8)
    region = np.zeros((200, 250), np.uint8)
    region[50:150, 80:180] = 255
    Image.fromarray(background).save(tmp_path / "bg.png")
    Image.fromarray(region).save(tmp_path / "region.png")
    code, _, err = run_cli(capsys, "generate", concepts[0], "-p", "a photo of S*", *FAST, "--background",
                           tmp_path / "bg.png", "--region", tmp_path / "region.png", "-o", tmp_path / "out")
    assert code == 0, err
    (made,) = (tmp_path / "out").glob("000-*.png")
    meta = read_image_metadata(made)
    assert (meta["width"], meta["height"]) == localized_size((250, 200), 128, 8) == (160, 128)
    assert meta["background"]["path"] == str(tmp_path / "bg.png") and len(meta["region"]["sha256"]) == 16
    code, _, err = run_cli(capsys, "generate", "--from-image", made, "-o", tmp_path / "again")
    assert code == 0, err
    assert np.array_equal(pixels(next((tmp_path / "again").glob("*.png"))), pixels(made))
    Image.fromarray(region[:100]).save(tmp_path / "region.png")  # changed since: the record no longer matches
    code, _, err = run_cli(capsys, "generate", "--from-image", made, "-o", tmp_path / "again")
    assert code == 2 and "changed" in err


def test_compiled_generation_gives_the_same_images(concepts, tmp_path, capsys):
    import torch._dynamo

    for name, argv in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        code, _, err = run_cli(capsys, "generate", concepts[0], "-p", "a photo of S*", *FAST, *argv,
                               "-o", tmp_path / name)
        assert code == 0, err
    torch._dynamo.reset()
    eager, compiled = (pixels(next((tmp_path / n).glob("000-*.png"))).astype(int) for n in ("eager", "compiled"))
    assert np.abs(eager - compiled).max() <= 1  # channels-last convolutions may round differently


@pytest.mark.parametrize("argv, message", [
    (["--background", "bg.png"], "both a background and a region"),
    (["--prompts-file", "missing.txt"], "cannot read the prompts file"),
    (["--placeholder", "<a>", "--placeholder", "<b>"], "2 --placeholder for 1 concepts"),
    (["--scheduler", "fast"], "unknown scheduler 'fast'"),
    (["--ip-adapter-image", "x.png"], "without an IP-Adapter"),
    (["--compile", "fastest"], "unknown torch.compile backend 'fastest'"),
])
def test_generate_mistakes_are_one_line_errors(concepts, tmp_path, capsys, argv, message):
    code, _, err = run_cli(capsys, "generate", concepts[0], "-p", "S*", *FAST, *argv, "-o", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1


def test_prompts_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\nfirst S*\n   # indented comment\n second S* \n", encoding="utf-8")
    assert read_prompts_file(path) == ["first S*", "second S*"]
    with pytest.raises(ValueError, match="multiple of 8"):
        GenerateConfig(prompts=["S*"], width=100)


def test_an_image_made_again_keeps_its_own_name_and_never_replaces_itself(concepts, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", concepts[0], "-p", "a photo of S*", "--steps", "2", "--num-images", "2",
                           "-o", tmp_path / "out")
    assert code == 0, err
    second = sorted((tmp_path / "out").glob("001-*.png"))[0]
    code, _, err = run_cli(capsys, "generate", "--from-image", second, "-o", tmp_path / "again")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "again").glob("*.png")] == [second.name]  # was 000-…
    assert np.array_equal(pixels(tmp_path / "again" / second.name), pixels(second))
    before = second.read_bytes()
    code, _, err = run_cli(capsys, "generate", "--from-image", second, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "holds", second.name, "another folder")
    assert second.read_bytes() == before

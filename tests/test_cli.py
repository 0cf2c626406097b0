"""The command line end to end on the tiny model, and every user mistake as one clear error line."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from cli_helpers import run_cli
from personamagic.cli import main
from personamagic.concept import Concept

TRAIN_FAST = ["--model", "tiny", "--steps", "3", "--checkpoint-every", "0", "--stage-window", "400:800"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One concept trained through the CLI with default settings but few steps (shared by tests)."""
    folder = tmp_path_factory.mktemp("concept") / "astronaut"
    photo = os.path.join(os.path.dirname(__file__), "data", "astronaut.png")
    assert main(["train", photo, "--output", str(folder), "--model", "tiny", "--steps", "3",
                 "--partition-warmup-steps", "2"]) == 0
    return folder


def test_train_writes_concept_and_pictures(trained, tiny_base):
    assert sorted(p.name for p in trained.iterdir()) == ["attention.png", "concept.safetensors", "mask.png",
                                                          "stages.png"]
    concept = Concept.load(trained)
    assert concept.base_model == "tiny" and concept.placeholder == "S*" and concept.supercategory == "face"
    stages = concept.stages
    assert stages["method"] == "auto" and tuple(stages["window"]) == concept.stage_window
    assert len(stages["iou"]) == len(stages["timesteps"]) == 50
    assert 0 <= concept.stage_window[0] < concept.stage_window[1] <= 1000
    assert concept.text_encoder_hidden_size == tiny_base.hidden_size
    assert concept.training["steps_done"] == 3 and concept.training["use_id_loss"] is True
    assert concept.image_embeds.shape == (1, 16)
    with Image.open(trained / "mask.png") as preview:
        assert preview.size == (tiny_base.resolution, tiny_base.resolution)


def test_generate_writes_named_images_with_metadata_and_grid(trained, tmp_path, capsys):
    prompt = "a photo of S* as an astronaut/../../etc"
    code, out, err = run_cli(capsys, "generate", trained, "--prompt", prompt, "--num-images", 2, "--steps", 3,
                             "--seed", 7, "--output", tmp_path / "out")
    assert code == 0, err
    assert "noise-like" in out
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["000-a-photo-of-s-as-an-astronaut-etc-seed7.png", "001-a-photo-of-s-as-an-astronaut-etc-seed8.png",
                     "grid.png"]
    with Image.open(tmp_path / "out" / names[1]) as image:
        meta = json.loads(image.text["personamagic"])
        assert "Seed: 8" in image.text["parameters"]
    assert meta["prompt"] == prompt and meta["seed"] == 8 and meta["steps"] == 3
    assert meta["concepts"][0]["fingerprint"] == Concept.load(trained).fingerprint()


def test_same_seed_same_images(trained, tmp_path, capsys):
    for name in ("a", "b"):
        assert run_cli(capsys, "generate", trained, "-p", "S*", "-n", 1, "--steps", 3, "-o", tmp_path / name)[0] == 0
    a = (tmp_path / "a" / "000-s-seed0.png").read_bytes()
    assert a == (tmp_path / "b" / "000-s-seed0.png").read_bytes()


def test_same_seed_same_concept(astronaut, tmp_path, capsys):
    for name in ("a", "b"):
        assert run_cli(capsys, "train", astronaut, "-o", tmp_path / name, *TRAIN_FAST)[0] == 0
    a, b = Concept.load(tmp_path / "a"), Concept.load(tmp_path / "b")
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize("flag, expected", [
    ("--no-optimize", {"optimize": False, "gradient_checkpointing": False}),
    ("--low-memory", {"optimize": True, "gradient_checkpointing": True, "gradient_accumulation_steps": 2}),
    ("--compile=aot_eager", {"optimize": True, "compile": True, "compile_backend": "aot_eager"}),
])
def test_speed_and_memory_flags_reach_the_trainer(flag, expected, astronaut, tmp_path, capsys):
    assert run_cli(capsys, "train", astronaut, "-o", tmp_path / "c", *TRAIN_FAST, flag)[0] == 0
    training = Concept.load(tmp_path / "c").training
    assert {k: training[k] for k in expected} == expected


def test_inspect_prints_stages_and_training(trained, capsys):
    code, out, _ = run_cli(capsys, "inspect", trained)
    concept = Concept.load(trained)
    t_lo, t_hi = concept.stage_window
    assert code == 0 and f"dynamic {t_lo} <= t < {t_hi}" in out
    assert "partition: automatic, lambda1=0.7 lambda2=0.8" in out and "training: 3 steps" in out
    assert concept.fingerprint() in out and len(out.strip().splitlines()) <= 8
    assert ", format 2, " in out and "(sd1, text width" in out



def test_missing_placeholder_warns(trained, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "generate", trained, "-p", "a photo of a dog", "-n", 1, "--steps", 2,
                           "-o", tmp_path)
    assert code == 0 and "does not contain S*" in out


def test_resume_continues_an_interrupted_run(astronaut, tmp_path, capsys):
    folder = tmp_path / "c"
    args = ["train", astronaut, "-o", folder, "--model", "tiny", "--checkpoint-every", 2, "--partition-warmup-steps", 2]
    code, _, err = run_cli(capsys, *args, "--steps", 3)
    assert code == 0 and "stage partition: dynamic stage" in err  # the partition shows in the progress output
    assert not (folder / "checkpoints").exists()  # a finished run removes its resume points
    from personamagic.training import Trainer

    original_train = Trainer.train

    def interrupted(self, num_steps=None, progress=None, checkpoint_dir=None, job=None):
        original_train(self, num_steps=3, progress=progress, checkpoint_dir=checkpoint_dir, job=job)
        raise KeyboardInterrupt

    monkey = pytest.MonkeyPatch()
    monkey.setattr(Trainer, "train", interrupted)
    try:
        code, _, err = run_cli(capsys, *args, "--steps", 4, "--overwrite")
    finally:
        monkey.undo()
    assert code == 130 and "interrupted" in err
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-000002.safetensors"]
    code, out, err = run_cli(capsys, *args, "--steps", 4, "--resume")
    assert code == 0, err
    assert "resumed from step-000002" in out
    resumed = Concept.load(folder)
    assert resumed.training["steps_done"] == 4
    straight = tmp_path / "straight"
    assert run_cli(capsys, "train", astronaut, "-o", straight, "--model", "tiny", "--steps", 4,
                   "--partition-warmup-steps", 2)[0] == 0
    assert resumed.fingerprint() == Concept.load(straight).fingerprint()
    assert resumed.stages == Concept.load(straight).stages


# -- user mistakes: one line, exit code != 0, no traceback, nothing written ---------------------------


def png_claiming(width, height) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(16))


def make_photo(kind, tmp_path, astronaut):
    path = tmp_path / f"{kind}.png"
    if kind == "text":
        path.write_text("hello")
    elif kind == "truncated":
        data = astronaut.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "one_pixel":
        Image.new("RGB", (1, 1)).save(path)
    elif kind == "bomb":
        path.write_bytes(png_claiming(30_000, 30_000))
    elif kind == "no_face":
        Image.new("RGB", (256, 256), (120, 160, 200)).save(path)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("text", "not an image"),
        ("truncated", "truncated"),
        ("one_pixel", "64"),
        ("bomb", "too large"),
        ("no_face", "no face found"),
    ],
)
def test_bad_photo(kind, message, tmp_path, astronaut, capsys):
    photo = make_photo(kind, tmp_path, astronaut)
    code, out, err = run_cli(capsys, "train", photo, "-o", tmp_path / "out", *TRAIN_FAST)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "many"], "whole number"),
        (["--learning-rate", "-1"], "--learning-rate"),
        (["--learning-rate", "nan"], "finite"),
        (["--stage-window", "800:400"], "LO < HI"),
        (["--stage-window", "abc"], "LO:HI"),
        (["--supercategory", "spaceship-pilot"], "supercategory"),
        (["--dtype", "fp64"], "--dtype"),
        (["--device", "tpu"], "device"),
        (["--model", "no-such-model"], "unknown model"),
        # offline (as the tests are), a hub id that is not cached is named with the other downloads
        (["--model", "SomeOrg/Not-A-Model", "--mask", "landmarks", "--image-encoder", "tiny"],
         "SomeOrg/Not-A-Model (or --model tiny"),
        (["--mask", "nowhere.png"], "--mask"),
        (["--seed", str(2**63)], "--seed"),  # signed 64-bit, as generate's seeds
        (["--crop", "eyes"], "--crop"),
    ],
)
def test_bad_flags(flags, message, tmp_path, astronaut, capsys):
    code, out, err = run_cli(capsys, "train", astronaut, "-o", tmp_path / "out", *TRAIN_FAST, *flags)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_largest_accepted_seed_trains_with_every_derived_seed_in_range(astronaut, tmp_path, capsys, monkeypatch):
    # seeds derived from --seed (the partition's capture noise) must stay in [0, 2**63) like --seed itself:
    # seed + 1 left it for the largest seed train accepts
    import torch

    seeds = []

    class RecordingGenerator(torch.Generator):
        def manual_seed(self, seed):
            seeds.append(seed)
            return super().manual_seed(seed)

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    code, _, err = run_cli(capsys, "train", astronaut, "-o", tmp_path / "out", "--model", "tiny", "--steps", 2,
                           "--partition-warmup-steps", 1, "--checkpoint-every", 0, "--seed", 2**63 - 1)
    assert code == 0, err
    assert Concept.load(tmp_path / "out").stages["method"] == "auto"
    assert 2**63 - 1 in seeds and all(0 <= seed < 2**63 for seed in seeds), seeds


def test_existing_concept_needs_overwrite_or_resume(trained, astronaut, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(trained, folder)
    before = (folder / "concept.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "train", astronaut, "-o", folder, *TRAIN_FAST)
    assert_one_line_error(code, err, "--overwrite")
    code, _, err = run_cli(capsys, "train", astronaut, "-o", folder, *TRAIN_FAST, "--resume")
    assert_one_line_error(code, err, "nothing to resume")
    assert (folder / "concept.safetensors").read_bytes() == before
    assert run_cli(capsys, "train", astronaut, "-o", folder, *TRAIN_FAST, "--overwrite", "--seed", "5")[0] == 0
    assert (folder / "concept.safetensors").read_bytes() != before


def test_generate_mistakes(trained, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", tmp_path / "nope", "-p", "S*", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "no concept")
    code, _, err = run_cli(capsys, "generate", trained, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "prompt")
    code, _, err = run_cli(capsys, "generate", trained, "-p", "S*", "--scheduler", "magic", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "unknown scheduler")
    code, _, err = run_cli(capsys, "generate", trained, "trained-twice", "-p", "S*", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "no concept")
    assert not (tmp_path / "out").exists()


def test_concept_on_a_base_model_of_another_shape(tmp_path, capsys):
    from _concepts import random_concept

    from personamagic.models import TinyConfig, build_tiny_components

    # a whole, sound concept of an SD-1.x model 48 wide, on `tiny` (32 wide)
    random_concept(build_tiny_components(TinyConfig(hidden_size=48))).save(tmp_path / "wide")
    code, _, err = run_cli(capsys, "generate", tmp_path / "wide", "--model", "tiny", "-p", "S*", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "text width 48")
    assert "text width is 32" in err


def test_console_script_help_is_fast_and_errors_have_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    help_run = subprocess.run([sys.executable, "-m", "personamagic.cli", "--help"], capture_output=True, text=True,
                              env=env, timeout=60)
    assert help_run.returncode == 0 and "train" in help_run.stdout
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, personamagic.cli; print(' '.join(sys.modules))"],
        capture_output=True, text=True, env=env, timeout=60).stdout.split()
    parser_modules = subprocess.run(  # building every sub-command's parser (evaluate's lists its studies) too
        [sys.executable, "-c", "import sys; from personamagic.cli.main import build_parser; build_parser(); "
         "print(' '.join(sys.modules))"], capture_output=True, text=True, env=env, timeout=60).stdout.split()
    assert "torch" not in parser_modules and "numpy" not in parser_modules
    bad = subprocess.run([sys.executable, "-m", "personamagic.cli", "train", str(tmp_path / "none.jpg"), "-o",
                          str(tmp_path / "o"), "--model", "tiny"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def assert_one_line_error(code, err, message):
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err
    assert "Traceback" not in err

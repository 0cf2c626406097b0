"""The shipped world model through the normal paths: loading by name, `train` with the world's
defaults (no detection, the render's own mask, the world identity encoder), `generate`, and
`evaluate images --metrics world` — the newcomer's three commands."""

import json

from PIL import Image

from cli_helpers import assert_one_line_error, run_cli
from personamagic.world.attributes import held_out_identities


def test_the_world_model_loads_by_name_as_an_sd1_model():
    from personamagic.models import load_base_model

    base = load_base_model("world")
    assert base.name == "world" and base.family.name == "sd1"
    assert base.resolution == 64 and base.vae_scale_factor == 4
    assert base.scheduler_config["_class_name"] == "DDIMScheduler"


def test_train_generate_and_evaluate_in_the_world(tmp_path, capsys):
    person = held_out_identities(1, start=2)[0]
    photo = tmp_path / "person.png"
    assert run_cli(capsys, "world", "render", person, "-o", photo)[0] == 0
    code, out, err = run_cli(capsys, "train", photo, "--model", "world", "--steps", "3", "--stage-window", "400:800",
                             "--checkpoint-every", "0", "-o", tmp_path / "concept")
    assert code == 0, err
    code, out, err = run_cli(capsys, "generate", tmp_path / "concept", "-p", "a photo of S* in the snow",
                             "--num-images", "2", "--steps", "3", "-o", tmp_path / "out")
    assert code == 0, err
    images = sorted(p for p in (tmp_path / "out").glob("0*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (64, 64)
    code, out, err = run_cli(capsys, "evaluate", "images", tmp_path / "out", "-r", photo, "--metrics", "world")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "scores.json").read_text())["summary"]
    assert summary["images"] == 2 and summary["face_model"] == "world-judge"


def test_a_photo_that_is_not_a_world_render_needs_its_mask(tmp_path, capsys):
    photo = tmp_path / "plain.png"
    Image.new("RGB", (64, 64), (120, 90, 80)).save(photo)
    code, _, err = run_cli(capsys, "train", photo, "--model", "world", "--steps", "2", "--stage-window", "400:800",
                           "-o", tmp_path / "c")
    assert_one_line_error(code, err, "not a world render", "--mask FILE", train=True)
    assert not (tmp_path / "c").exists()


def test_inspect_export_and_train_many_take_the_world_model(tmp_path, capsys):
    people = tmp_path / "people"
    for identity in held_out_identities(2, start=4):
        assert run_cli(capsys, "world", "render", identity, "-o", people / f"p{identity}.png")[0] == 0
    code, out, err = run_cli(capsys, "train-many", people, "-o", tmp_path / "concepts", "--model", "world",
                             "--steps", "2", "--stage-window", "400:800", "--checkpoint-every", "0")
    assert code == 0, err
    concepts = sorted(p.name for p in (tmp_path / "concepts").iterdir())
    assert len(concepts) == 2 and not any("mask" in name for name in concepts)  # the masks are not people
    concept = tmp_path / "concepts" / concepts[0]
    code, out, err = run_cli(capsys, "inspect", concept)
    assert code == 0 and "world" in out, err
    code, out, err = run_cli(capsys, "export", concept, "-o", tmp_path / "ti.safetensors")
    assert code == 0, err
    from safetensors.torch import load_file

    (vectors,) = load_file(tmp_path / "ti.safetensors").values()
    assert vectors.shape[-1] == 64  # the world text encoder's width


def test_the_web_ui_previews_trains_and_generates_on_the_world_model(tmp_path, capsys):
    from personamagic.jobs.generate_config import GenerateConfig
    from personamagic.training import TrainConfig
    from personamagic.ui.app import DEFAULT_MODELS
    from personamagic.ui.jobs import DONE
    from personamagic.ui.studio import Library, Studio

    assert "world" in DEFAULT_MODELS
    photo = tmp_path / "person.png"
    assert run_cli(capsys, "world", "render", held_out_identities(1, start=6)[0], "-o", photo)[0] == 0
    studio = Studio(Library(tmp_path / "library"), device="cpu", max_upload_mb=1)
    try:
        previews, errors = studio.preview([photo], "face", "auto", "world")
        assert errors == [] and "taken as it is" in previews[0][1] and "world" in previews[0][1]
        config = TrainConfig(max_train_steps=2, stage_window=(400, 800))
        job = studio.jobs.wait(studio.submit_personalize([photo], "person", config, model="world").id, 300)
        assert job.state == DONE, job.error
        settings = GenerateConfig(prompts=["a photo of S* on a beach"], num_images=1, num_inference_steps=2)
        made = studio.jobs.wait(studio.submit_generate(["person"], settings).id, 300)
        assert made.state == DONE, made.error
        assert Image.open(made.result["images"][0]).size == (64, 64)
    finally:
        studio.close()


def test_the_web_ui_proposes_the_world_recipe_for_the_world_model(tmp_path):
    from personamagic.ui.app import build_app, training_defaults
    from personamagic.ui.studio import Library, Studio

    studio = Studio(Library(tmp_path / "library"), device="cpu", max_upload_mb=1)
    try:
        fields = {}
        for default_model in ("world", "tiny"):
            app = build_app(studio, default_model=default_model)
            by_id = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
            fields[default_model] = (by_id["train-steps"].value, by_id["learning-rate"].value, by_id["prompts"].value)
    finally:
        studio.close()
    # the measured world recipe (docs/world.md: 300 steps at 5e-3), and a scene the world can draw
    assert fields["world"][:2] == (300, 5e-3) and "astronaut" not in fields["world"][2]
    assert fields["tiny"][:2] == (1000, 5e-5)  # the paper's defaults everywhere else
    assert training_defaults(" world ")[:2] == (300, 5e-3)  # what choosing it in the page sets

"""The record each generated PNG carries: written in the format images have always had, read back into
the same settings, and the images of the first version still made again."""

import json
from pathlib import Path

import numpy as np
import pytest
from _concepts import random_concept
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cli_helpers import run_cli
from personamagic import __version__
from personamagic.errors import PhotoError
from personamagic.jobs.generate_config import GenerateConfig
from personamagic.jobs.image_record import ImageRecord, image_metadata, png_info, read_image_metadata


@pytest.fixture
def concept(tiny_base):
    return random_concept(tiny_base, placeholder="<me>")


def save_png(path, record):
    Image.new("RGB", (64, 48), "gray").save(path, format="PNG", pnginfo=png_info(record))
    return path


def test_config_to_png_to_record_to_config_is_exact(concept, tmp_path):
    files = {}
    for name in ("bg.png", "region.png", "photo.png"):
        files[name] = tmp_path / name
        Image.new("L", (64, 48), 255).save(files[name])
    config = GenerateConfig(
        prompts=["a photo of <me>"], negative_prompt="blurry", num_images=1, seed=7, num_inference_steps=3,
        guidance_scale=6.5, scheduler="euler", grid=False, width=64, height=48, placeholders=["<me>"],
        background=str(files["bg.png"]), region=str(files["region.png"]), ip_adapter="owner/repo/models/ip.bin",
        ip_adapter_images=[str(files["photo.png"])], ip_adapter_scale=0.6, photomaker="TencentARC/PhotoMaker",
        photomaker_images=[str(files["photo.png"])], photomaker_merge_step=1, photomaker_lora_scale=0.5,
        vae="madebyollin/sdxl-vae-fp16-fix", model_config=str(tmp_path),
    )
    record = image_metadata("a photo of <me>", 7, config, [concept], "tiny", (64, 48), device="cpu", dtype="fp32",
                            batch=([("a photo of <me>", 7)], 0))
    read = read_image_metadata(save_png(tmp_path / "image.png", record))
    assert read == record and dict(read) == record.to_json()
    assert read.generate_config() == config
    assert read.batch_jobs() == ([("a photo of <me>", 7)], 0)


def test_the_png_text_is_written_as_before(concept, tmp_path):
    config = GenerateConfig(prompts=["<me> smiling"], negative_prompt="", seed=2, num_inference_steps=4)
    record = image_metadata("<me> smiling", 3, config, [concept], "tiny", (64, 48), concept_paths=["me"],
                            device="cpu", dtype="fp32", batch=([("<me> smiling", 2), ("<me> smiling", 3)], 1),
                            extra={"study_item": "abc"})
    with Image.open(save_png(tmp_path / "image.png", record)) as image:
        text = dict(image.text)
    assert text["parameters"] == ("<me> smiling\nNegative prompt: \nSteps: 4, Sampler: ddim, CFG scale: 8.0, "
                                  "Seed: 3, Size: 64x48, Model: tiny")
    entry = {"placeholder": "<me>", "supercategory": "face", "fingerprint": concept.fingerprint(),
             "stage_window": [400, 800], "path": "me", "abs_path": str(Path("me").resolve())}
    assert text["personamagic"] == json.dumps({
        "prompt": "<me> smiling", "negative_prompt": "", "seed": 3, "scheduler": "ddim", "steps": 4,
        "guidance_scale": 8.0, "width": 64, "height": 48, "base_model": "tiny", "concepts": [entry],
        "personamagic_version": __version__, "device": "cpu", "dtype": "fp32",
        "batch": {"jobs": [["<me> smiling", 2], ["<me> smiling", 3]], "index": 1}, "study_item": "abc",
    })


def test_a_record_is_read_only_and_keeps_the_keys_it_does_not_read(concept, tmp_path):
    config = GenerateConfig(prompts=["<me>"], num_images=1)
    record = image_metadata("<me>", 0, config, [concept], "tiny", (64, 48), extra={"study_item": "abc"})
    with pytest.raises(TypeError):
        record.concepts[0]["placeholder"] = "<you>"
    mapping = record["concepts"]
    mapping[0]["placeholder"] = "<you>"  # a copy: the record is unchanged
    assert record["concepts"][0]["placeholder"] == "<me>" and record["study_item"] == "abc"
    assert read_image_metadata(save_png(tmp_path / "image.png", record))["study_item"] == "abc"


@pytest.mark.parametrize("data, fault", [
    ([], "a JSON list, not an object"),
    ({"prompt": "x"}, "no 'seed'"),
])
def test_json_that_is_no_record_is_refused(data, fault):
    with pytest.raises(ValueError, match=fault):
        ImageRecord.from_json(data)


def test_a_png_without_a_record_is_one_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(PhotoError, match="has no personamagic metadata"):
        read_image_metadata(tmp_path / "plain.png")


def test_an_image_of_the_first_version_is_made_again(tiny_base, tmp_path, capsys):
    """The first version wrote no batch, device, dtype, supercategory or concept path: its image is made
    again from its own record, the concept given after --from-image."""
    random_concept(tiny_base).save(tmp_path / "me")
    code, _, err = run_cli(capsys, "generate", tmp_path / "me", "-p", "a photo of S*", "--steps", 2, "-n", 1,
                           "--seed", 5, "-o", tmp_path / "new")
    assert code == 0, err
    (made,) = (tmp_path / "new").glob("000-*.png")
    with Image.open(made) as image:
        meta = json.loads(image.text["personamagic"])
        first = {key: meta[key] for key in ("prompt", "negative_prompt", "seed", "scheduler", "steps",
                                            "guidance_scale", "width", "height", "base_model")}
        first["concepts"] = [{key: meta["concepts"][0][key] for key in ("placeholder", "fingerprint", "stage_window")}]
        first["personamagic_version"] = "0.1.0"
        info = PngInfo()
        info.add_text("parameters", image.text["parameters"])
        info.add_text("personamagic", json.dumps(first))
        image.save(tmp_path / "old.png", pnginfo=info)
    record = read_image_metadata(tmp_path / "old.png")
    assert record.batch is None and record.device is None and record.batch_jobs() == ([("a photo of S*", 5)], 0)
    code, _, err = run_cli(capsys, "generate", "--from-image", tmp_path / "old.png", tmp_path / "me",
                           "-o", tmp_path / "again")
    assert code == 0, err
    with Image.open(tmp_path / "again" / "old.png") as again, Image.open(made) as original:
        assert np.array_equal(np.asarray(again), np.asarray(original))

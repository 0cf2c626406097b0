"""`world train-base` at a toy size: the three stages run, checkpoint and resume, and the result is a
diffusers folder that `--model FOLDER` trains on like any user's model."""

import json

import pytest
import torch

from cli_helpers import run_cli
from personamagic.world.base_model import WorldModelConfig
from personamagic.world.train_base import BaseTrainingConfig, run

SMALL = WorldModelConfig(vae_channels=(16, 16, 16), unet_channels=(32, 32, 32), head_dim=32, text_width=32,
                         text_layers=1, text_heads=2)


def _config(**changes) -> BaseTrainingConfig:
    settings = dict(images=24, vae_steps=3, vae_batch=4, unet_steps=4, unet_batch=4, warmup_steps=2,
                    checkpoint_every=2, grid_seeds=1, model=SMALL)
    settings.update(changes)
    return BaseTrainingConfig(**settings)


def _unet_steps(work) -> list[int]:
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["stage"] == "unet"]


def test_train_base_resumes_where_it_stopped_and_writes_a_loadable_model(tmp_path, capsys):
    work, model = tmp_path / "work", tmp_path / "model"
    run(_config(unet_steps=2), work, model)
    assert _unet_steps(work) == [1, 2]
    assert (work / "grid-000002.png").is_file()
    run(_config(), work, model)  # the same run, now 4 steps: continues from the checkpoint at 2
    assert _unet_steps(work) == [1, 2, 3, 4]  # the VAE and the first two UNet steps are not run again
    vae_steps = [json.loads(line)["step"] for line in (work / "log.jsonl").read_text().splitlines()
                 if json.loads(line)["stage"] == "vae"]
    assert vae_steps == [1, 2, 3]
    card = (model / "README.md").read_text()
    assert "for 4 steps" in card and (model / "loss.png").is_file()
    photo = tmp_path / "person.png"
    assert run_cli(capsys, "world", "render", "2", "-o", photo)[0] == 0
    code, out, err = run_cli(capsys, "train", photo, "--model", model, "--crop", "none",
                             "--mask", "world", "--image-encoder", "tiny", "--no-id-loss",
                             "--steps", "2", "--stage-window", "400:800", "--checkpoint-every", "0",
                             "-o", tmp_path / "concept")
    assert code == 0, err
    assert (tmp_path / "concept" / "concept.safetensors").is_file()


def test_train_base_refuses_a_device_that_is_not_there_before_it_renders_anything(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run_cli(capsys, "world", "train-base", "--work", tmp_path / "work", "--device", "cuda")
    assert code != 0 and "device" in err and "Traceback" not in err
    assert not (tmp_path / "work").exists()

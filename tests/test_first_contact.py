"""What a newcomer reads in the first hour: a typo'd flag or command names the one meant, counts and
paths are written as words and paths, and the stage plot's axis says which way denoising runs."""

import shutil

import pytest

from cli_helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize(
    "argv, meant, help_of",
    [
        (["train", "x.png", "-o", "c", "--stpes", "3"], "did you mean --steps?", "personamagic train --help"),
        (["generate", "c", "-p", "S*", "-o", "o", "--guidence-scale", "3"], "did you mean --guidance-scale?", "personamagic generate"),
        (["trian", "x.png"], "did you mean train?", "personamagic --help"),
        (["world", "render", "3", "-o", "a.png", "--sed", "1"], "did you mean --seed?", "personamagic world render"),
    ],
)
def test_a_typo_names_the_flag_or_command_meant(argv, meant, help_of, capsys):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, meant, help_of)


def test_a_flag_near_nothing_gets_no_guess(capsys):
    code, _, err = run_cli(capsys, "train", "x.png", "-o", "c", "--zzzzzz", "3")
    assert_one_line_error(code, err, "unrecognized arguments: --zzzzzz")
    assert "did you mean" not in err


def test_the_stage_plot_says_which_way_denoising_runs():
    from personamagic.jobs.plots import stages_plot

    stages = {"timesteps": [999, 500, 0], "window": [300, 700], "iou": [0.1, 0.5, 0.9],
              "relative_iou": [0.1, 0.5, 1.0], "lambda1": 0.7, "lambda2": 0.8}
    (ax,) = stages_plot(stages).axes
    left, right = ax.get_xlim()
    assert left > right  # T on the left, 0 on the right
    assert "left to right" in ax.get_xlabel()


def test_train_many_counts_one_identity_in_the_singular(tmp_path, astronaut, capsys):
    photos = tmp_path / "people"
    photos.mkdir()
    shutil.copy(astronaut, photos / "ann.png")
    code, out, err = run_cli(capsys, "train-many", photos, "-o", tmp_path / "concepts", "--model", "tiny",
                             "--steps", "1", "--stage-window", "400:800", "--checkpoint-every", "0")
    assert code == 0, err
    assert "trained 1 identity in" in out


def test_evaluate_names_its_scores_file_as_a_path(tmp_path, capsys):
    from personamagic.world.render import render, save_render

    images = tmp_path / "out"
    images.mkdir()
    save_render(render(7, None, 0), images / "a.png", 0)
    code, out, err = run_cli(capsys, "evaluate", "images", f"{images}/", "-r", images / "a.png",
                             "--metrics", "world", "--prompt", "a photo of a face")
    assert code == 0, err
    assert f"scores written to {images / 'scores.json'}" in out and "//" not in out


def test_offline_downloads_are_one_per_line_and_an_sdxl_model_suggests_the_sdxl_toy(astronaut, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", astronaut, "--model", "stabilityai/stable-diffusion-xl-base-1.0",
                           "-o", tmp_path / "c")
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("error: offline, and 3 downloads") and len(lines) == 4, err
    assert all(len(line) < 160 for line in lines)
    (model,) = [line for line in lines if "stable-diffusion-xl-base-1.0" in line]
    assert "--model tiny-sdxl" in model
    code, _, err = run_cli(capsys, "train", astronaut, "--model", "SomeOrg/Not-A-Model", "--mask", "landmarks",
                           "--image-encoder", "tiny", "-o", tmp_path / "c")
    assert_one_line_error(code, err, "a download this command needs", "(or --model tiny (an offline toy)")


def test_the_same_train_command_run_again_has_nothing_to_do(tmp_path, astronaut, capsys):
    argv = ["train", astronaut, "-o", tmp_path / "c", "--model", "tiny", "--steps", "2", "--stage-window", "400:800",
            "--checkpoint-every", "0"]
    assert run_cli(capsys, *argv)[0] == 0
    before = (tmp_path / "c" / "concept.safetensors").read_bytes()
    code, out, err = run_cli(capsys, *argv)  # as `make`: the README's one-liner can be run twice
    assert code == 0, err
    assert "already holds the concept of these photos and settings; nothing to do" in out
    assert (tmp_path / "c" / "concept.safetensors").read_bytes() == before
    code, _, err = run_cli(capsys, *argv[:-4], "--steps", "3", "--stage-window", "400:800", "--checkpoint-every", "0")
    assert_one_line_error(code, err, "already holds a concept", "--overwrite", train=True)  # other settings


def test_generate_offline_suggests_the_toy_of_its_concepts_family_not_of_the_models_name(tmp_path, capsys):
    from _concepts import random_concept
    from personamagic.models import build_tiny_sdxl_components

    random_concept(build_tiny_sdxl_components()).save(tmp_path / "c")  # an SDXL concept
    # a fine-tune whose name says nothing of SDXL: the concept's family decides the toy to suggest
    code, _, err = run_cli(capsys, "generate", tmp_path / "c", "--model", "SomeOrg/my-finetune", "-p", "a photo of S*",
                           "-o", tmp_path / "out")
    assert code == 2 and "--model tiny-sdxl" in err and "--model tiny " not in err, err

"""Concept files whose metadata contradicts their tensors, family or a sane range: each is one `error:` line
naming the file and the fault, not a concept that `inspect` describes wrongly and `export` writes out."""

import pytest
from _concepts import random_concept

from cli_helpers import assert_one_line_error, edit, rewrite_concept, run_cli
from personamagic.concept import MAX_TRAIN_TIMESTEPS


def mapper_edit(**changes):
    return lambda meta: {**meta, "mapper_config": {**meta["mapper_config"], **changes}}


def without_residual_tensors(tensors):
    return {k: v for k, v in tensors.items() if not k.startswith("mapper.residual_")}


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    """A concept of the tiny SD-1.x model: one text encoder, 32 wide."""
    from personamagic.models import build_tiny_components

    folder = tmp_path_factory.mktemp("concept") / "me"
    random_concept(build_tiny_components(), window=(400, 800)).save(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_concept_dir(tmp_path_factory):
    """A concept of the tiny SDXL model: two text encoders, 32 and 48 wide (80 side by side)."""
    from personamagic.models import build_tiny_sdxl_components

    folder = tmp_path_factory.mktemp("concept-sdxl") / "me"
    random_concept(build_tiny_sdxl_components(), window=(300, 700)).save(folder)
    return folder


BAD_CONCEPTS = {
    "hidden size of another model": (edit("text_encoder_hidden_size", 768), None,
                                     "'text_encoder_hidden_size' is 768, but its tensors are of text width 32"),
    "hidden size off by one": (edit("text_encoder_hidden_size", 33), None,
                               "'text_encoder_hidden_size' is 33, but its tensors are of text width 32"),
    "format as text": (edit("format_version", "2"), None, "'format_version' must be a whole number"),
    "format true": (edit("format_version", True), None, "'format_version' must be a whole number"),
    "format as a float": (edit("format_version", 2.0), None, "'format_version' must be a whole number"),
    "no format": (lambda meta: {k: v for k, v in meta.items() if k != "format_version"}, None,
                  "its metadata has no 'format_version'"),
    "T of a trillion": (edit("num_train_timesteps", 10**12), None,
                        f"'num_train_timesteps' must be >= 1 and <= {MAX_TRAIN_TIMESTEPS}, got {10**12}"),
    "T just past the bound": (edit("num_train_timesteps", MAX_TRAIN_TIMESTEPS + 1), None,
                              f"must be >= 1 and <= {MAX_TRAIN_TIMESTEPS}"),
    "two encoder widths on SD-1.x": (mapper_edit(encoder_widths=[16, 16]), None,
                                     "'encoder_widths' [16, 16] has 2 width(s), but a Stable Diffusion 1.x model"),
    "residual of another width": (mapper_edit(use_residual=False, residual_dim=7), without_residual_tensors,
                                  "mapper_config 'residual_dim' 7 is not the text width 32"),
}


@pytest.mark.parametrize("case", BAD_CONCEPTS)
def test_metadata_that_contradicts_the_concept_is_one_line(case, concept_dir, tmp_path, capsys):
    meta, tensors, fault = BAD_CONCEPTS[case]
    path = rewrite_concept(concept_dir, tmp_path / "bad", meta, tensors)
    code, out, err = run_cli(capsys, "inspect", tmp_path / "bad")
    assert_one_line_error(code, err, f"error: {path}: ", fault)
    assert out == ""


def test_export_and_generate_refuse_a_recorded_width_the_tensors_do_not_have(concept_dir, tmp_path, capsys):
    path = rewrite_concept(concept_dir, tmp_path / "bad", edit("text_encoder_hidden_size", 768))
    fault = "'text_encoder_hidden_size' is 768, but its tensors are of text width 32"
    code, _, err = run_cli(capsys, "export", tmp_path / "bad", "-o", tmp_path / "ti" / "me.safetensors")
    assert_one_line_error(code, err, f"error: {path}: ", fault)
    assert not (tmp_path / "ti").exists()
    code, _, err = run_cli(capsys, "generate", tmp_path / "bad", "--model", "tiny", "-p", "S*", "--steps", "2",
                           "--num-images", "1", "-o", tmp_path / "out")
    assert_one_line_error(code, err, f"error: {path}: ", fault)
    assert not (tmp_path / "out").exists()


SDXL_BAD_CONCEPTS = {
    "hidden size of encoder 1 only": (edit("text_encoder_hidden_size", 32),
                                      "'text_encoder_hidden_size' is 32, but its tensors are of text width 80"),
    "one encoder width": (mapper_edit(encoder_widths=[80]),
                          "'encoder_widths' [80] has 1 width(s), but a Stable Diffusion XL model has 2"),
    "family changed to SD-1.x": (edit("family", "sd1"),
                                 "'encoder_widths' [32, 48] has 2 width(s), but a Stable Diffusion 1.x model has 1"),
}


@pytest.mark.parametrize("case", SDXL_BAD_CONCEPTS)
def test_sdxl_metadata_that_contradicts_the_concept_is_one_line(case, sdxl_concept_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "inspect", sdxl_concept_dir)  # the undamaged file passes every check
    assert code == 0 and "(sdxl, text width 80)" in out
    meta, fault = SDXL_BAD_CONCEPTS[case]
    path = rewrite_concept(sdxl_concept_dir, tmp_path / "bad", meta)
    code, out, err = run_cli(capsys, "inspect", tmp_path / "bad")
    assert_one_line_error(code, err, f"error: {path}: ", fault)
    assert out == ""

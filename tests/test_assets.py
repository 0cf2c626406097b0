"""The offline check of a command's downloads (`jobs.assets`): what counts as a download at all."""

from cli_helpers import assert_one_line_error, run_cli
from personamagic.jobs.assets import Asset, cached


def test_an_image_encoder_that_is_no_hub_reference_is_one_user_error(astronaut, tmp_path, capsys):
    """`--image-encoder` with a name that is neither a local path nor `owner/name` reaches the image
    encoder's loader, which says what to pass, instead of failing in the offline check."""
    assert cached(Asset("the CLIP image encoder", "clip-typo", "--image-encoder PATH, or tiny"))
    code, _, err = run_cli(capsys, "train", astronaut, "--model", "tiny", "--mask", "landmarks", "--image-encoder",
                           "clip-typo", "--steps", 1, "--partition-warmup-steps", 1, "-o", tmp_path / "c")
    assert_one_line_error(code, err, "could not load the CLIP image encoder 'clip-typo'", train=True)
    assert not (tmp_path / "c").exists()

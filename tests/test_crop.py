"""`--crop none`: a photo that is already a crop is taken as it is (no detection), and the identity
loss reads the whole image."""

import numpy as np
from PIL import Image

from cli_helpers import assert_one_line_error, run_cli
from personamagic.concept import Concept

FAST = ["--model", "tiny", "--steps", "2", "--checkpoint-every", "0", "--stage-window", "400:800"]


def test_a_photo_without_a_face_trains_with_crop_none(tmp_path, capsys):
    # a flat picture: face detection finds nothing in it, so only --crop none can train on it
    photo = tmp_path / "flat.png"
    Image.fromarray(np.full((96, 128, 3), 120, np.uint8)).save(photo)
    code, _, err = run_cli(capsys, "train", photo, "-o", tmp_path / "a", *FAST, "--mask", "none")
    assert_one_line_error(code, err, "no face found", train=True)
    code, out, err = run_cli(capsys, "train", photo, "-o", tmp_path / "b", *FAST, "--mask", "none", "--crop", "none")
    assert code == 0, err
    concept = Concept.load(tmp_path / "b")
    assert concept.training["use_id_loss"]  # the identity loss ran, on the whole image


def test_crop_none_with_an_automatic_mask_is_one_error(tmp_path, astronaut, capsys):
    code, _, err = run_cli(capsys, "train", astronaut, "-o", tmp_path / "c", *FAST, "--crop", "none")
    assert_one_line_error(code, err, "--crop none", "--mask")
    assert not (tmp_path / "c").exists()


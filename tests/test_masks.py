"""Face masks: landmark ellipse, CLIPSeg (tiny model), user mask files, overlay, latent resolution."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from personamagic.errors import ModelLoadError, PhotoError
from personamagic.faces import FaceDetection, prepare_photo
from personamagic.faces.masks import (
    clipseg_mask,
    clipseg_probabilities,
    landmark_mask,
    load_mask_file,
    mask_overlay,
    mask_to_latent,
)
from personamagic.models import build_tiny_clipseg

DATA = Path(__file__).parent / "data"
SIZE = 256


@pytest.fixture(scope="module", params=["astronaut.png", "grace_hopper.jpg"])
def photo(request):
    return prepare_photo(DATA / request.param, SIZE)


@pytest.fixture(scope="module")
def tiny_clipseg():
    return build_tiny_clipseg(seed=0)


def _is_binary(mask: np.ndarray) -> bool:
    return mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}


def _bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the nonzero pixels, x1/y1 exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --------------------------------------------------------------------------------------------------
# landmark ellipse


def test_landmark_mask_covers_the_face_and_little_else(photo):
    mask = landmark_mask(photo.face, SIZE)
    assert mask.shape == (SIZE, SIZE) and _is_binary(mask)
    for x, y in photo.face.landmarks:
        assert mask[int(round(y)), int(round(x))] == 1.0
    cx, cy = photo.face.center
    assert mask[int(cy), int(cx)] == 1.0
    # The ellipse is about the face box's size: much smaller than the crop, not much larger than the box.
    assert 0.02 < mask.mean() < 0.3
    assert mask.sum() < 1.6 * photo.face.area


def test_landmark_mask_follows_head_roll():
    landmarks = np.array([[40, 50], [60, 50], [50, 60], [42, 70], [58, 70]], np.float32)
    upright = FaceDetection((30.0, 30.0, 70.0, 80.0), landmarks, 0.9)
    center = np.array(upright.center)
    rotation = np.array([[0.0, -1.0], [1.0, 0.0]])  # 90 degrees: the face lies on its side
    rolled = FaceDetection(
        (25.0, 35.0, 75.0, 75.0), ((landmarks - center) @ rotation.T + center).astype(np.float32), 0.9
    )
    x0, y0, x1, y1 = _bounds(landmark_mask(upright, 100))
    assert y1 - y0 > x1 - x0  # tall ellipse for an upright face
    x0, y0, x1, y1 = _bounds(landmark_mask(rolled, 100))
    assert x1 - x0 > y1 - y0  # wide for a face rolled by 90 degrees


def test_landmark_mask_is_clipped_at_the_border():
    landmarks = np.array([[2, 10], [14, 10], [8, 16], [3, 22], [13, 22]], np.float32)
    mask = landmark_mask(FaceDetection((-10.0, -5.0, 25.0, 30.0), landmarks, 0.9), 64)
    assert mask.shape == (64, 64) and _is_binary(mask)
    assert mask[0, 0] == 1.0 and mask[63, 63] == 0.0


# --------------------------------------------------------------------------------------------------
# CLIPSeg


def test_tiny_clipseg_probabilities_are_a_soft_map(photo, tiny_clipseg):
    model, processor = tiny_clipseg
    probabilities = clipseg_probabilities(photo.image, "face", model, processor)
    assert probabilities.shape == (SIZE, SIZE) and probabilities.dtype == np.float32
    assert np.isfinite(probabilities).all()
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    assert probabilities.std() > 0  # the decoder's output varies over the image
    again = clipseg_probabilities(photo.image, "face", *build_tiny_clipseg(seed=0))
    np.testing.assert_array_equal(probabilities, again)


def test_clipseg_mask_thresholds_and_refuses_an_empty_mask(photo, tiny_clipseg):
    model, processor = tiny_clipseg
    probabilities = clipseg_probabilities(photo.image, "face", model, processor)
    threshold = float(np.median(probabilities))
    mask = clipseg_mask(photo.image, "face", model, processor, threshold=threshold)
    assert mask.shape == (SIZE, SIZE) and _is_binary(mask)
    np.testing.assert_array_equal(mask, probabilities > threshold)
    with pytest.raises(PhotoError, match=r"CLIPSeg mask for 'face' is empty.*--mask landmarks"):
        clipseg_mask(photo.image, "face", model, processor, threshold=1.0)


def test_clipseg_that_cannot_load_points_to_landmarks(tmp_path):
    with pytest.raises(ModelLoadError, match="--mask landmarks"):
        clipseg_mask(Image.new("RGB", (64, 64)), "face", model_id=str(tmp_path))  # an empty folder


# --------------------------------------------------------------------------------------------------
# user mask files


def _face_box_mask(photo, mode: str) -> Image.Image:
    """The photo's face box painted on a blank image of the original photo's size, in `mode`."""
    crop = photo.crop
    box = list(photo.face.transformed(1 / crop.scale, (crop.x0, crop.y0)).box)  # crop -> photo pixels
    if mode == "RGBA":
        image = Image.new("RGBA", photo.original.size, (255, 255, 255, 0))
        ImageDraw.Draw(image).rectangle(box, fill=(0, 0, 0, 255))  # black but opaque: alpha decides
    else:
        image = Image.new(mode, photo.original.size, 0)
        ImageDraw.Draw(image).rectangle(box, fill=255 if mode == "L" else (255, 255, 255))
    return image


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_mask_file_lines_up_with_the_crop(photo, tmp_path, mode):
    path = tmp_path / "mask.png"
    _face_box_mask(photo, mode).save(path)
    mask = load_mask_file(path, photo)
    assert mask.shape == (SIZE, SIZE) and _is_binary(mask)
    for got, want in zip(_bounds(mask), photo.face.box):
        assert abs(got - want) <= 2


def test_mask_file_of_another_size_is_a_user_error(photo, tmp_path):
    path = tmp_path / "mask.png"
    Image.new("L", (100, 80), 255).save(path)
    width, height = photo.original.size
    with pytest.raises(PhotoError, match=rf"100x80 pixels but the photo .* is {width}x{height}"):
        load_mask_file(path, photo)


def test_empty_mask_file_is_a_user_error(photo, tmp_path):
    path = tmp_path / "mask.png"
    Image.new("L", photo.original.size, 0).save(path)
    with pytest.raises(PhotoError, match="selects nothing"):
        load_mask_file(path, photo)


def test_mask_file_that_is_not_an_image_is_a_user_error(photo, tmp_path):
    path = tmp_path / "mask.png"
    path.write_text("white face\n")
    with pytest.raises(PhotoError, match="not an image"):
        load_mask_file(path, photo)


# --------------------------------------------------------------------------------------------------
# overlay and latent mask


def test_overlay_tints_only_the_mask(photo):
    mask = landmark_mask(photo.face, SIZE)
    overlay = mask_overlay(photo.image, mask)
    assert overlay.size == photo.image.size and overlay.mode == "RGB"
    before, after = np.asarray(photo.image).astype(int), np.asarray(overlay).astype(int)
    cx, cy = (int(v) for v in photo.face.center)
    assert after[cy, cx, 0] >= before[cy, cx, 0] and after[cy, cx, 1] <= before[cy, cx, 1]
    np.testing.assert_array_equal(after[:3, :3], before[:3, :3])  # a corner, far from the face
    with pytest.raises(ValueError):
        mask_overlay(photo.image, mask[:10])


def test_mask_to_latent_is_an_area_average(photo):
    mask = landmark_mask(photo.face, SIZE)
    latent = mask_to_latent(mask, SIZE // 8)
    assert latent.shape == (1, 1, SIZE // 8, SIZE // 8) and latent.dtype == torch.float32
    assert latent.min() >= 0 and latent.max() <= 1
    assert ((latent > 0) & (latent < 1)).any()  # soft at the border of the face
    assert latent.mean().item() == pytest.approx(float(mask.mean()), abs=1e-6)
    assert mask_to_latent(mask, 10).shape == (1, 1, 10, 10)  # sizes that do not divide work too

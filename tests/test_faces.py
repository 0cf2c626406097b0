"""Photo loading, YuNet face detection and face-centred square crops."""

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from personamagic import faces
from personamagic.errors import PhotoError
from personamagic.faces import (
    CropBox,
    FaceDetection,
    center_square_crop,
    crop_square_around_face,
    default_face_detector,
    load_photo,
    prepare_photo,
)

DATA = Path(__file__).parent / "data"
PHOTOS = [DATA / "astronaut.png", DATA / "grace_hopper.jpg"]


def _inside(points: np.ndarray, box) -> bool:
    x0, y0, x1, y1 = box
    return bool(np.all((points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)))


def _iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / (_area(a) + _area(b) - inter)


def _area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


# --------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_load_photo_is_rgb(path):
    image = load_photo(path)
    assert image.mode == "RGB"
    assert min(image.size) >= faces.MIN_PHOTO_SIDE


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored 200x100 shows as 100x200
    Image.new("RGB", (200, 100), (10, 200, 30)).save(path, exif=exif)
    assert load_photo(path).size == (100, 200)


def _mode_image(mode: str) -> tuple[Image.Image, str, tuple[int, int, int]]:
    """A 64x64 image in `mode`, the format to save it as, and the RGB its pixel (0, 0) must load as."""
    if mode == "L":
        return Image.new("L", (64, 64), 100), "PNG", (100, 100, 100)
    if mode == "LA":
        return Image.new("LA", (64, 64), (100, 0)), "PNG", (255, 255, 255)  # transparent -> white
    if mode == "P":
        image = Image.new("P", (64, 64), 1)
        image.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
        return image, "PNG", (200, 10, 20)
    if mode == "RGBA":
        # Half-transparent black over white: mid-gray, where dropping alpha would give black.
        return Image.new("RGBA", (64, 64), (0, 0, 0, 128)), "PNG", (127, 127, 127)
    if mode == "CMYK":
        return Image.new("CMYK", (64, 64), (0, 0, 0, 0)), "TIFF", (255, 255, 255)
    if mode == "I;16":
        return Image.fromarray(np.full((64, 64), 32896, np.uint16)), "PNG", (128, 128, 128)  # 32896 / 257
    if mode == "F":
        return Image.fromarray(np.full((64, 64), 0.5, np.float32)), "TIFF", (128, 128, 128)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "F"])
def test_every_mode_loads_as_8bit_rgb(tmp_path, mode):
    image, fmt, expected = _mode_image(mode)
    path = tmp_path / f"photo.{fmt.lower()}"
    image.save(path, fmt)
    assert Image.open(path).mode == mode  # the file really stores that mode
    loaded = load_photo(path)
    assert loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded)[0, 0].astype(int) - expected).max() <= 1


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height 8-bit RGB pixels, with a few bytes of (garbage) pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", bytes(16))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _truncated(fmt: str):
    def write(path):
        image = load_photo(PHOTOS[0])
        image.save(path, fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return write


USER_MISTAKES = {
    "missing": (lambda path: None, "does not exist"),
    "directory": (lambda path: path.mkdir(), "folder"),
    "text": (lambda path: path.write_text("not a picture\n"), "not an image"),
    "truncated_png": (_truncated("PNG"), "truncated"),
    "truncated_jpeg": (_truncated("JPEG"), "truncated"),
    "one_pixel": (lambda path: Image.new("RGB", (1, 1)).save(path, "PNG"), "at least 64 pixels"),
    "bomb_pil_refuses": (lambda path: path.write_bytes(_png_header(100_000, 100_000)), "too large"),
    "bomb_pil_warns": (lambda path: path.write_bytes(_png_header(10_000, 10_000)), "too large"),
    "bomb_under_pil_limit": (lambda path: path.write_bytes(_png_header(9_000, 9_000)), "9000x9000 pixels"),
}


@pytest.mark.parametrize("case", USER_MISTAKES)
def test_user_mistakes_raise_one_line_user_error(tmp_path, case):
    make, expected = USER_MISTAKES[case]
    path = tmp_path / "me.png"
    make(path)
    with pytest.raises(PhotoError, match=expected) as info:
        load_photo(path)
    assert "\n" not in str(info.value)
    assert "me.png" in str(info.value)


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(faces.photos, "MAX_PHOTO_PIXELS", 100 * 100 - 1)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(PhotoError, match="100x100 pixels, too large"):
        load_photo(path)


# --------------------------------------------------------------------------------------------------
# detection and cropping


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_one_face_with_landmarks_in_its_box(path):
    detected = default_face_detector().detect(load_photo(path))
    assert len(detected) == 1
    face = detected[0]
    assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
    assert _inside(face.landmarks, face.box)
    assert 0.5 < face.score <= 1.0
    # YuNet's order is from the person's view: their right eye / mouth corner is on the image's left.
    assert face.landmarks[FaceDetection.RIGHT_EYE, 0] < face.landmarks[FaceDetection.LEFT_EYE, 0]
    assert face.landmarks[FaceDetection.RIGHT_MOUTH, 0] < face.landmarks[FaceDetection.LEFT_MOUTH, 0]
    eyes_y = face.landmarks[:2, 1].max()
    assert eyes_y < face.landmarks[FaceDetection.NOSE, 1] < face.landmarks[3:, 1].min()


def test_large_images_are_detected_downscaled_and_mapped_back():
    image = load_photo(PHOTOS[0])
    face = default_face_detector().detect(image)[0]
    big = image.resize((image.width * 4, image.height * 4), Image.Resampling.BICUBIC)
    big_face = default_face_detector().detect(big)[0]
    assert _iou(big_face.box, face.transformed(4.0).box) > 0.8


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
@pytest.mark.parametrize("size", [128, 512])
def test_prepared_photo_is_centred_on_the_face_and_not_squashed(path, size):
    photo = prepare_photo(path, size)
    assert photo.image.size == (size, size) and photo.image.mode == "RGB"
    assert photo.num_faces == 1
    crop, face = photo.crop, photo.face
    original_face = default_face_detector().detect(photo.original)[0]
    # The face is at the centre of the crop on each axis, unless the crop sits against the photo's edge.
    for axis, (start, extent) in enumerate([(crop.x0, photo.original.width), (crop.y0, photo.original.height)]):
        at_edge = start == 0 or start + crop.side == extent
        assert at_edge or abs(face.center[axis] - size / 2) <= 0.01 * size
    # The crop's pixels are what the CropBox says: the face found again in them is where it maps to,
    # with the aspect of the original box (a squash would change it).
    if size == 512:
        again = default_face_detector().detect(photo.image)[0]
        assert _iou(again.box, face.box) > 0.8
        assert again.width / again.height == pytest.approx(original_face.width / original_face.height, rel=0.1)
    assert face.width / face.height == pytest.approx(original_face.width / original_face.height, rel=1e-4)
    assert _inside(face.landmarks, (0, 0, size, size))


def test_crop_side_follows_context_and_is_clamped():
    image = load_photo(PHOTOS[0])
    face = default_face_detector().detect(image)[0]
    _, crop = crop_square_around_face(image, face, 64, context=2.0)
    assert crop.side == round(2.0 * max(face.size))
    _, crop = crop_square_around_face(image, face, 64, context=50.0)
    assert (crop.x0, crop.y0, crop.side) == (0, 0, min(image.size))


def test_crop_box_maps_points_and_images_consistently():
    image = Image.new("RGB", (300, 200), "black")
    image.paste((255, 255, 255), (100, 50, 140, 90))  # a white square, 40 px
    cropped, crop = center_square_crop(image, 100)
    assert (crop.x0, crop.y0, crop.side) == (50, 0, 200) and crop.scale == 0.5
    assert crop.map_box((100, 50, 140, 90)) == (25.0, 25.0, 45.0, 45.0)
    ys, xs = np.nonzero(np.asarray(crop.apply(image.convert("L"), Image.Resampling.NEAREST)) > 127)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (25, 25, 45, 45)
    assert cropped.size == (100, 100)
    with pytest.raises(ValueError):
        crop.apply(Image.new("L", (10, 10)))


def test_center_crop_without_detection(tmp_path):
    photo = prepare_photo(PHOTOS[1], 64, detect_face=False)
    assert photo.face is None and photo.num_faces == 0
    assert photo.image.size == (64, 64)
    assert isinstance(photo.crop, CropBox) and photo.crop.side == min(photo.original.size)


def test_no_face_is_a_user_error(tmp_path):
    path = tmp_path / "me.jpg"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(path)
    with pytest.raises(PhotoError, match=r"no face found in .*me\.jpg"):
        prepare_photo(path, 128)
    assert prepare_photo(path, 128, detect_face=False).image.size == (128, 128)


def test_largest_of_two_faces_is_used_with_a_warning(tmp_path, caplog):
    astronaut = load_photo(PHOTOS[0])
    face = default_face_detector().detect(astronaut)[0]
    x0, y0, x1, y1 = face.box
    margin = face.width / 2
    head = astronaut.crop((round(x0 - margin), round(y0 - margin), round(x1 + margin), round(y1 + margin)))
    canvas = Image.new("RGB", (640, 400), (120, 130, 140))
    canvas.paste(head.resize((head.width // 2, head.height // 2)), (20, 150))  # small face on the left
    canvas.paste(head, (400, 20))  # large face on the right
    path = tmp_path / "group.png"
    canvas.save(path)

    with caplog.at_level(logging.WARNING, logger="personamagic.faces"):
        photo = prepare_photo(path, 256)
    assert photo.num_faces == 2
    assert "2 faces found" in caplog.text and "group.png" in caplog.text
    chosen = photo.face.transformed(1 / photo.crop.scale, (photo.crop.x0, photo.crop.y0))  # back to canvas
    assert chosen.center[0] > 400 and chosen.width > 0.8 * face.width


def test_small_face_crop_warns_about_upscaling(tmp_path, caplog):
    path = tmp_path / "small.png"
    load_photo(PHOTOS[0]).resize((128, 128), Image.Resampling.LANCZOS).save(path)
    with caplog.at_level(logging.WARNING, logger="personamagic.faces"):
        photo = prepare_photo(path, 512)
    assert photo.image.size == (512, 512)
    assert "upscaled" in caplog.text

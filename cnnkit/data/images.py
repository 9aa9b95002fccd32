"""Decoding one image file into an RGB array, whatever its format or mode."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnkit.errors import CnnkitError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# Decompression bombs are an error, not a warning: a 20k x 20k "photo" in a
# dataset is almost always a mistake and would exhaust memory in a batch.
Image.MAX_IMAGE_PIXELS = 180_000_000


class UnreadableImageError(CnnkitError):
    """A file that is not a decodable image (corrupt, truncated, empty, other)."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels are composited on white (the usual background of cut-out
    product photos); 16-bit and 32-bit integer images are scaled to 8 bits by
    their type's range rather than clipped, so they do not come out white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        if mode == "F":
            top = max(float(array.max()), 1e-12)
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _square_crop_box(width: int, height: int, crop_pct: float) -> tuple[int, int, int, int]:
    side = min(width, height) * crop_pct
    left = (width - side) / 2
    top = (height - side) / 2
    return (round(left), round(top), round(left + side), round(top + side))


def load_image(path: str | Path, size: int | None = None, crop_pct: float = 1.0) -> np.ndarray:
    """Read an image file as a ``uint8`` array of shape (H, W, 3).

    The first frame of animated files is used and the EXIF orientation is
    applied. With ``size``, the image is centre-cropped to a square holding
    ``crop_pct`` of its shorter side and resized to ``size`` x ``size``.

    Raises:
        UnreadableImageError: the file is empty, truncated, corrupt or not an
            image; the message names the file and the reason.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns about odd EXIF or palette data; the file still decodes.
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.seek(0)
                if size is not None and image.format == "JPEG":
                    # Decode JPEGs at reduced scale when much larger than needed.
                    image.draft("RGB", (size * 2, size * 2))
                image.load()
                image = ImageOps.exif_transpose(image) or image
                image = _to_rgb(image)
                if size is not None:
                    box = _square_crop_box(image.width, image.height, crop_pct)
                    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
                return np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise UnreadableImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UnreadableImageError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        reason = "empty file" if path.stat().st_size == 0 else "not an image Pillow can read"
        raise UnreadableImageError(f"{path}: {reason}") from None
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(f"{path}: image too large ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise UnreadableImageError(f"{path}: corrupt or truncated image ({error})") from None


def check_image_header(path: str | Path) -> str | None:
    """Cheaply check that a file looks like an image; return the reason if not.

    Only the header is read, so truncated files pass here and are caught when
    they are decoded.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.size  # noqa: B018 - forces the header parse
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except Image.DecompressionBombError as error:
        return f"image too large ({error})"
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return f"corrupt image ({error})"
    return None

"""Decoding one image file into an RGB array, whatever its format or mode.

Why reading a file nobody vetted is safe here: only Pillow's decoders for the
six documented formats are tried (``formats=``), and none of them runs code or
an outside program named by the file (Pillow's EPS reader, for one, would start
Ghostscript); the size the header declares is checked against ``MAX_PIXELS``
right after the header is parsed, before any pixel memory is allocated; and any
exception a decoder raises on bad data becomes ``UnreadableImageError`` naming
the file, so one bad file never stops a batch.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnkit.errors import CnnkitError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
_FORMAT_NAMES = "JPEG, PNG, BMP, GIF, WebP or TIFF"

# Decompression bombs are an error, not a warning: a 20k x 20k "photo" in a
# dataset is almost always a mistake and would exhaust memory in a batch.
# Pillow only warns between 1x and 2x its limit, so cnnkit checks the size
# itself; Pillow's own check stays as a backstop inside its decoders.
MAX_PIXELS = 180_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
_PILLOW_MODULES = r"PIL(\.|$)"


def _quiet_pillow() -> None:
    """Ignore Pillow's own warnings, process-wide: it warns about odd EXIF, palette or TIFF data in files that
    still decode (or fail with the one-line error cnnkit gives), noise to a user.

    A filter added to the process's list (again if something dropped it: a ``catch_warnings`` block that was
    entered before it was added), not ``warnings.catch_warnings`` around each decode: that swaps the process's
    one filter list, so decoders on several threads (``cnnkit.data.pipeline``, the header checks) restored each
    other's lists and a "Corrupt EXIF data" warning got through now and then (tests/test_images.py).
    """
    if not any(f[0] == "ignore" and f[3] is not None and f[3].pattern == _PILLOW_MODULES and f[2] is Warning
               for f in warnings.filters):
        warnings.filterwarnings("ignore", module=_PILLOW_MODULES)


class UnreadableImageError(CnnkitError):
    """A file that is not a decodable image (corrupt, truncated, empty, other)."""


class _TooLarge(Exception):
    def __init__(self, pixels: int | None):
        self.pixels = pixels


def open_image(path: Path) -> Image.Image:
    """Parse only the header, with the decoders of ``FORMATS`` only; refuse a decompression bomb before its pixels
    exist. Every reader of a user's image opens it here (the module docstring says why that is safe); it raises
    whatever Pillow raises on bad data, or ``_TooLarge``: callers turn any exception into "unreadable"."""
    _quiet_pillow()
    image = Image.open(path, formats=FORMATS)
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise _TooLarge(image.width * image.height)
    if image.width < 1 or image.height < 1:
        image.close()
        raise SyntaxError("the image has no pixels")
    return image


def _reason(path: Path, error: Exception) -> str:
    """Why ``path`` cannot be read, in a few words on one line."""
    if isinstance(error, Image.DecompressionBombError):  # Pillow's backstop fired first
        found = re.search(r"\((\d+) pixels\)", str(error))
        error = _TooLarge(int(found.group(1)) if found else None)
    if isinstance(error, _TooLarge):
        pixels = f"{error.pixels:,}" if error.pixels else f"over {2 * MAX_PIXELS:,}"
        return f"image too large ({pixels} pixels; the limit is {MAX_PIXELS:,})"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not an image"
    if isinstance(error, UnidentifiedImageError):
        try:
            empty = path.stat().st_size == 0
        except OSError:
            empty = False
        return "empty file" if empty else f"not a {_FORMAT_NAMES} image"
    if isinstance(error, MemoryError):
        return "not enough memory to decode it"
    if isinstance(error, OSError) and error.errno is not None:
        return f"cannot read it ({error.strerror})"
    detail = " ".join(str(error).split()) or type(error).__name__
    return f"corrupt or truncated image ({detail})"


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


def square_crop_box(width: int, height: int, crop_pct: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square ``load_image`` keeps of a ``width`` x ``height`` image."""
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
        with open_image(path) as image:
            image.seek(0)
            if size is not None and image.format == "JPEG":
                # Decode JPEGs at reduced scale when much larger than needed.
                image.draft("RGB", (size * 2, size * 2))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # (not in place, it copies every image: 25 us a file)
            image = _to_rgb(image)
            if size is not None:
                box = square_crop_box(image.width, image.height, crop_pct)
                image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
            return np.asarray(image, dtype=np.uint8)
    # Pillow's decoders raise many types on bad data (OSError, SyntaxError,
    # struct.error, IndexError, ZeroDivisionError, MemoryError, ... depending on
    # format and version); for a file not ours to trust, each means "unreadable".
    # KeyboardInterrupt and SystemExit are not Exceptions and pass through.
    except Exception as error:  # noqa: BLE001
        raise UnreadableImageError(f"{path}: {_reason(path, error)}") from None


def check_image_header(path: str | Path) -> str | None:
    """Cheaply check that a file looks like an image; return the reason if not.

    Only the header is read, so truncated files pass here and are caught when
    they are decoded.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with open_image(path):
            pass
    except Exception as error:  # noqa: BLE001 - as in load_image
        return _reason(path, error)
    return None


class ImageFacts:
    """What `doctor` reads of one image: its size and mode, and a small grey thumbnail.

    Attributes:
        width, height: as displayed (EXIF orientation applied).
        mode: Pillow's mode as stored (``RGB``, ``L``, ``P``, ...).
        grey_as_colour: stored with colour channels that are all equal.
        thumbnail: (side, side) ``uint8`` grey pixels of the whole image, squashed to a square.
    """

    __slots__ = ("width", "height", "mode", "grey_as_colour", "thumbnail")

    def __init__(self, width: int, height: int, mode: str, grey_as_colour: bool, thumbnail: np.ndarray):
        self.width, self.height, self.mode = width, height, mode
        self.grey_as_colour, self.thumbnail = grey_as_colour, thumbnail


def inspect_image(path: str | Path, side: int = 64) -> ImageFacts:
    """Read an image's size, mode and a ``side`` x ``side`` grey thumbnail (safe as ``load_image``).

    JPEGs are decoded at reduced scale (``draft``): the thumbnail needs few pixels.

    Raises:
        UnreadableImageError: as ``load_image``.
    """
    path = Path(path)
    try:
        with open_image(path) as image:
            image.seek(0)
            mode = image.mode
            stored = image.size  # before draft scaling: the file's own size
            if image.format == "JPEG":
                image.draft(image.mode, (side * 2, side * 2))
            image.load()
            before = image.size
            ImageOps.exif_transpose(image, in_place=True)  # (not in place, it copies every image: 25 us a file)
            width, height = stored if image.size == before or image.size[0] == image.size[1] else stored[::-1]
            if image.mode == "L":  # the same pixels as through RGB (its luma of equal channels is the value)
                grey = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR), dtype=np.uint8)
                return ImageFacts(width, height, mode, False, grey)
            rgb = _to_rgb(image).resize((side, side), Image.Resampling.BILINEAR)
            pixels = np.asarray(rgb, dtype=np.int16)
            spread = int(np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max())
            grey = np.asarray(rgb.convert("L"), dtype=np.uint8)
            return ImageFacts(width, height, mode, mode not in ("L", "LA", "1", "I", "I;16", "F")
                              and spread <= 2, grey)
    except Exception as error:  # noqa: BLE001 - as in load_image
        raise UnreadableImageError(f"{path}: {_reason(path, error)}") from None

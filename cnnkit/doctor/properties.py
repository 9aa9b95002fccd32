"""Image properties that make an image a poor training example: blank, dark, light, blurry, tiny, odd shape.

Each is measured on the image's 64 x 64 grey thumbnail (``cnnkit.data.images.inspect_image``)
and its stored size. Absolute thresholds where the property is absolute (a near-constant image
is blank in any dataset); relative to the dataset where it is not (what is blurry or tiny
depends on what the rest of the images are: every Fashion-MNIST image is 28 x 28 and soft).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PropertyThresholds:
    """When an image is flagged; the defaults and the experiment behind them are in docs/doctor.md."""

    blank: float = 4.0  # grey standard deviation (0-255) below this: near-constant
    dark: float = 40.0  # the brightest 1 % of pixels below this: the whole image is dark
    light: float = 215.0  # the darkest 1 % above this: washed out
    blurry: float = -4.0  # robust z-score of log fine-detail energy below this, against the dataset
    tiny: float = 0.25  # shorter side below this share of the dataset's median shorter side (or 16 px)
    aspect: float = 4.0  # longer side over shorter side above this


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD): a z-score that a few extreme values cannot hide behind."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return values
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median))
    return (values - median) / max(spread, 1e-9)


def sharpness(thumbnails: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """log of each thumbnail's Laplacian energy over its contrast: low for blurry images.

    The Laplacian of each image (``scipy.ndimage.laplace``: the second differences along each
    of its two axes, reflected at the border), a chunk of images at a time.
    """
    from scipy.ndimage import correlate1d

    out = np.empty(len(thumbnails), np.float64)
    for start in range(0, len(thumbnails), chunk):
        pixels = np.asarray(thumbnails[start:start + chunk], np.float32)
        edges = correlate1d(pixels, [1, -2, 1], axis=1, mode="reflect")
        edges += correlate1d(pixels, [1, -2, 1], axis=2, mode="reflect")
        out[start:start + chunk] = np.log((edges.var(axis=(1, 2)) + 1e-3) / (pixels.var(axis=(1, 2)) + 1.0))
    return out


def grey_levels(thumbnails: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ``uint8`` thumbnail: the standard deviation, the 1st and the 99th percentile of its pixels.

    The same numbers as ``std`` and ``np.percentile`` (linear interpolation) of the pixels,
    read off a 256-bin histogram of each image instead of sorting its pixels.
    """
    count = len(thumbnails)
    flat = np.asarray(thumbnails).reshape(count, -1)
    size = flat.shape[1]
    spread = np.empty(count, np.float32)
    low, high = np.empty(count), np.empty(count)
    for start in range(0, count, chunk):
        part = flat[start:start + chunk]
        spread[start:start + chunk] = part.astype(np.float32).std(axis=1)
        rows = len(part)
        if part.dtype != np.uint8:
            low[start:start + chunk], high[start:start + chunk] = np.percentile(part.astype(np.float32), [1, 99], axis=1)
            continue
        histogram = np.bincount((np.arange(rows)[:, None] * 256 + part).ravel(), minlength=rows * 256)
        cumulative = histogram.reshape(rows, 256).cumsum(axis=1)
        for out, q in ((low, 1), (high, 99)):
            position = q / 100 * (size - 1)
            below = int(np.floor(position))
            fraction = position - below
            # the k-th smallest pixel (0-based): the first grey level whose cumulative count exceeds k
            at = (cumulative <= below).sum(axis=1).astype(np.float64)
            above = (cumulative <= min(below + 1, size - 1)).sum(axis=1).astype(np.float64)
            out[start:start + chunk] = at + fraction * (above - at)
    return spread, low, high


@dataclass
class PropertyFlag:
    row: int
    kind: str
    score: float
    detail: str


def property_flags(thumbnails: np.ndarray, sizes: np.ndarray, grey_as_colour: np.ndarray,
                   thresholds: PropertyThresholds = PropertyThresholds()) -> tuple[list[PropertyFlag], str | None]:
    """Every property flag of the images, and a dataset-wide note (e.g. all images are grey in RGB files).

    Args:
        thumbnails: (n, 64, 64) grey ``uint8``.
        sizes: (n, 2) width, height as stored.
        grey_as_colour: (n,) stored with colour channels that are all equal.
    """
    flags: list[PropertyFlag] = []
    if not len(thumbnails):
        return flags, None
    spread, low, high = grey_levels(thumbnails)
    blur = robust_z(sharpness(thumbnails))
    short, long = sizes.min(axis=1), sizes.max(axis=1)
    tiny_below = max(16.0, thresholds.tiny * float(np.median(short)))
    for row in range(len(thumbnails)):
        if spread[row] < thresholds.blank:
            flags.append(PropertyFlag(row, "blank", float(thresholds.blank - spread[row]),
                                      f"near-constant (grey level spread {spread[row]:.1f} of 255)"))
            continue  # a blank image is also dark or light and "blurry": say the one thing
        if high[row] < thresholds.dark:
            flags.append(PropertyFlag(row, "dark", float(thresholds.dark - high[row]),
                                      f"its brightest pixels reach only {high[row]:.0f} of 255"))
        if low[row] > thresholds.light:
            flags.append(PropertyFlag(row, "light", float(low[row] - thresholds.light),
                                      f"its darkest pixels are {low[row]:.0f} of 255"))
        if blur[row] < thresholds.blurry:
            flags.append(PropertyFlag(row, "blurry", float(-blur[row]),
                                      f"far less fine detail than the other images (robust z {blur[row]:.1f})"))
        if short[row] < tiny_below:
            flags.append(PropertyFlag(row, "tiny", float(tiny_below / max(short[row], 1)),
                                      f"{sizes[row][0]} x {sizes[row][1]} px"))
        if long[row] > thresholds.aspect * short[row]:
            flags.append(PropertyFlag(row, "odd-aspect", float(long[row] / max(short[row], 1)),
                                      f"{sizes[row][0]} x {sizes[row][1]} px"))
    note = None
    grey = np.asarray(grey_as_colour, bool)
    if grey.mean() > 0.5:
        note = (f"{grey.sum()} of {len(grey)} images are grey stored as colour files: the data is grey "
                "(the network is fed three equal channels either way)")
    else:
        flags += [PropertyFlag(int(r), "grey-as-colour", 1.0, "a grey image stored with three equal colour channels")
                  for r in np.flatnonzero(grey)]
    return flags, note

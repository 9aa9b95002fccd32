"""Pillow's BILINEAR resize of many small grey pictures at once, as matrix products with the same bytes.

``doctor`` resizes every image's thumbnail several times (its zoomed centres, its halved copy for the leak
search's screen). Pillow does one picture per call: 30 us of Python and C per resize, most of a 60,000-image
run's decoding time. Its arithmetic is fixed-point and simple to repeat exactly (``Resample.c``): per output
pixel, integer weights of 22 fractional bits over its input pixels, one pass along each axis, each rounded
back to 8 bits. Each pass here is one ``float64`` matrix product: a product of an 8-bit pixel and a weight
under 2^23, and every partial sum of a row, is an integer far below 2^53, so it is exact in any order; then
Pillow's rounding. ``tests/test_doctor.py`` holds the bytes to Pillow's.
"""

from __future__ import annotations

import functools

import numpy as np


def bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's fixed-point BILINEAR resampling taps: (size_out, taps) input indices and ``int32`` weights
    (0 past each output pixel's last tap).

    Pillow (8-bit images) widens the triangle filter by the scale when it shrinks, normalises each output
    pixel's weights, rounds them to integers of 22 fractional bits and rounds each pass (horizontal, then
    vertical) back to 8 bits. ``resized`` repeats that arithmetic exactly.
    """
    scale = size_in / size_out
    widen = max(scale, 1.0)
    width = int(np.ceil(widen)) * 2 + 1
    index = np.zeros((size_out, width), np.int64)
    weights = np.zeros((size_out, width), np.int32)
    for out in range(size_out):
        centre = (out + 0.5) * scale
        low = max(int(centre - widen + 0.5), 0)
        high = min(int(centre + widen + 0.5), size_in)
        taps = np.maximum(1.0 - np.abs((np.arange(low, high) - centre + 0.5) / widen), 0.0)
        if taps.sum():
            taps = taps / taps.sum()
        index[out, :high - low] = np.arange(low, high)
        weights[out, :high - low] = np.floor(taps * (1 << 22) + 0.5).astype(np.int32)
    return index, weights


@functools.lru_cache(maxsize=16)
def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_in, size_out) ``float64``: ``bilinear_taps`` as a matrix (a row of pixels times it: the integer sums)."""
    index, weights = bilinear_taps(size_in, size_out)
    matrix = np.zeros((size_in, size_out))
    for tap in range(index.shape[1]):
        np.add.at(matrix, (index[:, tap], np.arange(size_out)), weights[:, tap])
    return matrix


def _resample_last_axis(pictures: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    total = pictures @ matrix  # Pillow's integer sums, exactly (see the module's docstring)
    total += 1 << 21
    total *= 1.0 / (1 << 22)
    np.floor(total, out=total)
    return np.clip(total, 0, 255, out=total)


def resized(pictures: np.ndarray, side: int) -> np.ndarray:
    """(n, s, s) grey ``uint8`` pictures resized to ``side`` x ``side`` exactly as Pillow's BILINEAR
    ``Image.resize`` does (the same integer sums and roundings), as ``float32`` (whole numbers 0-255)."""
    size = pictures.shape[1]
    if size == side:
        return pictures.astype(np.float32)
    matrix = _bilinear_matrix(size, side)
    rows = _resample_last_axis(pictures.astype(np.float64), matrix)  # (n, size, side)
    columns = _resample_last_axis(rows.transpose(0, 2, 1), matrix)  # (n, side, side), transposed
    return columns.transpose(0, 2, 1).astype(np.float32)

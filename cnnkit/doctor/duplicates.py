"""Copies of an image: exact (same bytes) and near (re-encoded, resized, shifted, cropped, brightened).

Candidates come from the shared feature index (``cnnkit.neighbours``): each image's nearest
images by pretrained features. Features alone cannot tell a copy from a look-alike (Fashion-MNIST
holds many near-identical plain T-shirts that are different products), so each candidate pair is
checked on pixels:

1. **Detail correlation**: both images as 32 x 32 grey thumbnails, their fine detail kept
   (the thumbnail minus its Gaussian blur, sigma 1 px: stitching, print, texture; a look-alike
   shares the silhouette, not this), correlated at the best of +-3 px shifts and 1.0-1.3x
   zooms of either image (a shifted or slightly cropped copy lines up again).
2. **Uniqueness**: a copy matches its original far better than the original's next-best
   candidate does (``gap``); look-alikes come in crowds of similar scores.

A pair is a copy when its detail correlation is at least ``sure`` (0.97: near-identical pixels,
even when the original has several copies), or at least ``floor`` with a ``gap`` of at least
``gap`` to the next candidate. The thresholds were measured on planted copies among Fashion-MNIST's
look-alikes (``bench/doctor.py``, docs/doctor.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE = 32
SHIFT = 3
ZOOMS = (1.0, 1.1, 1.2, 1.3)


@dataclass(frozen=True)
class CopyThresholds:
    """When a candidate pair counts as a copy (see the module docstring)."""

    sure: float = 0.97
    floor: float = 0.80
    gap: float = 0.15


def detail(thumbnails: np.ndarray) -> np.ndarray:
    """Fine detail of (n, SIDE, SIDE) grey thumbnails: each minus its Gaussian blur (sigma 1 px)."""
    from scipy.ndimage import gaussian_filter

    pixels = np.asarray(thumbnails, np.float32)
    return pixels - gaussian_filter(pixels, sigma=(0, 1.0, 1.0))


def zoomed(thumbnail: np.ndarray, zoom: float) -> np.ndarray:
    """The centre 1/``zoom`` of a grey thumbnail (any side), resized to SIDE x SIDE."""
    from PIL import Image

    side = thumbnail.shape[0]
    keep = int(round(side / zoom))
    start = (side - keep) // 2
    picture = Image.fromarray(np.asarray(thumbnail, np.uint8)[start:start + keep, start:start + keep])
    return np.asarray(picture.resize((SIDE, SIDE), Image.Resampling.BILINEAR), np.float32)


def best_shift_correlation(first: np.ndarray, second: np.ndarray, shift: int = SHIFT) -> np.ndarray:
    """Per pair of (pairs, SIDE, SIDE) images: the highest normalised correlation over +-``shift`` px shifts."""
    best = np.full(len(first), -1.0, np.float32)
    side = first.shape[1]
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            a = first[:, max(0, dy):side + min(0, dy), max(0, dx):side + min(0, dx)]
            b = second[:, max(0, -dy):side + min(0, -dy), max(0, -dx):side + min(0, -dx)]
            a = a - a.mean(axis=(1, 2), keepdims=True)
            b = b - b.mean(axis=(1, 2), keepdims=True)
            denominator = np.sqrt((a * a).sum(axis=(1, 2)) * (b * b).sum(axis=(1, 2))) + 1e-6
            np.maximum(best, (a * b).sum(axis=(1, 2)) / denominator, out=best)
    return best


def copy_scores(thumbnails: np.ndarray, pairs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Detail correlation of each (i, j) row of ``pairs``, over shifts and zooms of either image.

    Args:
        thumbnails: (n, s, s) grey ``uint8`` thumbnails (s >= SIDE) of every image.
        pairs: (pairs, 2) indices into ``thumbnails``.
    """
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    involved = np.unique(pairs)
    where = {int(image): row for row, image in enumerate(involved)}
    views = {zoom: detail(np.stack([zoomed(thumbnails[i], zoom) for i in involved])) if len(involved)
             else np.zeros((0, SIDE, SIDE), np.float32) for zoom in ZOOMS}
    first = np.array([where[int(i)] for i in pairs[:, 0]], np.int64)
    second = np.array([where[int(j)] for j in pairs[:, 1]], np.int64)
    scores = np.full(len(pairs), -1.0, np.float32)
    for start in range(0, len(pairs), chunk):
        a, b = first[start:start + chunk], second[start:start + chunk]
        best = scores[start:start + chunk]
        for zoom in ZOOMS:
            np.maximum(best, best_shift_correlation(views[zoom][a], views[1.0][b]), out=best)
            if zoom != 1.0:
                np.maximum(best, best_shift_correlation(views[1.0][a], views[zoom][b]), out=best)
    return scores


@dataclass
class CopyMatch:
    """``copy`` is a copy of ``original`` (row indices), with its detail correlation and uniqueness gap."""

    copy: int
    original: int
    score: float
    gap: float


def find_copies(thumbnails: np.ndarray, queries: np.ndarray, candidates: np.ndarray,
                thresholds: CopyThresholds = CopyThresholds()) -> list[CopyMatch]:
    """For each query row, its candidate that is a copy of it, if any.

    Args:
        thumbnails: grey thumbnails of every image.
        queries: (q,) row indices.
        candidates: (q, k) row indices of each query's candidates (-1: none), nearest first.
    """
    queries = np.asarray(queries, np.int64)
    candidates = np.asarray(candidates, np.int64).reshape(len(queries), -1)
    valid = candidates >= 0
    pairs = np.stack([np.repeat(queries, candidates.shape[1]), candidates.ravel()], axis=1)[valid.ravel()]
    scores = np.full(candidates.shape, -1.0, np.float32)
    if len(pairs):
        scores[valid] = copy_scores(thumbnails, pairs)
    order = np.argsort(-scores, axis=1, kind="stable")
    best = np.take_along_axis(scores, order[:, :1], 1)[:, 0]
    second = np.take_along_axis(scores, order[:, 1:2], 1)[:, 0] if scores.shape[1] > 1 else np.full(len(best), -1.0)
    second = np.maximum(second, 0.0)
    matches = []
    for row, query in enumerate(queries):
        gap = float(best[row] - second[row])
        if best[row] >= thresholds.sure or (best[row] >= thresholds.floor and gap >= thresholds.gap):
            matches.append(CopyMatch(int(query), int(candidates[row, order[row, 0]]), float(best[row]), gap))
    return matches

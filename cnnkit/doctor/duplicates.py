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

3. **Fine alignment**: a look-alike can pass both (Fashion-MNIST's same product in a second
   photo), so the surviving pairs are aligned to a fraction of a pixel (scale and shift of the
   64 x 64 thumbnails, Nelder-Mead from the best point of a coarse grid) and their plain pixel
   correlation over the overlap must reach ``aligned``: a re-encoded, resized or shifted copy
   lines up to 0.989-1.000, the look-alikes measured to 0.957-0.987 (three at 0.990-0.992
   look like the same product photographed twice).

A pair is a copy when its detail correlation is at least ``sure`` (0.97: near-identical pixels,
even when the original has several copies), or at least ``floor`` with a ``gap`` of at least
``gap`` to the next candidate and an aligned correlation of at least ``aligned``. The thresholds
were measured on planted copies among Fashion-MNIST's look-alikes (``bench/doctor.py``,
docs/doctor.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE = 32
SHIFT = 3
ZOOMS = (1.0, 1.1, 1.2, 1.3)
# Candidates per query that get the full (zoomed) test.
SHORTLIST = 3


@dataclass(frozen=True)
class CopyThresholds:
    """When a candidate pair counts as a copy (see the module docstring)."""

    sure: float = 0.97
    floor: float = 0.80
    gap: float = 0.15
    aligned: float = 0.988


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


def copy_scores(thumbnails: np.ndarray, pairs: np.ndarray, chunk: int = 4096,
                zooms: tuple[float, ...] = ZOOMS) -> np.ndarray:
    """Detail correlation of each (i, j) row of ``pairs``, over shifts and ``zooms`` of either image.

    Args:
        thumbnails: (n, s, s) grey ``uint8`` thumbnails (s >= SIDE) of every image.
        pairs: (pairs, 2) indices into ``thumbnails``.
    """
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    involved = np.unique(pairs)
    where = {int(image): row for row, image in enumerate(involved)}
    views = {zoom: detail(np.stack([zoomed(thumbnails[i], zoom) for i in involved])) if len(involved)
             else np.zeros((0, SIDE, SIDE), np.float32) for zoom in {1.0, *zooms}}
    first = np.array([where[int(i)] for i in pairs[:, 0]], np.int64)
    second = np.array([where[int(j)] for j in pairs[:, 1]], np.int64)
    scores = np.full(len(pairs), -1.0, np.float32)
    for start in range(0, len(pairs), chunk):
        a, b = first[start:start + chunk], second[start:start + chunk]
        best = scores[start:start + chunk]
        for zoom in zooms:
            np.maximum(best, best_shift_correlation(views[zoom][a], views[1.0][b]), out=best)
            if zoom != 1.0:
                np.maximum(best, best_shift_correlation(views[1.0][a], views[zoom][b]), out=best)
    return scores


def _warp(image: np.ndarray, scale: float, dy: float, dx: float) -> np.ndarray:
    """``image`` scaled about its centre and shifted (px); NaN outside it."""
    from scipy.ndimage import affine_transform

    centre = (image.shape[0] - 1) / 2
    return affine_transform(image, np.array([1 / scale, 1 / scale]),
                            offset=[centre - (centre + dy) / scale, centre - (centre + dx) / scale],
                            order=1, mode="constant", cval=np.nan)


def _overlap_correlation(first: np.ndarray, warped: np.ndarray) -> float:
    inside = ~np.isnan(warped)
    if inside.sum() < 0.35 * first.size:
        return -1.0
    a, b = first[inside], warped[inside]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-6))


def aligned_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Pixel correlation of two grey thumbnails after aligning ``second`` to ``first`` (step 3 above)."""
    from scipy.optimize import minimize

    first = np.asarray(first, np.float32)
    second = np.asarray(second, np.float32)
    step = first.shape[0] / 32
    grid = [(scale, dy * step, dx * step) for scale in (0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
            for dy in range(-3, 4) for dx in range(-3, 4)]
    scores = [_overlap_correlation(first, _warp(second, *point)) for point in grid]
    start = np.array(grid[int(np.argmax(scores))])
    simplex = start + np.array([[0, 0, 0], [0.05, 0, 0], [0, step / 2, 0], [0, 0, step / 2]])
    result = minimize(lambda x: -_overlap_correlation(first, _warp(second, *x)), start, method="Nelder-Mead",
                      options={"xatol": 0.01, "fatol": 1e-5, "initial_simplex": simplex, "maxiter": 200})
    return max(float(-result.fun), max(scores))


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
    if not len(queries):
        return []
    candidates = np.asarray(candidates, np.int64).reshape(len(queries), -1)
    if candidates.shape[1] > SHORTLIST:
        # Shortlist: unzoomed detail correlation (a seventh of the cost) keeps each query's best few.
        valid = candidates >= 0
        pairs = np.stack([np.repeat(queries, candidates.shape[1]), candidates.ravel()], axis=1)[valid.ravel()]
        quick = np.full(candidates.shape, -2.0, np.float32)
        if len(pairs):
            quick[valid] = copy_scores(thumbnails, pairs, zooms=(1.0,))
        keep = np.argsort(-quick, axis=1, kind="stable")[:, :SHORTLIST]
        candidates = np.where(np.take_along_axis(quick, keep, 1) > -2.0, np.take_along_axis(candidates, keep, 1), -1)
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
        original = int(candidates[row, order[row, 0]])
        if best[row] < thresholds.sure and not (
                best[row] >= thresholds.floor and gap >= thresholds.gap
                and aligned_correlation(thumbnails[query], thumbnails[original]) >= thresholds.aligned):
            continue
        matches.append(CopyMatch(int(query), original, float(best[row]), gap))
    return matches

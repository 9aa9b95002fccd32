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
   64 x 64 thumbnails, Nelder-Mead from the best point of a coarse grid: ``cnnkit.doctor.alignment``,
   many pairs at once) and their plain pixel
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

import functools
from dataclasses import dataclass

import numpy as np

from cnnkit.doctor.alignment import aligned_correlations
from cnnkit.doctor.resampling import resized

SIDE = 32
SHIFT = 3
ZOOMS = (1.0, 1.1, 1.2, 1.3)
# Candidates per query that get the full (zoomed) test.
SHORTLIST = 3
# Pairs in a detail-correlation call before it is shared among processes (one per core).
PARALLEL_PAIRS = 4096


@dataclass(frozen=True)
class CopyThresholds:
    """When a candidate pair counts as a copy (see the module docstring)."""

    sure: float = 0.97
    floor: float = 0.80
    gap: float = 0.15
    aligned: float = 0.988
    # ``tries=k``: a query none of whose candidates passes the tests above has its ``k`` best
    # candidates of at least ``reach`` detail correlation aligned all the same, and one that lines up to
    # ``tried`` is a copy (leaks: a shifted plain garment scores 0.80-0.82 amid look-alikes at 0.87-0.89
    # and aligns at 0.999; look-alikes measured up to 0.992).
    reach: float = 0.75
    tried: float = 0.995
    # Candidates aligned per query that fails the tests above (1: none), and the candidates per query, best by
    # the unzoomed detail correlation, that get the zoomed test (None: all).
    tries: int = 1
    shortlist: int | None = SHORTLIST


# Leaks (a held-out image against its nearest training images), stricter on the few that matter most:
# - a detail floor of 0.75: a copy saved at 20 px keeps 0.80 of the detail and a cropped one 0.77-0.81
#   (bench/doctor.py), and among held-out images the uniqueness gap and the alignment decide;
# - every candidate zoomed (no short list): a copy cropped 1-3 px a side scores 0.40 unzoomed and
#   0.77-0.89 zoomed, so a short list by the unzoomed score dropped it (8 of stop 35's 14 misses);
# - the best 4 aligned when none passes outright (a shifted plain garment amid look-alikes).
LEAK_THRESHOLDS = CopyThresholds(floor=0.75, tries=4, shortlist=None)


def detail(thumbnails: np.ndarray) -> np.ndarray:
    """Fine detail of (n, h, w) grey thumbnails: each minus its Gaussian blur (sigma 1 px).

    The blur is scipy's ``gaussian_filter`` (reflecting edges) as two small matrix products, along the
    columns then the rows: 2.5x faster on 4,096 32 x 32 views, the same values to float32 rounding.
    """
    pixels = np.asarray(thumbnails, np.float32)
    count, height, width = pixels.shape
    along_rows = (pixels.reshape(-1, width) @ _blur_matrix(width).T).reshape(pixels.shape)
    return pixels - np.matmul(_blur_matrix(height), along_rows)


@functools.lru_cache(maxsize=8)
def _blur_matrix(size: int) -> np.ndarray:
    """(size, size): ``gaussian_filter1d(x, 1.0)`` of a length-``size`` signal ``x`` is this matrix times ``x``."""
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(np.eye(size), 1.0, axis=0).astype(np.float32)


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


def _window_masks(side: int = SIDE, shift: int = SHIFT) -> np.ndarray:
    """(shifts, side * side) 0/1: where the shifted first image overlaps the second, per shift.

    Shift ``(dy, dx)`` (row-major over -``shift``..``shift``) pairs ``first[y + dy, x + dx]``
    with ``second[y, x]``: the mask marks the ``(y, x)`` of ``second`` whose partner is inside.
    """
    ones = np.pad(np.ones((side, side), np.float32), shift)
    windows = np.lib.stride_tricks.sliding_window_view(ones, (side, side))
    return windows.reshape(-1, side * side).copy()


def _shifted(views: np.ndarray, shift: int = SHIFT) -> np.ndarray:
    """(m, shifts, side * side): each view's zero-padded windows, one per shift (see ``_window_masks``)."""
    side = views.shape[1]
    padded = np.pad(views, ((0, 0), (shift, shift), (shift, shift)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (side, side), axis=(1, 2))
    return windows.reshape(len(views), -1, side * side)


def _window_stats(views: np.ndarray, masks: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m, shifts) sum, mean and root of the summed squared deviations of each of (m, SIDE, SIDE)
    ``views`` over each overlap mask: once per image, not once per pair it is in."""
    count = masks.sum(axis=1).astype(np.float64)
    sums = np.empty((len(views), len(masks)))
    squares = np.empty((len(views), len(masks)))
    for start in range(0, len(views), chunk):
        flat = views[start:start + chunk].reshape(-1, masks.shape[1])
        sums[start:start + chunk] = flat @ masks.T
        squares[start:start + chunk] = (flat * flat) @ masks.T
    return sums, sums / count, np.sqrt(np.maximum(squares - sums * sums / count, 0.0))


def _overlap_stats(views: dict, pairings: list[tuple[float, float]]) -> tuple[dict, dict]:
    """``_window_stats`` of the ``views`` as first images (over the mirrored overlaps) and as second
    ones, per zoom of ``pairings``: what ``_grouped_best`` reads. A zoom on both sides is read once."""
    masks = _window_masks(SIDE)  # (shifts, p): second's pixels in each overlap
    first_masks = np.ascontiguousarray(masks[::-1])  # first's pixels in each overlap (the mirrored shift)
    shifts = len(masks)
    a_zooms, b_zooms = {za for za, _ in pairings}, {zb for _, zb in pairings}
    first_stats, second_stats = {}, {}
    for z in a_zooms | b_zooms:
        sides = [first_masks] * (z in a_zooms) + [masks] * (z in b_zooms)
        sums, means, norms = _window_stats(views[z], np.concatenate(sides))
        if z in a_zooms:
            first_stats[z] = sums[:, :shifts], means[:, :shifts], norms[:, :shifts]
        if z in b_zooms:
            second_stats[z] = sums[:, -shifts:], means[:, -shifts:], norms[:, -shifts:]
    return first_stats, second_stats


def _grouped_best(views: dict, pairings: list[tuple[float, float]], groups: np.ndarray,
                  partners: np.ndarray, chunk: int = 48, stats: tuple[dict, dict] | None = None) -> np.ndarray:
    """Best normalised correlation over shifts and ``pairings`` (zoom of first, zoom of second).

    ``views[z]``: (m, SIDE, SIDE) detail views; ``groups`` (g,) rows of ``views`` (the first images),
    ``partners`` (g, k) rows (the second images). Returns (g, k). The same number as correlating the
    overlapping parts of every shifted pair (``best_shift_correlation``), computed as one
    matrix product per group: the overlap sums come from zero padding, the means and norms of
    each overlap from per-image window sums (``stats``: ``_overlap_stats`` if already made).
    """
    a_zooms = sorted({za for za, _ in pairings})
    b_zooms = sorted({zb for _, zb in pairings})
    first_stats, second_stats = stats or _overlap_stats(views, pairings)

    def share(bounds: tuple[int, int]) -> np.ndarray:
        best = np.full((bounds[1] - bounds[0], partners.shape[1]), -1.0, np.float32)
        for start in range(bounds[0], bounds[1], chunk):
            stop = min(start + chunk, bounds[1])
            rows, cols = groups[start:stop], partners[start:stop]
            flat = {z: views[z][cols].reshape(len(rows), cols.shape[1], -1) for z in b_zooms}  # (c, k, p)
            out = best[start - bounds[0]:stop - bounds[0]]
            for za in a_zooms:
                shifted = _shifted(views[za][rows]).transpose(0, 2, 1)  # (c, p, shifts)
                a_mean, a_norm = (first_stats[za][i][rows][:, None, :] for i in (1, 2))  # (c, 1, shifts)
                for zb in [zb for z, zb in pairings if z == za]:
                    products = np.matmul(flat[zb], shifted).astype(np.float64)  # (c, k, shifts)
                    b_sum, b_norm = (second_stats[zb][i][cols] for i in (0, 2))  # (c, k, shifts)
                    products -= a_mean * b_sum
                    products /= a_norm * b_norm + 1e-6
                    np.maximum(out, products.max(axis=2).astype(np.float32), out=out)
        return best

    from cnnkit.forked import cores, forked_map

    # Past a few thousand pairs, one share of the groups per core (forked processes).
    workers = cores() if partners.size >= PARALLEL_PAIRS else 1
    edges = np.linspace(0, len(groups), workers + 1).astype(int)
    return np.concatenate(forked_map(share, list(zip(edges[:-1], edges[1:])), workers))


def zoomed_thumbnails(thumbnails: np.ndarray) -> np.ndarray:
    """(n, len(ZOOMS), SIDE, SIDE) ``uint8``: the centre 1/zoom of each grey thumbnail (any side) at each of
    ``ZOOMS``, resized to SIDE x SIDE as Pillow's BILINEAR resize does, all at once (the same
    pixels: Pillow's arithmetic, ``resampling.resized``; 55 us a 64 px thumbnail on one core, against Pillow's 120)."""
    thumbnails = np.asarray(thumbnails, np.uint8)
    out = np.empty((len(thumbnails), len(ZOOMS), SIDE, SIDE), np.uint8)
    for column, zoom in enumerate(ZOOMS):
        out[:, column] = zoomed_centres(thumbnails, zoom)
    return out


def zoomed_centres(thumbnails: np.ndarray, zoom: float, rows: np.ndarray | None = None, chunk: int = 128) -> np.ndarray:
    """(len(rows), SIDE, SIDE) ``uint8``: one column of ``zoomed_thumbnails``, for ``thumbnails[rows]`` (``None``:
    every row), gathered a chunk at a time."""
    count = len(thumbnails) if rows is None else len(rows)
    out = np.empty((count, SIDE, SIDE), np.uint8)
    side = thumbnails.shape[1] if np.ndim(thumbnails) == 3 else SIDE
    keep = int(round(side / zoom))
    start = (side - keep) // 2
    for first in range(0, count, chunk):
        picked = slice(first, first + chunk) if rows is None else rows[first:first + chunk]
        crop = np.asarray(thumbnails[picked], np.uint8)[:, start:start + keep, start:start + keep]
        out[first:first + chunk] = resized(crop, SIDE)
    return out


def zoom_views(thumbnails: np.ndarray, rows: np.ndarray, zooms, zoomed: np.ndarray | None = None) -> dict:
    """{zoom: (len(rows), SIDE, SIDE) detail views of ``zoomed_thumbnails(thumbnails[rows])`` at ``zoom``}.

    ``zoomed``: ``zoomed_thumbnails`` of every row of ``thumbnails`` already made (cached by
    ``cnnkit.doctor.pixels``), or ``None``: made here.
    """
    rows = np.asarray(rows, np.int64)
    views = {}
    for zoom in zooms:
        pictures = zoomed[rows, ZOOMS.index(zoom)] if zoomed is not None else zoomed_centres(thumbnails, zoom, rows, 512)
        views[zoom] = np.concatenate([detail(pictures[first:first + 4096]) for first in range(0, len(rows), 4096)]) \
            if len(rows) else np.zeros((0, SIDE, SIDE), np.float32)
    return views


def pair_scores(views: dict, pairings: list[tuple[float, float]], pairs: np.ndarray) -> np.ndarray:
    """Best normalised correlation of each (i, j) row of ``pairs`` (rows of ``views``) over shifts and
    ``pairings``, a set that holds (b, a) with every (a, b) (``_grouped_best``).

    With such a set (i, j) scores what (j, i) scores (a shift of one image is the opposite shift of the
    other), so each unordered pair is computed once, as a partner of whichever of its two images is in
    more pairs: one matrix product per such image, and the groups of similar size together. On the
    near-duplicate search of 60,000 images that is 18,196 groups and 51,740 pairs instead of 32,408 and
    69,509 (docs/doctor.md).
    """
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if not len(pairs):
        return np.zeros(0, np.float32)
    unique, inverse = np.unique(np.sort(pairs, axis=1), axis=0, return_inverse=True)
    degree = np.bincount(unique.ravel())
    swap = degree[unique[:, 1]] > degree[unique[:, 0]]
    first, second = np.where(swap, unique[:, 1], unique[:, 0]), np.where(swap, unique[:, 0], unique[:, 1])
    order = np.argsort(first, kind="stable")
    groups, begin, sizes = np.unique(first[order], return_index=True, return_counts=True)
    scores = np.empty(len(unique), np.float32)
    stats = _overlap_stats(views, pairings)
    # Groups padded to the widest of their size class (1, 2, 3-4, 5-8, ...) with repeats, dropped after.
    size_class = np.ceil(np.log2(sizes)).astype(np.int64)
    for members in (np.flatnonzero(size_class == c) for c in np.unique(size_class)):
        width = int(sizes[members].max())
        slot = np.minimum(np.arange(width)[None, :], sizes[members, None] - 1)  # (g, width): repeats the last
        positions = order[begin[members, None] + slot]
        best = _grouped_best(views, pairings, groups[members], second[positions], stats=stats)
        scores[positions] = best  # repeats write the same value again
    return scores[inverse.reshape(-1)]


def copy_scores(thumbnails: np.ndarray, pairs: np.ndarray, zooms: tuple[float, ...] = ZOOMS,
                views: dict | None = None) -> np.ndarray:
    """Detail correlation of each (i, j) row of ``pairs``, over shifts and ``zooms`` of either image.

    Args:
        thumbnails: (n, s, s) grey ``uint8`` thumbnails (s >= SIDE) of every image.
        pairs: (pairs, 2) indices into ``thumbnails``.
        views: ``zoom_views`` of every row of ``thumbnails`` already made (``None``: made here
            for the images of ``pairs``).
    """
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if not len(pairs):
        return np.zeros(0, np.float32)
    if views is None:
        involved = np.unique(pairs)
        views = zoom_views(thumbnails, involved, {1.0, *zooms})
        pairs = np.searchsorted(involved, pairs)
    pairings = [(zoom, 1.0) for zoom in zooms] + [(1.0, zoom) for zoom in zooms if zoom != 1.0]
    return pair_scores(views, pairings, pairs)


@dataclass
class CopyMatch:
    """``copy`` is a copy of ``original`` (row indices), with its detail correlation and uniqueness gap."""

    copy: int
    original: int
    score: float
    gap: float


def find_copies(thumbnails: np.ndarray, queries: np.ndarray, candidates: np.ndarray,
                thresholds: CopyThresholds = CopyThresholds(), stats: dict | None = None,
                zoomed: np.ndarray | None = None, sizes: np.ndarray | None = None) -> list[CopyMatch]:
    """For each query row, its candidate that is a copy of it, if any.

    Args:
        thumbnails: grey thumbnails of every image.
        queries: (q,) row indices.
        candidates: (q, k) row indices of each query's candidates (-1: none), nearest first.
        stats: if given, filled with how many pairs each step tested (for benchmarks).
        zoomed: ``zoomed_thumbnails(thumbnails)`` if already made (``None``: made here, for the
            images the test needs).
        sizes: (n, 2) native width and height of every image, if known: a copy saved smaller than
            its original is aligned at its own resolution (``aligned_correlations``).
        thresholds: the tests, and with them how far the search goes: ``tries`` candidates aligned
            per query whose best fails the detail and uniqueness tests (``reach`` and ``tried``; 1:
            none), and the ``shortlist`` of candidates per query, best by the unzoomed detail
            correlation, that get the zoomed test (``None``: all; a slightly cropped copy correlates
            poorly unzoomed, 0.40 against 0.87 zoomed, docs/doctor.md, so a short list can drop it).
            ``LEAK_THRESHOLDS`` is the profile for held-out images.
    """
    queries = np.asarray(queries, np.int64)
    if not len(queries):
        return []
    from threadpoolctl import threadpool_limits

    # Small matrix products only: one BLAS thread runs them 3-9x faster than two on two busy
    # cores (threads spinning for each other), and no slower on idle ones.
    with threadpool_limits(limits=1, user_api="blas"):
        return _find_copies(thumbnails, queries, candidates, thresholds, stats, zoomed, sizes)


def _find_copies(thumbnails, queries, candidates, thresholds, stats, zoomed, sizes) -> list[CopyMatch]:
    tries, shortlist = thresholds.tries, thresholds.shortlist
    candidates = np.asarray(candidates, np.int64).reshape(len(queries), -1)
    valid = candidates >= 0
    involved, local = np.unique(np.concatenate([queries, candidates[valid]]), return_inverse=True)
    local_queries = local[:len(queries)]
    local_candidates = np.full(candidates.shape, -1, np.int64)
    local_candidates[valid] = local[len(queries):]
    rows = np.flatnonzero(valid.any(axis=1))
    if stats is not None:
        stats.update(pairs=int(valid.sum()), queries=len(queries))
    if not len(rows):
        return []
    queries, candidates, valid = queries[rows], candidates[rows], valid[rows]
    local_queries, local_candidates = local_queries[rows], local_candidates[rows]
    quick = np.full(candidates.shape, -2.0, np.float32)
    views = {}
    zoomed_pairings = [(zoom, 1.0) for zoom in ZOOMS if zoom != 1.0] + [(1.0, zoom) for zoom in ZOOMS if zoom != 1.0]
    if shortlist is not None and candidates.shape[1] > shortlist:
        # First step on every pair: unzoomed detail correlation, a seventh of the full test (and one of its
        # pairings: the full score is at least this); each query's best few by it get the full test.
        views = zoom_views(thumbnails, involved, (1.0,), zoomed)
        partners = np.where(valid, local_candidates, local_candidates.max(axis=1, keepdims=True))
        quick = np.where(valid, _grouped_best(views, [(1.0, 1.0)], local_queries, partners), -2.0)
        keep = np.argsort(-quick, axis=1, kind="stable")[:, :shortlist]
        quick = np.take_along_axis(quick, keep, 1)
        candidates = np.where(quick > -2.0, np.take_along_axis(candidates, keep, 1), -1)
        local_candidates = np.where(quick > -2.0, np.take_along_axis(local_candidates, keep, 1), -1)
        valid = candidates >= 0
        pairings = zoomed_pairings
    else:  # no short list: every pairing in one pass
        pairings = [(1.0, 1.0)] + zoomed_pairings
    # The full test (the pairings not yet computed), on the images still in play only.
    needed = np.unique(np.concatenate([local_queries, local_candidates[valid]]))
    views = {**{zoom: view[needed] for zoom, view in views.items()},
             **zoom_views(thumbnails, involved[needed], [z for z in ZOOMS if z not in views], zoomed)}
    full = np.full(candidates.shape, -1.0, np.float32)
    full[valid] = pair_scores(views, pairings, np.searchsorted(needed, np.stack(
        [np.repeat(local_queries, valid.sum(axis=1)), local_candidates[valid]], axis=1)))
    scores = np.where(valid, np.maximum(quick, full), -1.0).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")
    best = np.take_along_axis(scores, order[:, :1], 1)[:, 0]
    second = np.take_along_axis(scores, order[:, 1:2], 1)[:, 0] if scores.shape[1] > 1 else np.full(len(best), -1.0)
    second = np.maximum(second, 0.0)
    gaps = best - second
    sure = best >= thresholds.sure
    unsure = ~sure & (best >= thresholds.floor) & (gaps >= thresholds.gap)
    # (row, rank in the row's order, score to reach, a try) of every pair to align: the best of each unsure
    # row, and with ``tries`` the best few of the rows that failed both tests.
    jobs = [(row, 0, thresholds.aligned, False) for row in np.flatnonzero(unsure)]
    if tries > 1:
        ranked = np.take_along_axis(scores, order, 1)
        for row in np.flatnonzero(~sure & ~unsure):
            jobs += [(row, rank, thresholds.tried, True) for rank in range(min(tries, scores.shape[1]))
                     if ranked[row, rank] >= thresholds.reach]
    pairs = np.array([(queries[row], candidates[row, order[row, rank]]) for row, rank, _, _ in jobs],
                     np.int64).reshape(-1, 2)
    # Each pair stops at the score its job needs: a try stopped at ``aligned`` could fall short of ``tried``.
    # The tries are screened on halved thumbnails first (nearly all are look-alikes; ``aligned_correlations``):
    # the zoom-1.0 centres are those thumbnails when the thumbnails are twice their side.
    halves = zoomed[:, ZOOMS.index(1.0)] if zoomed is not None and thumbnails.shape[1] == 2 * SIDE else None
    aligned = aligned_correlations(thumbnails, pairs, np.array([job[2] for job in jobs]), sizes=sizes,
                                   screened=np.array([job[3] for job in jobs], bool), halves=halves)
    chosen = {row: 0 for row in np.flatnonzero(sure)}
    for (row, rank, needed, _), score in zip(jobs, aligned):
        if score >= needed and row not in chosen:  # a row's jobs come best first
            chosen[row] = rank
    if stats is not None:
        stats.update(full=int(valid.sum()), aligned=len(jobs))
    matches = []
    for row in sorted(chosen):
        column = order[row, chosen[row]]
        score = float(scores[row, column])
        # A later candidate's gap is to the best one (negative): it is a copy by its alignment alone.
        runner_up = float(best[row]) if chosen[row] else max(float(second[row]), 0.0)
        matches.append(CopyMatch(int(queries[row]), int(candidates[row, column]), score, score - runner_up))
    return matches



"""Subpixel alignment of candidate copies: the last test of ``cnnkit.doctor.duplicates`` (its step 3).

Two grey thumbnails of the same side are compared after warping the second onto the first
(scaled about the centre by ``scale``, shifted by ``dy, dx`` px, bilinear, as
``scipy.ndimage.affine_transform(order=1)`` does): the score is the plain pixel correlation over
the part the warp covers (-1 below 35 % of the image). The best warp is searched the way it was
measured (docs/doctor.md): a coarse grid (``SCALES`` x +-3 thumbnail steps of shift), then
Nelder-Mead from its best point, or from where a search of the same pair halved ended (scipy's
algorithm and settings: the initial simplex a twentieth of a scale and half a step of shift,
``xatol`` 0.01, ``fatol`` 1e-5, 200 iterations).

All of it runs on many pairs at once (numpy arrays of pairs, not a Python loop per pair): the
grid as one warp per scale onto a wider canvas whose windows are the shifted warps; each
Nelder-Mead step as one batch of warps for every pair still searching (``_nelder_mead``, the same
reflect / expand / contract / shrink decisions as ``scipy.optimize.minimize(method="Nelder-Mead")``,
pair by pair). At 60,000 Fashion-MNIST images this took the leak search's 12,457 alignments from
157 s (a scipy minimisation per pair, two processes) to the figure in docs/doctor.md.
"""

from __future__ import annotations

import numpy as np

SCALES = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
SHIFTS = 3  # grid shifts each way, in thumbnail steps (side / 32 px)
COVERED = 0.35  # the least share of the first image the warp must cover
# Pairs aligned together: their arrays are about 200 KB a pair (100 MB a batch).
BATCH = 512
# Warps evaluated together: their temporaries (16 KB a 64 x 64 warp) then stay in the core's cache.
EVALUATIONS = 128


def _taps(size: int, scale: np.ndarray, shift: np.ndarray, out: int | None = None):
    """Bilinear taps along one axis of each warp: (m, out) low and high input index, their weights,
    and the first and one-past-last output index inside the input (a contiguous run). ``out``: the
    output's length (default ``size``; longer: the warp onto a wider canvas, ``_Pairs.grid``)."""
    centre = (size - 1) / 2
    coordinate = np.arange(out or size, dtype=np.float64)[None, :] / scale[:, None] \
        + (centre - (centre + shift[:, None]) / scale[:, None])
    inside = (coordinate >= 0) & (coordinate <= size - 1)
    low = np.clip(np.floor(coordinate), 0, size - 1).astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    fraction = np.where(inside, coordinate - low, 0.0)
    present = inside.any(axis=1)
    start = np.where(present, inside.argmax(axis=1), 0)
    stop = np.where(present, inside.shape[1] - inside[:, ::-1].argmax(axis=1), 0)
    return (low, high, np.where(inside, 1.0 - fraction, 0.0).astype(np.float32), fraction.astype(np.float32),
            start, stop)


def _correlation(product, sum_a, square_a, sum_b, square_b, count, side: int) -> np.ndarray:
    safe = np.maximum(count, 1.0)
    centred = product - sum_a * sum_b / safe
    spread_a = np.maximum(square_a - sum_a * sum_a / safe, 0.0)
    spread_b = np.maximum(square_b - sum_b * sum_b / safe, 0.0)
    score = np.clip(centred / (np.sqrt(spread_a * spread_b) + 1e-6), -1.0, 1.0)
    # Too little overlap, or a flat warp (no pattern to correlate: the ratio would be rounding noise).
    return np.where((count < COVERED * side * side) | (spread_b < 1e-3 * safe), -1.0, score)


class _Pairs:
    """``first[i]`` against ``second[i]`` warped, for many pairs and points at once.

    Both are centred on their own mean first (a correlation does not change, and the sums below then
    lose no precision); sums over the covered rectangle of ``first`` come from integral images.
    """

    def __init__(self, first: np.ndarray, second: np.ndarray):
        first = np.asarray(first, np.float32)
        second = np.asarray(second, np.float32)
        self.first = first - first.mean(axis=(1, 2), keepdims=True)
        self.second = second - second.mean(axis=(1, 2), keepdims=True)
        self.pairs, self.side = first.shape[0], first.shape[1]
        self._rows = np.ascontiguousarray(self.second).reshape(-1, self.side)
        self._first_columns = np.ascontiguousarray(self.first.transpose(0, 2, 1)).reshape(self.pairs, -1)
        self._ones = np.ones((self.side * self.side, 1), np.float32)
        a = self.first.astype(np.float64)
        self._integral = np.zeros((2, self.pairs, self.side + 1, self.side + 1))
        self._integral[0, :, 1:, 1:] = a.cumsum(axis=1).cumsum(axis=2)
        self._integral[1, :, 1:, 1:] = (a * a).cumsum(axis=1).cumsum(axis=2)

    def _first_sums(self, rows, top, bottom, left, right) -> np.ndarray:
        """(2, ...): the sum and the sum of squares of first image ``rows`` over its rows ``top:bottom``
        and columns ``left:right`` (from the integral images; the arguments broadcast)."""
        table = self._integral
        return table[:, rows, bottom, right] - table[:, rows, top, right] - table[:, rows, bottom, left] \
            + table[:, rows, top, left]

    def __call__(self, points: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores of pair ``rows[i]`` at ``points[i]`` = (scale, dy, dx)."""
        if len(rows) > EVALUATIONS:
            return np.concatenate([self._scores(points[start:start + EVALUATIONS], rows[start:start + EVALUATIONS])
                                   for start in range(0, len(rows), EVALUATIONS)])
        return self._scores(points, rows)

    def _scores(self, points: np.ndarray, rows: np.ndarray) -> np.ndarray:
        side = self.side
        m = len(rows)
        if not m:
            return np.zeros(0)
        low, high, w_low, w_high, top, bottom = _taps(side, points[:, 0], points[:, 1])
        c_low, c_high, c_w_low, c_w_high, left, right = _taps(side, points[:, 0], points[:, 2])
        base = (rows * side)[:, None]
        # Rows first (whole image rows gathered), then the columns of the transposed result; in place
        # (each temporary of this size costs about as much as the arithmetic).
        along_rows = self._rows[base + low]
        along_rows *= w_low[:, :, None]
        other = self._rows[base + high]
        other *= w_high[:, :, None]
        along_rows += other
        columns = np.ascontiguousarray(along_rows.transpose(0, 2, 1)).reshape(-1, side)
        base = (np.arange(m) * side)[:, None]
        warped = columns[base + c_low]  # (m, x, y): transposed, zero outside
        warped *= c_w_low[:, :, None]
        other = columns[base + c_high]
        other *= c_w_high[:, :, None]
        warped += other
        warped = warped.reshape(m, 1, -1)
        # Sums as BLAS matrix products (float32 sums of centred pixels: about 1e-7 of the score).
        product = np.matmul(warped, self._first_columns[rows][:, :, None])[:, 0, 0].astype(np.float64)
        square_b = np.matmul(warped, warped.transpose(0, 2, 1))[:, 0, 0].astype(np.float64)
        sum_b = np.matmul(warped, self._ones)[:, 0, 0].astype(np.float64)
        rectangle = self._first_sums(rows, top, bottom, left, right)
        count = ((bottom - top) * (right - left)).astype(np.float64)
        return _correlation(product, rectangle[0], rectangle[1], sum_b, square_b, count, side)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(pairs, points) scores on the coarse grid and the (points, 3) grid, scale-major then dy, dx."""
        side = self.side
        step = side / 32
        points = np.array([(scale, dy * step, dx * step) for scale in SCALES
                           for dy in range(-SHIFTS, SHIFTS + 1) for dx in range(-SHIFTS, SHIFTS + 1)])
        if step != int(step):
            rows = np.repeat(np.arange(self.pairs), len(points))
            return self(np.tile(points, (self.pairs, 1)), rows).reshape(self.pairs, -1), points
        step = int(step)
        pad = SHIFTS * step
        wide = side + 2 * pad
        count = self.pairs
        scores = np.empty((count, len(SCALES), 2 * SHIFTS + 1, 2 * SHIFTS + 1))
        # Shift i's window starts ``starts[i]`` canvas rows (and columns) in: pad - dy for dy = -3 .. 3 steps.
        starts = np.arange(0, 2 * pad + 1, step)[::-1]
        band = np.zeros((len(starts), wide), np.float32)  # band[i]: the canvas rows of shift i's window
        for i, start in enumerate(starts):
            band[i, start:start + side] = 1.0
        first_columns = self._first_columns.reshape(count, side, side)  # first, transposed
        for index, scale in enumerate(SCALES):
            # The warp at shift 0 onto a canvas ``pad`` px wider each side, as a (wide, side) interpolation
            # matrix: canvas = warp @ second @ warp.T, made transposed by two large matrix products.
            (low,), (high,), (w_low,), (w_high,), (top,), (bottom,) = _taps(side, np.array([scale]), np.array([pad]), wide)
            warp = np.zeros((wide, side), np.float32)
            warp[np.arange(wide), low] = w_low
            warp[np.arange(wide), high] += w_high
            half = (self._rows @ warp.T).reshape(count, side, wide)  # second @ warp.T
            canvas = (np.ascontiguousarray(half.transpose(0, 2, 1)).reshape(-1, side) @ warp.T).reshape(count, wide, wide)
            # canvas[x, y] (transposed): shift (dy, dx) is the window at (starts[dx], starts[dy]).
            windows = np.lib.stride_tricks.sliding_window_view(canvas, (side, side), axis=(1, 2))[:, ::step, ::step][:, ::-1, ::-1]
            # Summed in float32 (the images are centred: about 1e-7 of the score).
            product = np.einsum("pbaxy,pxy->pab", windows, first_columns).astype(np.float64)
            sums = np.matmul(band, (canvas.reshape(-1, wide) @ band.T).reshape(count, wide, -1)).transpose(0, 2, 1)
            squares = np.matmul(band, ((canvas * canvas).reshape(-1, wide) @ band.T).reshape(count, wide, -1)).transpose(0, 2, 1)
            # The first image's rows (and columns) under shift i's window that the warp covers.
            low_edge = np.clip(top - starts, 0, side)
            high_edge = np.clip(bottom - starts, 0, side)
            covered = (high_edge - low_edge).astype(np.float64)
            rectangle = self._first_sums(np.arange(count)[:, None, None], low_edge[:, None], high_edge[:, None],
                                         low_edge[None, :], high_edge[None, :])  # (2, pairs, shifts, shifts)
            scores[:, index] = _correlation(product, rectangle[0], rectangle[1], sums.astype(np.float64),
                                            squares.astype(np.float64), covered[:, None] * covered[None, :], side)
        return scores.reshape(self.pairs, -1), points


def _nelder_mead(objective, simplex: np.ndarray, xatol: float, fatol: float, maxiter: int,
                 stop: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ``objective(points, rows)`` from each row's ``simplex`` ((m, 4, 3)): scipy's
    Nelder-Mead (not adaptive), step for step, for every row at once. Returns each row's best value
    and its point.

    ``stop`` (m,): a row whose best value gets down to it stops there (its value only falls further).
    """
    m, corners, _ = simplex.shape
    n = corners - 1
    rows = np.arange(m)
    simplex = simplex.copy()
    values = objective(simplex.reshape(-1, n), np.repeat(rows, corners)).reshape(m, corners)
    order = np.argsort(values, axis=1)
    simplex, values = np.take_along_axis(simplex, order[:, :, None], 1), np.take_along_axis(values, order, 1)
    active = np.arange(m)
    for _ in range(maxiter - 1):
        s, v = simplex[active], values[active]
        done = (np.abs(s[:, 1:] - s[:, :1]).max(axis=(1, 2)) <= xatol) & (np.abs(v[:, :1] - v[:, 1:]).max(axis=1) <= fatol)
        if stop is not None:
            done |= v[:, 0] <= stop[active]
        active, s, v = active[~done], s[~done], v[~done]
        if not len(active):
            break
        centroid = s[:, :-1].sum(axis=1) / n
        worst = s[:, -1]
        reflected = 2 * centroid - worst
        f_reflected = objective(reflected, active)
        new_point, new_value = worst.copy(), v[:, -1].copy()
        shrink = np.zeros(len(active), bool)
        # Better than the best: try expanding.
        expand = f_reflected < v[:, 0]
        if expand.any():
            expanded = 3 * centroid[expand] - 2 * worst[expand]
            f_expanded = objective(expanded, active[expand])
            take = f_expanded < f_reflected[expand]
            new_point[expand] = np.where(take[:, None], expanded, reflected[expand])
            new_value[expand] = np.where(take, f_expanded, f_reflected[expand])
        # Better than the second worst: take the reflection.
        accept = ~expand & (f_reflected < v[:, -2])
        new_point[accept], new_value[accept] = reflected[accept], f_reflected[accept]
        # Otherwise contract, outside (better than the worst) or inside; shrink when that fails too.
        outside = ~expand & ~accept & (f_reflected < v[:, -1])
        if outside.any():
            contracted = 1.5 * centroid[outside] - 0.5 * worst[outside]
            f_contracted = objective(contracted, active[outside])
            take = f_contracted <= f_reflected[outside]
            where = np.flatnonzero(outside)
            new_point[where[take]], new_value[where[take]] = contracted[take], f_contracted[take]
            shrink[where[~take]] = True
        inside = ~expand & ~accept & ~outside
        if inside.any():
            contracted = 0.5 * centroid[inside] + 0.5 * worst[inside]
            f_contracted = objective(contracted, active[inside])
            take = f_contracted < v[inside, -1]
            where = np.flatnonzero(inside)
            new_point[where[take]], new_value[where[take]] = contracted[take], f_contracted[take]
            shrink[where[~take]] = True
        s[:, -1], v[:, -1] = new_point, new_value
        if shrink.any():
            shrunk = s[shrink, :1] + 0.5 * (s[shrink, 1:] - s[shrink, :1])
            s[shrink, 1:] = shrunk
            v[shrink, 1:] = objective(shrunk.reshape(-1, n), np.repeat(active[shrink], n)).reshape(-1, n)
        order = np.argsort(v, axis=1)
        simplex[active] = np.take_along_axis(s, order[:, :, None], 1)
        values[active] = np.take_along_axis(v, order, 1)
    return values[:, 0], simplex[:, 0]


def aligned_scores(first: np.ndarray, second: np.ndarray, enough: float | np.ndarray | None = None,
                   start: np.ndarray | None = None) -> np.ndarray:
    """The best aligned correlation of each ``(first[i], second[i])`` pair of (P, s, s) grey thumbnails.

    ``enough``: a pair whose coarse grid already reaches it (one for all, or one per pair) keeps the
    grid's score, and one whose fine search reaches it stops there (the search only raises the score, so
    a caller comparing with ``enough`` gets the same answer for less: on the 12,230 screened tries of
    the 60,000-image leak search, the 44 % that reach their bar stop early).

    ``start``: (P, 3) points (scale, dy, dx in px of this side) where a coarser search of the same pairs
    ended (``aligned_search``): the fine search starts there instead of from the coarse grid's best.
    """
    return aligned_search(first, second, enough, start)[0]


def aligned_search(first: np.ndarray, second: np.ndarray, enough: float | np.ndarray | None = None,
                   start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``aligned_scores``, and the (P, 3) point (scale, dy, dx) where each pair's score was found."""
    first = np.asarray(first, np.float32)
    second = np.asarray(second, np.float32)
    if first.shape != second.shape or first.ndim != 3 or first.shape[1] != first.shape[2]:
        raise ValueError(f"aligned_scores takes two (pairs, s, s) stacks of square thumbnails, not {first.shape} "
                         f"and {second.shape}")
    out = np.empty(len(first))
    where = np.zeros((len(first), 3))
    if not len(first):
        return out, where
    settle = np.full(len(first), np.inf) if enough is None else np.broadcast_to(np.asarray(enough, np.float64), len(first))
    for begin in range(0, len(first), BATCH):
        pairs = _Pairs(first[begin:begin + BATCH], second[begin:begin + BATCH])
        if start is None:
            scores, points = pairs.grid()
            best = scores.argmax(axis=1)
            coarse, origin = scores[np.arange(pairs.pairs), best], points[best]
        else:
            origin = np.asarray(start[begin:begin + BATCH], np.float64)
            coarse = pairs(origin, np.arange(pairs.pairs))
        out[begin:begin + BATCH], where[begin:begin + BATCH] = coarse, origin
        search = np.flatnonzero(coarse < settle[begin:begin + BATCH])
        if not len(search):
            continue
        half = pairs.side / 64  # half a grid step of shift
        simplex = origin[search][:, None, :] + np.array([[0, 0, 0], [0.05, 0, 0], [0, half, 0], [0, 0, half]])
        found, point = _nelder_mead(lambda p, r: -pairs(p, search[r]), simplex, xatol=0.01, fatol=1e-5, maxiter=200,
                                    stop=-settle[begin + search])
        better = -found > coarse[search]
        out[begin + search] = np.maximum(coarse[search], -found)
        where[begin + search[better]] = point[better]
    return out, where


def aligned_correlation(first: np.ndarray, second: np.ndarray, enough: float | None = None) -> float:
    """``aligned_scores`` of one pair."""
    return float(aligned_scores(np.asarray(first)[None], np.asarray(second)[None], enough)[0])


def at_resolution(thumbnail: np.ndarray, side: int) -> np.ndarray:
    """``thumbnail`` as it looks when its image is saved ``side`` px wide: down and up again (bilinear)."""
    from PIL import Image

    picture = Image.fromarray(np.asarray(thumbnail, np.uint8))
    return np.asarray(picture.resize((side, side), Image.Resampling.BILINEAR).resize(
        picture.size, Image.Resampling.BILINEAR))


def halved(thumbnails: np.ndarray) -> np.ndarray:
    """(n, s/2, s/2) ``uint8``: each grey thumbnail resized to half its side as Pillow's BILINEAR resize does
    (``cnnkit.doctor.resampling``): the pixels of the zoom-1.0 centres ``cnnkit.doctor.duplicates`` makes of a
    64 px thumbnail."""
    from cnnkit.doctor.resampling import resized

    thumbnails = np.asarray(thumbnails, np.uint8)
    half = thumbnails.shape[1] // 2
    return np.concatenate([resized(thumbnails[start:start + 1024], half).astype(np.uint8)
                           for start in range(0, len(thumbnails), 1024)] or [np.zeros((0, half, half), np.uint8)])


def _aligned_pairs(thumbnails: np.ndarray, pairs: np.ndarray, sides: np.ndarray, enough: np.ndarray,
                   screened: np.ndarray, halves: np.ndarray | None) -> np.ndarray:
    scores = np.empty(len(pairs))
    full = np.arange(len(pairs))
    if screened.any():
        # The screen: the same search on the halved thumbnails (a quarter of the pixels, a third of the time);
        # only the pairs within SCREEN_MARGIN of their score there are aligned at full size.
        rows = np.flatnonzero(screened)
        bar = enough[rows] - SCREEN_MARGIN
        scores[rows], found = aligned_search(halves[pairs[rows, 0]], halves[pairs[rows, 1]], bar)
        onward = scores[rows] >= bar
        # Those at full size start where the halved search ended (its shifts in full-size px): no second coarse
        # grid, which is 60 % of a 64 px alignment.
        warm = rows[onward]
        ratio = thumbnails.shape[1] / halves.shape[1]
        scores[warm] = aligned_scores(thumbnails[pairs[warm, 0]], thumbnails[pairs[warm, 1]], enough[warm],
                                      start=found[onward] * np.array([1.0, ratio, ratio]))
        full = np.flatnonzero(~screened)
    scores[full] = aligned_scores(thumbnails[pairs[full, 0]], thumbnails[pairs[full, 1]], enough[full])
    # One image was saved smaller (``sides`` px): its detail is gone, so compare the other at that resolution
    # too. A copy resized down to 20-24 px scored 0.94-0.99 plainly, 0.998-1.000 so.
    again = full[(sides[full] > 0) & (scores[full] < enough[full])]
    if len(again):
        small = [np.stack([at_resolution(thumbnails[pairs[i, j]], sides[i]) for i in again]) for j in (0, 1)]
        scores[again] = np.maximum(scores[again], aligned_scores(small[0], small[1], enough[again]))
    return scores


# Pairs to align before the work is shared among processes: below it, starting them costs more.
PARALLEL_PAIRS = 256
# A screened pair is aligned at full size only when its halved thumbnails align to within this of its target.
# Halving mostly smooths away misfit (a halved pair scored 0.002-0.024 higher for 98 % of the 12,230 leak tries
# of 60,000 Fashion-MNIST images), but the bilinear warp blurs a shifted copy's edges more at half the side: of
# the planted copies the five bench sets find by a try (docs/doctor.md), the worst scored 0.9927 halved against
# 0.9979 at full size. This margin keeps 0.0077 to spare there and sends 44 % of the 60,000 images' tries on.
SCREEN_MARGIN = 0.01


def aligned_correlations(thumbnails: np.ndarray, pairs: np.ndarray, enough: float | np.ndarray | None = None,
                         workers: int | None = None, parallel_pairs: int = PARALLEL_PAIRS,
                         sizes: np.ndarray | None = None, screened: np.ndarray | None = None,
                         halves: np.ndarray | None = None) -> np.ndarray:
    """``aligned_scores`` of each ``(first, second)`` row pair of ``thumbnails``.

    ``enough``: the score that settles each pair (one for all, or one per pair; ``None``: none).

    ``screened``: (pairs,) ``True`` where a pair is most likely a look-alike tried just in case (the leak
    search's tries): it is aligned first as ``halved`` thumbnails (``halves``: already made for every row, or
    ``None``: made here), and at full size only when that comes within ``SCREEN_MARGIN`` of its ``enough``,
    its search starting where the halved one ended (no second coarse grid).
    A pair screened out keeps its halved score, below ``enough``: the same decision for a third of the work.

    With ``sizes`` (native width, height per row): where the two images' smaller sides differ and the
    smaller is under the thumbnail's side, the better of the plain alignment and one with both
    thumbnails at that resolution (``at_resolution``).

    Many pairs are shared among forked processes, one per core (``cnnkit.forked``): the same numbers.
    """
    from cnnkit.forked import cores, forked_map

    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    sides = np.zeros(len(pairs), np.int64)
    if sizes is not None and len(pairs):
        smallest = np.asarray(sizes).min(axis=1)[pairs]
        low = smallest.min(axis=1)
        sides = np.where((smallest[:, 0] != smallest[:, 1]) & (low < thumbnails.shape[1]), low, 0)
    settle = np.full(len(pairs), np.inf) if enough is None else \
        np.broadcast_to(np.asarray(enough, np.float64), len(pairs)).copy()
    # A pair with an image saved smaller is not screened: its full-size test includes the one at its resolution.
    screened = np.zeros(len(pairs), bool) if screened is None or enough is None else np.asarray(screened, bool) & (sides == 0)
    if screened.any() and halves is None:
        involved = np.unique(pairs[screened])
        halves = np.zeros((len(thumbnails),) + (thumbnails.shape[1] // 2,) * 2, np.uint8)
        halves[involved] = halved(thumbnails[involved])
    workers = cores() if workers is None else workers
    if len(pairs) < max(parallel_pairs, 2):
        workers = 1
    # Interleaved shares: the pairs of one query (alike in cost) go to different processes.
    shares = [np.arange(i, len(pairs), workers) for i in range(workers)]
    scores = forked_map(lambda share: _aligned_pairs(thumbnails, pairs[share], sides[share], settle[share],
                                                     screened[share], halves), shares, workers)
    out = np.empty(len(pairs))
    for share, chunk in zip(shares, scores):
        out[share] = chunk
    return out

"""What `doctor` reads of each image's pixels, cached by content hash beside the feature cache.

Decoding 60,000 PNGs for their 64 x 64 grey thumbnails took 26-49 s of every `doctor` run
(docs/doctor.md), although the features were cached. The thumbnail, the displayed size and
the grey-stored-as-colour flag are a function of the file's bytes, so they are cached like the
features (``cnnkit.features``), keyed by the same content hash (SHA-1), with the four
32 x 32 zoomed centres the copy test reads (``cnnkit.doctor.duplicates.zoomed_thumbnails``, 60,000 images
times four zooms cost another 15-20 s):

- one file, ``$CNNKIT_HOME/doctor/pixels.npz`` (a plain numpy zip: ``hashes``, ``meta`` -- a
  JSON string --, ``thumbnails`` (n, 64, 64) ``uint8``, ``zoomed`` (n, 4, 32, 32) ``uint8``,
  ``sizes`` (n, 2) ``int32``, ``grey`` (n,) ``bool``), read with ``numpy.load(..., allow_pickle=False)`` only; anything unexpected
  in it (wrong dtype, shape or row count, foreign meta, a malformed hash, a pickled array)
  means "no cache": the images are decoded again, never guessed;
- updates are merged under an exclusive ``flock`` and published by one ``os.replace`` of a
  temporary file, as the feature cache does;
- at most ``LIMIT`` rows (8 KB each: about 1.2 GB): past it the oldest rows are dropped.

Unreadable files are never cached (they are decoded, and named, on every run).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.doctor.duplicates import SIDE as ZOOM_SIDE
from cnnkit.doctor.duplicates import ZOOMS, zoomed_thumbnails

SIDE = 64
LIMIT = 150_000
_FORMAT = 1
_META = {"format": _FORMAT, "side": SIDE, "zooms": list(ZOOMS), "zoomed_side": ZOOM_SIDE}
_HASH = re.compile(r"[0-9a-f]{40}")


@dataclass
class Pixels:
    """Per image: a (SIDE, SIDE) grey ``uint8`` thumbnail, its zoomed centres (``duplicates.zoomed_thumbnails``),
    (width, height) as displayed, grey stored as colour."""

    thumbnails: np.ndarray
    zoomed: np.ndarray
    sizes: np.ndarray
    grey: np.ndarray

    @classmethod
    def empty(cls, count: int = 0) -> Pixels:
        return cls(np.zeros((count, SIDE, SIDE), np.uint8), np.zeros((count, len(ZOOMS), ZOOM_SIDE, ZOOM_SIDE), np.uint8),
                   np.zeros((count, 2), np.int32), np.zeros(count, bool))

    def take(self, rows) -> Pixels:
        return Pixels(self.thumbnails[rows], self.zoomed[rows], self.sizes[rows], self.grey[rows])

    def put(self, rows, other: Pixels) -> None:
        self.thumbnails[rows], self.zoomed[rows], self.sizes[rows], self.grey[rows] = \
            other.thumbnails, other.zoomed, other.sizes, other.grey


def cache_path() -> Path:
    from cnnkit.paths import cache_dir

    return cache_dir() / "doctor" / "pixels.npz"


def load(path: Path) -> tuple[list[str], Pixels]:
    """The cached (hashes, pixels), or empty if absent or not exactly as written."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if set(npz.files) != {"hashes", "meta", "thumbnails", "zoomed", "sizes", "grey"}:
                return [], Pixels.empty()
            if json.loads(str(npz["meta"][()])) != _META:
                return [], Pixels.empty()
            hashes = [str(h) for h in npz["hashes"].tolist()]
            pixels = Pixels(npz["thumbnails"], npz["zoomed"], npz["sizes"], npz["grey"])
    except Exception:  # noqa: BLE001 - the cache only saves time: anything wrong means "decode again"
        return [], Pixels.empty()
    n = len(hashes)
    if (len(set(hashes)) != n or not all(_HASH.fullmatch(h) for h in hashes)
            or pixels.thumbnails.dtype != np.uint8 or pixels.thumbnails.shape != (n, SIDE, SIDE)
            or pixels.zoomed.dtype != np.uint8 or pixels.zoomed.shape != (n, len(ZOOMS), ZOOM_SIDE, ZOOM_SIDE)
            or pixels.sizes.dtype != np.int32 or pixels.sizes.shape != (n, 2)
            or pixels.grey.dtype != bool or pixels.grey.shape != (n,)):
        return [], Pixels.empty()
    return hashes, pixels


def _publish(path: Path, hashes: list[str], pixels: Pixels) -> None:
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix="pixels.", suffix=".tmp", delete=False)
    try:
        with handle:
            np.savez(handle, hashes=np.array(hashes, dtype="U40"), meta=np.array(json.dumps(_META)),
                     thumbnails=pixels.thumbnails, zoomed=pixels.zoomed, sizes=pixels.sizes, grey=pixels.grey)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def add(path: Path, hashes: list[str], pixels: Pixels) -> None:
    """Merge new rows into the cache on disk (newest last, at most ``LIMIT``); silently skipped
    when it cannot be written (the images are then decoded again next time)."""
    from cnnkit.features import exclusive_lock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(path.parent / "lock", 120.0):
            for stray in path.parent.glob("pixels.*.tmp"):  # left by a killed writer
                stray.unlink(missing_ok=True)
            old_hashes, old = load(path)
            new = set(hashes)
            keep = [i for i, h in enumerate(old_hashes) if h not in new]
            keep = keep[max(0, len(keep) + len(hashes) - LIMIT):]  # the oldest rows go first
            tail = max(0, len(hashes) - LIMIT)
            pixels = pixels.take(slice(tail, None))
            if keep:  # (else the new rows are written as they are: no 500 MB copy at 60,000 images)
                old = old.take(keep)
                pixels = Pixels(*(np.concatenate([a, b]) for a, b in zip(
                    (old.thumbnails, old.zoomed, old.sizes, old.grey), (pixels.thumbnails, pixels.zoomed,
                                                                         pixels.sizes, pixels.grey))))
            _publish(path, [old_hashes[i] for i in keep] + list(hashes)[tail:], pixels)
    except OSError:
        pass


# Files decoded before the work is shared among processes (below it, starting them costs more).
PARALLEL_FILES = 1_000


def decode(paths: list[Path]) -> tuple[Pixels, list]:
    """Every file decoded: (its pixels -- zeros for the unreadable --, reasons: ``None`` or why the file
    cannot be read). The zoomed centres (``duplicates.zoomed_thumbnails``: Pillow's pixels, as matrix
    products) are made by the process that decodes the files, for its share at once.

    Many files are shared among forked processes, one per core (``cnnkit.forked``): a small PNG costs
    0.2 ms of Python and Pillow calls, which threads cannot share (20,000 Fashion-MNIST PNGs: 3.7 s one
    after the other, 6-8 s in a pool of 1-4 threads, 2.5 s in two processes). They write their rows into
    memory shared with this process (``forked.shared_zeros``): returning 60,000 thumbnails and centres
    as pickled results cost more than decoding them (docs/doctor.md).
    """
    from threadpoolctl import threadpool_limits

    from cnnkit.data.images import UnreadableImageError, inspect_image
    from cnnkit.forked import cores, forked_map, shared_zeros

    count = len(paths)
    workers = cores() if count >= PARALLEL_FILES else 1
    zeros = shared_zeros if workers > 1 else np.zeros
    pixels = Pixels(zeros((count, SIDE, SIDE), np.uint8), zeros((count, len(ZOOMS), ZOOM_SIDE, ZOOM_SIDE), np.uint8),
                    zeros((count, 2), np.int32), zeros(count, bool))

    def share(rows: np.ndarray) -> list[tuple[int, str]]:
        unreadable = []
        for row in rows:
            try:
                facts = inspect_image(paths[row], SIDE)
            except UnreadableImageError as error:
                unreadable.append((int(row), str(error).split(": ", 1)[-1]))
                continue
            pixels.thumbnails[row] = facts.thumbnail
            pixels.sizes[row] = facts.width, facts.height
            pixels.grey[row] = facts.grey_as_colour
        # The share's zoomed centres in a few matrix products (an unreadable file's zeros give zeros), on one BLAS
        # thread per process.
        with threadpool_limits(limits=1, user_api="blas"):
            for start in range(0, len(rows), 2048):
                chunk = rows[start:start + 2048]
                pixels.zoomed[chunk] = zoomed_thumbnails(pixels.thumbnails[chunk])
        return unreadable

    reasons: list = [None] * count
    for unreadable in forked_map(share, np.array_split(np.arange(count), workers), workers):
        for row, reason in unreadable:
            reasons[row] = reason
    return pixels, reasons


def read_pixels(paths: list[Path], hashes: list[str] | None, use_cache: bool = True) -> tuple[Pixels, list]:
    """The pixels of every file, from the cache where its content hash is there.

    Returns:
        (pixels of every file -- zeros for the unreadable ones --, reasons: ``None`` or why
        the file cannot be read).
    """
    count = len(paths)
    pixels = Pixels.empty(count)
    reasons: list = [None] * count
    cached_rows = np.full(count, -1, np.int64)
    path = cache_path()
    if use_cache and hashes is not None:
        cached_hashes, cached = load(path)
        row_of = {h: i for i, h in enumerate(cached_hashes)}
        cached_rows = np.array([row_of.get(h, -1) for h in hashes], np.int64)
        found = np.flatnonzero(cached_rows >= 0)
        if len(found) == count:
            pixels = cached.take(cached_rows)  # every image cached: one copy, not a gather and a scatter
        else:
            pixels.put(found, cached.take(cached_rows[found]))
        del cached
    todo = np.flatnonzero(cached_rows < 0)
    if len(todo) == count:
        pixels, reasons = decode(paths)  # nothing cached: no second copy
    elif len(todo):
        decoded, todo_reasons = decode([paths[i] for i in todo])
        pixels.put(todo, decoded)
        for row, reason in zip(todo, todo_reasons):
            reasons[row] = reason
    if use_cache and hashes is not None and len(todo):
        # One row per content (a duplicated file is decoded twice, stored once); never a file that could
        # not be read or hashed.
        fresh = [row for row in todo if reasons[row] is None and _HASH.fullmatch(hashes[row] or "")]
        first = sorted({hashes[row]: row for row in reversed(fresh)}.values())
        if first:
            add(path, [hashes[row] for row in first], pixels if len(first) == count else pixels.take(first))
    return pixels, reasons

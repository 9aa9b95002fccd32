"""What `doctor` reads of each image's pixels, cached by content hash beside the feature cache.

Decoding 60,000 PNGs for their 64 x 64 grey thumbnails took 26-49 s of every `doctor` run
(docs/doctor.md), although the features were cached. The thumbnail, the displayed size and
the grey-stored-as-colour flag are a function of the file's bytes, so they are cached like the
features (``cnnkit.features``), keyed by the same content hash (SHA-1), with the four
32 x 32 zoomed centres the copy test reads (``cnnkit.doctor.duplicates.zoomed``, 60,000 images
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
from cnnkit.doctor.duplicates import ZOOMS, zoomed

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
            old, pixels = old.take(keep), pixels.take(slice(tail, None))
            _publish(path, [old_hashes[i] for i in keep] + list(hashes)[tail:],
                     Pixels(*(np.concatenate([a, b]) for a, b in zip(
                         (old.thumbnails, old.zoomed, old.sizes, old.grey),
                         (pixels.thumbnails, pixels.zoomed, pixels.sizes, pixels.grey)))))
    except OSError:
        pass


# Files decoded before the work is shared among processes (below it, starting them costs more).
PARALLEL_FILES = 1_000


def inspect_all(paths: list[Path], centres: bool = False) -> tuple[list, list] | tuple[list, list, list]:
    """``inspect_image`` of every file: (facts or None, reasons), and with ``centres`` each readable
    thumbnail's zoomed centres (``duplicates.zoomed`` at each of ``ZOOMS``, as ``uint8``: the pixels of
    ``zoomed_thumbnails``, made by Pillow in the decoding process; None for the others).

    Many files are shared among forked processes, one per core (``cnnkit.forked``): a small PNG costs
    0.2 ms of Python and Pillow calls, which threads cannot share (20,000 Fashion-MNIST PNGs: 3.7 s one
    after the other, 6-8 s in a pool of 1-4 threads, 2.5 s in two processes).
    """
    from cnnkit.data.images import UnreadableImageError, inspect_image
    from cnnkit.forked import cores, forked_map

    def one(path: Path):
        try:
            facts = inspect_image(path, SIDE)
        except UnreadableImageError as error:
            return None, str(error).split(": ", 1)[-1], None
        return facts, None, np.stack([zoomed(facts.thumbnail, z) for z in ZOOMS]).astype(np.uint8) if centres else None

    workers = cores() if len(paths) >= PARALLEL_FILES else 1
    shares = np.array_split(np.arange(len(paths)), workers)
    results = [r for part in forked_map(lambda share: [one(paths[i]) for i in share], shares, workers) for r in part]
    found = [r[0] for r in results], [r[1] for r in results]
    return (*found, [r[2] for r in results]) if centres else found


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
    decoded = []
    for row, fact, reason, centres in zip(todo, *inspect_all([paths[i] for i in todo], centres=True)):
        if fact is None:
            reasons[row] = reason
            continue
        pixels.thumbnails[row] = fact.thumbnail
        pixels.zoomed[row] = centres
        pixels.sizes[row] = (fact.width, fact.height)
        pixels.grey[row] = fact.grey_as_colour
        decoded.append(row)
    decoded = np.array(decoded, np.int64)
    if use_cache and hashes is not None and len(decoded):
        # One row per content (a duplicated file is decoded twice, stored once).
        first = list({hashes[row]: row for row in reversed(decoded)}.values())
        add(path, [hashes[row] for row in first], pixels.take(first))
    return pixels, reasons

"""Content hashes of files (SHA-1: the feature and pixel caches' key), remembered by each file's stat.

Hashing 60,000 small images reads 60,000 files: 4-5 s of every `doctor`, `extract` or `advise` run whose
features are all cached (docs/doctor.md). A file whose path, size, modification and change times
(nanoseconds), inode and device are what they were when it was hashed still has those bytes: git's index
and DVC's state database trust the same signature. So ``content_hashes`` keeps each hash with that
signature in ``$CNNKIT_HOME/hashes.npz`` and reads a file again only when its signature changed:

- A file modified less than ``SETTLE`` seconds before it was hashed is not remembered: a second write
  within the same clock tick could leave its times as they were (git's "racily clean" entries).
- The change time cannot be set by a user program (``touch`` and ``os.utime`` set the other two and
  move it), so a file rewritten with its old size and times restored is still read again.
- The memo is a plain numpy zip (``paths`` str, ``hashes`` 40 hex digits, ``stats`` int64 (n, 5)),
  read with ``numpy.load(..., allow_pickle=False)`` only: nothing in it can run code, and anything
  unexpected (other names, dtypes or shapes, a malformed hash) means "read every file", never a
  guessed hash. Whoever can write ``$CNNKIT_HOME`` can also write the feature cache it keys, so the
  memo trusts no one the caches did not already trust.
- It holds at most ``LIMIT`` files (the least recently hashed go first) and is published by one
  ``os.replace`` of a temporary file; two runs writing at once lose one's additions, which costs a
  re-read later, never a wrong hash.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnkit.paths import atomic_write, cache_dir, file_digest

LIMIT = 500_000
SETTLE = 2.0  # seconds
_HASH = re.compile(r"[0-9a-f]{40}")
_NAMES = {"paths", "hashes", "stats"}


def memo_path() -> Path:
    return cache_dir() / "hashes.npz"


def _signature(facts: os.stat_result) -> tuple[int, ...]:
    return facts.st_size, facts.st_mtime_ns, facts.st_ctime_ns, facts.st_ino, facts.st_dev


def _load(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{absolute path: (signature, hash)} from the memo, or {} if it is absent or not exactly as written."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if set(npz.files) != _NAMES:
                return {}
            paths, hashes, stats = npz["paths"], npz["hashes"], npz["stats"]
    except Exception:  # noqa: BLE001 - the memo only saves time: anything wrong means "read the files"
        return {}
    n = len(paths)
    if (paths.dtype.kind != "U" or paths.shape != (n,) or hashes.dtype != np.dtype("U40") or hashes.shape != (n,)
            or stats.dtype != np.int64 or stats.shape != (n, 5)):
        return {}
    hashes = hashes.tolist()
    if not all(_HASH.fullmatch(h) for h in hashes):
        return {}
    return dict(zip(paths.tolist(), zip(map(tuple, stats.tolist()), hashes)))


def _save(path: Path, memo: dict[str, tuple[tuple[int, ...], str]]) -> None:
    items = list(memo.items())[-LIMIT:]
    try:
        atomic_write(path, lambda temporary: np.savez(
            temporary, paths=np.array([p for p, _ in items], dtype=str),
            hashes=np.array([h for _, (_, h) in items], dtype="U40"),
            stats=np.array([s for _, (s, _) in items], np.int64).reshape(-1, 5)))
    except OSError:
        pass  # unwritable cache: the files are read again next time


def content_hashes(paths: Sequence[Path | str], remember: bool = True) -> list[str]:
    """SHA-1 of each file's bytes, "" for a path that is not a readable regular file.

    ``remember``: take a file's hash from the memo when its signature is unchanged, and remember the
    hashes read (module docstring); ``False``: read every file and leave the memo alone.
    """
    memo = _load(memo_path()) if remember else {}
    settled = time.time_ns() - int(SETTLE * 1e9)  # before any file is read: see the module docstring
    hashes: list[str] = []
    learnt: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in paths:
        key = os.path.abspath(path)
        try:
            facts = os.stat(key)
        except (OSError, ValueError):  # missing, unreachable, or a name the OS refuses
            hashes.append("")
            continue
        signature = _signature(facts)
        known = memo.get(key)
        if known is not None and known[0] == signature:
            hashes.append(known[1])
            continue
        if not stat.S_ISREG(facts.st_mode):
            hashes.append("")
            continue
        try:
            digest = file_digest(key, "sha1")
        except OSError:
            hashes.append("")
            continue
        hashes.append(digest)
        if max(facts.st_mtime_ns, facts.st_ctime_ns) < settled:
            learnt[key] = (signature, digest)
    if remember and learnt:
        for key in learnt:
            memo.pop(key, None)  # re-inserted last: the newest entries are kept past LIMIT
        _save(memo_path(), {**memo, **learnt})
    return hashes

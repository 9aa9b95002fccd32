"""Work shared among forked processes, one per core: for numpy work that one thread runs best.

Many small matrix products (the copy test, the subpixel alignments of ``cnnkit.doctor``) run fastest
on one BLAS thread per process (threads spin for each other on small products), so a second core
helps only as a second process. Forked children inherit the parent's arrays (copy-on-write: nothing
is pickled but each job's small arguments and its result). Where ``fork`` is missing (Windows,
macOS's default) or there is one core, the jobs run here, one after the other: the same results.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

_WORK: Callable | None = None  # the function, for forked children (inherited, never pickled)


def cores() -> int:
    """Cores this process may run on (at most 8)."""
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


def _run(job):
    return _WORK(job)


def forked_map(work: Callable, jobs: Sequence, workers: int | None = None) -> list:
    """``[work(job) for job in jobs]``, the jobs shared among ``workers`` forked processes (default:
    one per core). ``work`` may be a closure over large arrays: only ``jobs`` and results are pickled."""
    import multiprocessing

    global _WORK
    workers = cores() if workers is None else workers
    if len(jobs) < 2 or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [work(job) for job in jobs]
    _WORK = work
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            return pool.map(_run, jobs, chunksize=1)
    finally:
        _WORK = None

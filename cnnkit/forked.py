"""Work shared among forked processes, one per core: for numpy work that one thread runs best.

Many small matrix products (the copy test, the subpixel alignments of ``cnnkit.doctor``) run fastest
on one BLAS thread per process (threads spin for each other on small products), so a second core
helps only as a second process. Forked children inherit the parent's arrays (copy-on-write: nothing
is pickled but each job's small arguments and its result). Where ``fork`` is missing (Windows,
macOS's default) or there is one core, the jobs run here, one after the other: the same results.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Sequence

_WORK: Callable | None = None  # the function, for forked children (inherited, never pickled)


def cores() -> int:
    """Cores this process may run on (at most 8)."""
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


def shared_zeros(shape, dtype):
    """A numpy array of zeros in memory that forked children share with this process (an anonymous
    shared mapping): a ``forked_map`` job writes its rows in place, and nothing is pickled back."""
    import mmap

    import numpy as np

    dtype, count = np.dtype(dtype), int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(count * dtype.itemsize, 1)), dtype, count).reshape(shape)


_FROZEN = 0  # how many forked works are running (the collector is frozen while any is)


def _freeze() -> None:
    """Python's garbage collector told to leave this process's objects alone while forked children run.

    A forked child shares the parent's memory until one of them writes to a page; a collection (in
    the child, or here) walks and writes to every object they share, so every page holding one is
    copied. ``gc.freeze`` before the fork, as Python's ``gc`` documentation advises, and until the
    children are done, keeps those pages shared: decoding 60,000 thumbnails in two children of
    `doctor`'s process took 17.3 s, 11.9 s frozen (10.3 s forked from a small process).
    """
    import gc

    global _FROZEN
    if not _FROZEN:
        gc.freeze()
    _FROZEN += 1


def _unfreeze() -> None:
    import gc

    global _FROZEN
    _FROZEN -= 1
    if not _FROZEN:
        gc.unfreeze()


@contextmanager
def _collector_frozen():
    _freeze()
    try:
        yield
    finally:
        _unfreeze()


def _run(job):
    return _WORK(job)


def _limited(work: Callable, threads: int | None) -> Callable:
    """``work`` run with at most ``threads`` BLAS and OpenMP threads (``None``: as configured)."""
    if threads is None:
        return work

    def limited(*arguments):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=threads):
            return work(*arguments)

    return limited


def forked_map(work: Callable, jobs: Sequence, workers: int | None = None, threads: int | None = None) -> list:
    """``[work(job) for job in jobs]``, the jobs shared among ``workers`` forked processes (default:
    one per core). ``work`` may be a closure over large arrays: only ``jobs`` and results are pickled.
    ``threads``: the BLAS and OpenMP threads of each forked process (``None``: as here); jobs run here,
    one after the other, keep this process's threads."""
    import multiprocessing

    global _WORK
    workers = cores() if workers is None else workers
    if len(jobs) < 2 or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [work(job) for job in jobs]
    _WORK = _limited(work, threads)
    try:
        with _collector_frozen(), multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            return pool.map(_run, jobs, chunksize=1)
    finally:
        _WORK = None


class Background:
    """``work()`` running in a forked process beside this one; ``result()`` waits for what it returns.

    For a stage whose inputs are ready while other work goes on here (``cnnkit.doctor``'s label check
    beside its duplicate search): the child inherits the arrays, and only the result is pickled back.
    Without ``fork`` or a second core, ``work`` runs in ``result()`` instead: the same result, later.
    Use it as a context manager: leaving the block before ``result()`` stops the child.
    """

    def __init__(self, work: Callable, threads: int | None = None):
        """``threads``: the BLAS and OpenMP threads of the child (``None``: as here)."""
        import multiprocessing

        self._work, self._process, self._receiving = work, None, None
        if cores() < 2 or "fork" not in multiprocessing.get_all_start_methods():
            return
        context = multiprocessing.get_context("fork")
        self._receiving, sending = context.Pipe(duplex=False)

        def child() -> None:
            try:
                answer = (True, _limited(work, threads)())
            except BaseException as error:  # noqa: BLE001 (raised again in the parent)
                answer = (False, error)
            try:
                sending.send(answer)
            except Exception as error:  # noqa: BLE001 (a result or exception that does not pickle)
                sending.send((False, RuntimeError(f"the background work's result could not be sent back: {error}")))

        # A bare process, not a Pool: a Pool's helper threads would be running in this process when
        # later forks (``forked_map``) copy it.
        self._process = context.Process(target=child, daemon=True)
        _freeze()  # until close()
        try:
            self._process.start()
        except BaseException:
            self._process = None
            _unfreeze()
            raise
        sending.close()

    def result(self):
        """What ``work()`` returned (its exception, raised here, if it raised one)."""
        if self._process is None:
            if self._work is None:
                raise RuntimeError("the background work was stopped before its result was read")
            answer = self._work()
            self._work = lambda: answer
            return answer
        try:
            done, answer = self._receiving.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"a background process ended without a result (exit code "
                               f"{self._process.exitcode}; killed for memory?)") from None
        finally:
            self._work = None
            self.close()
        if not done:
            raise answer
        self._work = lambda: answer
        return answer

    def close(self) -> None:
        """Stop the child unless its result was read (then it is ending by itself); free its pipe."""
        if self._process is not None:
            if self._work is not None:  # not read: the child may still work, or wait to send
                # SIGKILL, not SIGTERM: the child inherits this process's handlers, and one that
                # catches SIGTERM (a training callback, a server) would let it run on.
                self._process.kill()
                self._work = None
            self._process.join()
            self._receiving.close()
            self._process = None
            _unfreeze()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

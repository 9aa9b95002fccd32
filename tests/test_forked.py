"""``cnnkit.forked``: work in forked processes gives what it gives here."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import cnnkit.forked as forked
from cnnkit.errors import CnnkitError


def test_background_work_returns_its_result_from_a_forked_process():
    data = np.arange(100_000, dtype=np.float64)  # inherited by the child, not pickled
    with forked.Background(lambda: (os.getpid(), data.sum(), data[:3] * 2)) as job:
        pid, total, head = job.result()
        assert job.result()[1] == total  # asked again: the same answer, no second run
    assert pid != os.getpid()  # two cores here (CI and the dev machines have two)
    assert total == data.sum()
    np.testing.assert_array_equal(head, [0, 2, 4])


def test_background_work_raises_its_error_in_the_parent():
    def fails():
        raise CnnkitError("data/x.png: unreadable")

    with forked.Background(fails) as job, pytest.raises(CnnkitError, match="unreadable"):
        job.result()


def test_background_work_runs_here_without_a_second_core(monkeypatch):
    monkeypatch.setattr(forked, "cores", lambda: 1)
    with forked.Background(lambda: os.getpid()) as job:
        assert job.result() == os.getpid()


def test_leaving_the_block_stops_background_work_whose_result_was_not_read():
    """Even when this process catches SIGTERM (the child inherits the handler): in CI a test ran after
    another had left such a handler installed, and the child slept its full minute."""
    import signal

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        started = time.perf_counter()
        with forked.Background(lambda: time.sleep(60)) as job:
            child = job._process
            assert child is not None and child.is_alive()
        assert not child.is_alive() and time.perf_counter() - started < 10
    finally:
        signal.signal(signal.SIGTERM, previous)
    with pytest.raises(RuntimeError, match="stopped"):
        job.result()


def test_the_collector_leaves_inherited_objects_alone_while_children_run_and_only_then():
    """``gc.freeze`` while forked work runs (a collection would copy every shared page), undone after it."""
    import gc

    assert gc.get_freeze_count() == 0
    inherited = [object() for _ in range(1000)]
    with forked.Background(lambda: gc.get_freeze_count()) as job:
        assert gc.get_freeze_count() >= len(inherited)  # frozen here too, while the child runs
        in_pool = forked.forked_map(lambda _: gc.get_freeze_count(), [0, 1], workers=2)
        assert gc.get_freeze_count() >= len(inherited)  # the nested work did not thaw it early
        assert job.result() >= len(inherited) and min(in_pool) >= len(inherited)
    assert gc.get_freeze_count() == 0
    assert forked.forked_map(lambda x: x * 2, [1, 2, 3], workers=2) == [2, 4, 6]
    assert gc.get_freeze_count() == 0
    shared = forked.shared_zeros((4, 3), np.int32)

    def write(row: int) -> None:
        shared[row] = row + 1

    forked.forked_map(write, [0, 1, 2, 3], workers=2)
    np.testing.assert_array_equal(shared, np.arange(1, 5)[:, None].repeat(3, axis=1))  # written by the children

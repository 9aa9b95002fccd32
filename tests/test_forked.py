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

"""The feature cache under concurrent writers, killed writers, full disks and damaged files.

Every test ends by checking that each cached row equals a fresh, cache-free
computation for the image whose hash names it: that is the property a mixed-up
cache would break silently.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cnnkit.features as features_module
from cnnkit.features import FeatureCache, FeatureConfig, FeatureExtractor, compute_features, file_hash
from conftest import make_class_tree

CONFIG = FeatureConfig(backbone="tiny_cnn", weights="none", image_size=32)

_WORKER = """
import pathlib, sys, time
from cnnkit.features import FeatureConfig, FeatureExtractor, compute_features
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
config = FeatureConfig("tiny_cnn", "none", 32)
extractor = FeatureExtractor(config)
extractor.model  # build before the race starts
ready.touch()
while not go.exists():
    time.sleep(0.01)
for part in " ".join(sys.argv[3:]).split(" -- "):
    paths = [pathlib.Path(p) for p in part.split()]
    table = compute_features(paths, config, batch_size=3, extractor=extractor)
    assert len(table.kept) == len(paths), table.failures
print("ok")
"""

_KILLED_WRITER = """
import io, pathlib, sys, time
import numpy as np
import cnnkit.features as f
ready, share = pathlib.Path(sys.argv[1]), float(sys.argv[2])

def write_then_hang(handle, members):
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    data = buffer.getvalue()
    handle.write(data[: int(len(data) * share)])
    handle.flush()
    ready.touch()
    time.sleep(600)

f._write_npz = write_then_hang
f.compute_features([pathlib.Path(p) for p in sys.argv[3:]], f.FeatureConfig("tiny_cnn", "none", 32))
"""


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(CONFIG)


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("CNNKIT_HOME", str(home))
    return home


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """18 distinct small PNGs plus one byte-identical copy."""
    paths = sorted(make_class_tree(tmp_path / "data", {"a": 9, "b": 9}).rglob("*.png"))
    copy = tmp_path / "data" / "a" / "copy_of_b0.png"
    shutil.copy(paths[9], copy)
    return paths + [copy]


def cached_rows() -> dict[str, dict[str, np.ndarray]]:
    """The cache as a plain numpy user reads it: {image hash: {stage: row}}."""
    with np.load(FeatureCache(CONFIG).path, allow_pickle=False) as npz:
        stages = [n for n in npz.files if n not in ("hashes", "meta")]
        arrays = {s: npz[s] for s in stages}
        return {str(h): {s: arrays[s][i] for s in stages} for i, h in enumerate(npz["hashes"])}


def fresh_rows(paths, extractor) -> dict[str, dict[str, np.ndarray]]:
    table = compute_features(paths, CONFIG, use_cache=False, extractor=extractor)
    return {file_hash(paths[i]): {s: a[r] for s, a in table.features.items()}
            for r, i in enumerate(table.kept)}


def assert_rows_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for digest, row in expected.items():
        assert actual[digest].keys() == row.keys()
        for stage, values in row.items():
            np.testing.assert_allclose(actual[digest][stage], values, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{digest} {stage}")


def assert_table_is_fresh(table, paths, extractor):
    expected = fresh_rows(paths, extractor)
    got = {file_hash(paths[i]): {s: a[r] for s, a in table.features.items()}
           for r, i in enumerate(table.kept)}
    assert_rows_equal(got, expected)


def leftovers(home: Path) -> list[str]:
    # The feature cache only: converted networks (engines/) live beside it.
    return sorted(p.name for p in (home / "features").rglob("*") if p.is_file() and p.name not in ("features.npz", "lock"))


def test_cache_is_one_plain_numpy_file(home, images, extractor):
    table = compute_features(images, CONFIG, extractor=extractor)
    assert table.computed == len(images) - 1  # the copy shares its twin's row
    folder = FeatureCache(CONFIG).folder
    assert sorted(p.name for p in folder.iterdir()) == ["features.npz", "lock"]
    with np.load(folder / "features.npz", allow_pickle=False) as npz:
        assert json.loads(str(npz["meta"]))["image_size"] == 32
    assert_rows_equal(cached_rows(), fresh_rows(images, extractor))
    assert compute_features(images, CONFIG, extractor=extractor).computed == 0


def test_two_concurrent_processes_merge_and_never_mix_rows(home, images, tmp_path, extractor):
    first, second = images[:12], images[6:]
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    go = tmp_path / "go"
    # Each worker updates twice, so that updates interleave more than once.
    jobs = [[*map(str, first[:7]), "--", *map(str, first)],
            [*map(str, second[4:]), "--", *map(str, second)]]
    env = {**os.environ, "CNNKIT_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(go), *job], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for r, job in zip(ready, jobs)]
    try:
        deadline = time.monotonic() + 180
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), \
                [w.communicate() for w in workers if w.poll() is not None]
            time.sleep(0.05)
        go.touch()
        results = [w.communicate(timeout=180) for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, (out, err) in zip(workers, results):
        assert worker.returncode == 0 and "ok" in out, err
    assert_rows_equal(cached_rows(), fresh_rows(images, extractor))
    assert leftovers(home) == []


def test_writer_that_read_the_old_cache_merges_a_whole_update_made_meanwhile(
        home, images, extractor, monkeypatch):
    """A reads the cache, B runs a whole update, then A publishes: B's rows survive."""
    first, second = images[:10], images[5:]
    compute_features(images[:3], CONFIG, extractor=extractor)
    original = FeatureCache.load
    interleaved = []

    def load_then_let_b_run(self, stages=None):
        snapshot = original(self, stages)
        if not interleaved:
            interleaved.append("B running")
            interleaved[0] = compute_features(second, CONFIG, extractor=extractor)
        return snapshot

    with monkeypatch.context() as patch:
        patch.setattr(FeatureCache, "load", load_then_let_b_run)
        a = compute_features(first, CONFIG, extractor=extractor)
    assert interleaved[0].computed == 13  # 14 paths, one a copy, none among the 3 seed rows
    assert a.computed == 7  # A's snapshot predates B: it recomputes 5..9, and keeps B's rows
    assert_rows_equal(cached_rows(), fresh_rows(images, extractor))
    assert_table_is_fresh(a, first, extractor)
    assert_table_is_fresh(interleaved[0], second, extractor)


def test_a_writer_publishing_while_another_holds_the_lock_waits_for_it(home, images, extractor, monkeypatch):
    """B tries to publish between A's locked re-read and A's publish: it waits, then merges."""
    first, second = images[:10], images[5:]
    fresh = compute_features(second, CONFIG, use_cache=False, extractor=extractor)
    b_hashes = [file_hash(second[i]) for i in fresh.kept]
    import cnnkit.features

    original = FeatureCache._publish
    b = threading.Thread(target=lambda: FeatureCache(CONFIG).add(b_hashes, fresh.features, ([], {})))
    refused = threading.Event()  # B asked for the lock and was told to wait
    flock = cnnkit.features.fcntl.flock

    def flock_seen(fd, operation):
        try:
            return flock(fd, operation)
        except BlockingIOError:
            if threading.current_thread() is b:
                refused.set()
            raise

    def publish_with_b_racing(self, hashes, arrays):
        if b.ident is None:
            b.start()
            assert refused.wait(timeout=120), "B never asked for the lock"
            assert b.is_alive(), "B published while A held the lock"
            assert len(hashes) == 10  # A's merge has not seen B's rows
        original(self, hashes, arrays)

    monkeypatch.setattr(cnnkit.features.fcntl, "flock", flock_seen)
    monkeypatch.setattr(FeatureCache, "_publish", publish_with_b_racing)
    compute_features(first, CONFIG, extractor=extractor)
    b.join(timeout=60)
    assert not b.is_alive()
    assert_rows_equal(cached_rows(), fresh_rows(images, extractor))


@pytest.mark.parametrize("share", [0.5, 1.0], ids=["half-written", "written-not-published"])
def test_sigkill_during_an_update_leaves_the_previous_cache(home, images, tmp_path, extractor, share):
    compute_features(images[:6], CONFIG, extractor=extractor)
    before = cached_rows()
    ready = tmp_path / "ready"
    env = {**os.environ, "CNNKIT_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(ready), str(share),
                               *map(str, images[3:12])], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
            time.sleep(0.05)
        assert leftovers(home), "the writer should be mid-update"
        with open(FeatureCache(CONFIG).folder / "lock", "rb") as lock:
            with pytest.raises(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.communicate()
    assert writer.returncode == -signal.SIGKILL
    assert_rows_equal(cached_rows(), before)  # untouched, and still readable
    later = compute_features(images[3:12], CONFIG, extractor=extractor)
    assert later.computed == 6  # the killed writer's rows were never trusted
    assert leftovers(home) == []  # its temporary file is gone
    assert_rows_equal(cached_rows(), fresh_rows(images[:12], extractor))


def test_full_disk_still_extracts_and_publishes_nothing(home, images, extractor, monkeypatch):
    compute_features(images[:4], CONFIG, extractor=extractor)
    before = cached_rows()

    def write_some_then_fail(handle, members):
        handle.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(features_module, "_write_npz", write_some_then_fail)
        table = compute_features(images, CONFIG, extractor=extractor)
    assert len(table.kept) == len(images)
    assert_table_is_fresh(table, images, extractor)
    assert_rows_equal(cached_rows(), before)
    assert leftovers(home) == []
    assert compute_features(images, CONFIG, extractor=extractor).computed == len(images) - 1 - 4


def test_unwritable_cache_location_still_extracts(tmp_path, images, extractor, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CNNKIT_HOME", str(blocker / "home"))
    table = compute_features(images, CONFIG, extractor=extractor)
    assert_table_is_fresh(table, images, extractor)


def test_lock_held_too_long_skips_the_update(home, images, extractor, monkeypatch):
    compute_features(images[:2], CONFIG, extractor=extractor)
    monkeypatch.setattr(FeatureCache, "lock_timeout", 0.2)
    with open(FeatureCache(CONFIG).folder / "lock", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = compute_features(images[:5], CONFIG, extractor=extractor)
    assert_table_is_fresh(table, images[:5], extractor)
    assert len(cached_rows()) == 2


def _members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _savez(path: Path, members: dict[str, np.ndarray]) -> None:
    with path.open("wb") as handle:
        np.savez(handle, **members)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:
        np.save(handle, array)


def _huge_member(path: Path, members) -> None:
    _savez(path, {k: v for k, v in members.items() if k != "conv1"})
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10**9, 64)})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("conv1.npy", np.lib.format.magic(2, 0) + header.getvalue() + b"\0" * 64)


def _with(**changes):
    def mutate(path, members):
        _savez(path, {**members, **{k: v(members) for k, v in changes.items()}})
    return mutate


def _without(name):
    def mutate(path, members):
        _savez(path, {k: v for k, v in members.items() if k != name})
    return mutate


def _meta(**changes):
    return _with(meta=lambda m: np.array(json.dumps({**json.loads(str(m["meta"])), **changes})))


MUTATIONS = {
    "truncated": lambda p, m: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p, m: p.write_bytes(b""),
    "garbage": lambda p, m: p.write_bytes(os.urandom(5000)),
    "plain npy": lambda p, m: _save_npy(p, m["conv2"]),
    "a folder": lambda p, m: p.unlink() or p.mkdir(),
    "pickled stage": _with(conv2=lambda m: np.array([{"x": 1}] * len(m["hashes"]), dtype=object)),
    "pickled hashes": _with(hashes=lambda m: np.array(list(m["hashes"]), dtype=object)),
    "hashes one short": _with(hashes=lambda m: m["hashes"][:-1]),
    "hashes one long": _with(hashes=lambda m: np.append(m["hashes"], "0" * 40)),
    "hashes garbage": _with(hashes=lambda m: np.array(["../../etc/passwd"] * len(m["hashes"]))),
    "hashes repeated": _with(hashes=lambda m: np.repeat(m["hashes"][:1], len(m["hashes"]))),
    "hashes numbers": _with(hashes=lambda m: np.arange(len(m["hashes"]))),
    "hashes scalar": _with(hashes=lambda m: np.array(7)),
    "stage rows short": _with(conv3=lambda m: m["conv3"][:-1]),
    "stage float64": _with(conv3=lambda m: m["conv3"].astype(np.float64)),
    "stage 3-d": _with(conv3=lambda m: m["conv3"][:, :, None]),
    "stage missing": _without("conv4"),
    "extra member": _with(extra=lambda m: m["conv1"]),
    "meta missing": _without("meta"),
    "meta garbage": _with(meta=lambda m: np.array("{not json")),
    "meta a list": _with(meta=lambda m: np.array(["{}", "{}"])),
    "meta other pooling": _meta(pool="max"),
    "meta other format": _meta(format=1),
    "huge declared shape": _huge_member,
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_damaged_cache_is_recomputed_never_trusted(home, images, extractor, mutation):
    paths = images[:4]
    compute_features(paths, CONFIG, extractor=extractor)
    path = FeatureCache(CONFIG).path
    MUTATIONS[mutation](path, _members(path))
    assert FeatureCache(CONFIG).load() == ([], {})
    table = compute_features(paths, CONFIG, extractor=extractor)
    assert table.computed == 4
    assert_table_is_fresh(table, paths, extractor)
    if mutation != "a folder":  # a folder in its place is not ours to delete
        assert_rows_equal(cached_rows(), fresh_rows(paths, extractor))


def test_cache_of_cnnkit_0_1_is_ignored_and_removed(home, images, extractor):
    folder = FeatureCache(CONFIG).folder
    folder.mkdir(parents=True)
    (folder / "hashes.json").write_text(json.dumps([file_hash(p) for p in images[:2]]))
    for stage in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        np.save(folder / f"{stage}.npy", np.zeros((2, 4), np.float32))
    table = compute_features(images[:2], CONFIG, extractor=extractor)
    assert table.computed == 2
    assert_table_is_fresh(table, images[:2], extractor)
    assert sorted(p.name for p in folder.iterdir()) == ["features.npz", "lock"]


@pytest.mark.parametrize("use_cache", [False, True])
def test_asking_for_some_stages_returns_only_those_rows_and_still_caches_every_stage(
        home, images, tmp_path, extractor, use_cache):
    from conftest import write_bad_files

    bad = [tmp_path / "bad" / name for name in sorted(write_bad_files(tmp_path / "bad"))]
    # Unreadable files in the middle and at the end: the stored rows must stay the readable files'.
    paths = images[:5] + bad[:2] + images[5:9] + bad[2:]
    every = compute_features(paths, CONFIG, use_cache=False, extractor=extractor)
    table = compute_features(paths, CONFIG, batch_size=3, use_cache=use_cache, extractor=extractor,
                             stages=["conv3"])
    assert list(table.features) == ["conv3"]
    np.testing.assert_array_equal(table.kept, every.kept)
    assert len(table.kept) == 9 and len(table.failures) == len(bad)
    np.testing.assert_allclose(table.features["conv3"], every.features["conv3"], rtol=1e-5, atol=1e-6)
    if use_cache:
        assert set(cached_rows()[file_hash(images[0])]) == set(extractor.stages)

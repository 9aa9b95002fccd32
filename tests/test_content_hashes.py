"""``cnnkit.content_hashes``: a file's hash is read from the memo only while the file is unchanged."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import cnnkit.content_hashes as memo
from cnnkit.content_hashes import content_hashes


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "home"))
    paths = []
    for i in range(4):
        path = tmp_path / "data" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i]) * (100 + i))
        paths.append(path)
    return paths


def sha1(path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture
def reads(monkeypatch):
    """Counts the files ``content_hashes`` reads."""
    counted = []
    original = memo.file_digest

    def counting(name, algorithm):
        counted.append(Path(name))
        return original(name, algorithm)

    monkeypatch.setattr(memo, "file_digest", counting)
    return counted


def test_hashes_are_the_bytes_sha1_and_empty_for_what_is_no_readable_file(files, tmp_path):
    assert content_hashes(files) == [sha1(p) for p in files]
    assert content_hashes([tmp_path / "missing.png", tmp_path / "data", "bad\0name"]) == ["", "", ""]


def test_unchanged_files_are_not_read_again(files, reads, monkeypatch):
    monkeypatch.setattr(memo, "SETTLE", -60.0)  # the files were just written: count them as settled
    first = content_hashes(files)
    assert len(reads) == 4 and memo.memo_path().is_file()
    reads.clear()
    assert content_hashes(files) == first and reads == []


def test_a_file_rewritten_with_its_size_and_times_restored_is_read_again(files, reads, monkeypatch):
    monkeypatch.setattr(memo, "SETTLE", -60.0)
    content_hashes(files)
    facts = os.stat(files[1])
    files[1].write_bytes(b"x" * facts.st_size)  # same size
    os.utime(files[1], ns=(facts.st_atime_ns, facts.st_mtime_ns))  # same times; the change time moves
    reads.clear()
    assert content_hashes(files)[1] == sha1(files[1]) and reads == [files[1]]


def test_files_changed_just_before_they_were_hashed_are_not_remembered(files, reads):
    content_hashes(files)  # written a moment ago: within SETTLE
    reads.clear()
    content_hashes(files)
    assert len(reads) == 4


def test_without_remembering_the_memo_is_neither_read_nor_written(files, reads, monkeypatch):
    monkeypatch.setattr(memo, "SETTLE", -60.0)
    assert content_hashes(files, remember=False) == [sha1(p) for p in files]
    assert not memo.memo_path().exists()


def crafted_memos(files):
    """Memo files a user (or a broken disk) could leave, each claiming a wrong hash for ``files[0]``, as bytes."""
    import io
    import zipfile

    key = os.path.abspath(files[0])
    signature = np.array([memo._signature(os.stat(key))], np.int64)
    good = {"paths": np.array([key]), "hashes": np.array(["0" * 40], dtype="U40"), "stats": signature}

    def npz(**members) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **members)
        return buffer.getvalue()

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (10**12, 5)})
    huge = io.BytesIO()
    with zipfile.ZipFile(huge, "w") as archive:
        for name, array in good.items():
            if name != "stats":
                array_bytes = io.BytesIO()
                np.save(array_bytes, array)
                archive.writestr(f"{name}.npy", array_bytes.getvalue())
        archive.writestr("stats.npy", header.getvalue() + signature.tobytes())
    yield "garbage", b"not a zip at all"
    yield "truncated", npz(**good)[:-40]
    yield "pickled object array", npz(**{**good, "paths": np.array([key], dtype=object)})
    yield "malformed hash", npz(**{**good, "hashes": np.array(["import os; os.system('x')"], dtype="U40")})
    yield "float stats", npz(**{**good, "stats": signature.astype(np.float64)})
    yield "short stats", npz(**{**good, "stats": signature[:, :3]})
    yield "rows disagree", npz(**{**good, "hashes": np.array(["0" * 40] * 2, dtype="U40")})
    yield "extra member", npz(**good, extra=np.zeros(3))
    yield "huge declared shape", huge.getvalue()


def test_crafted_memo_files_are_ignored_and_the_files_read(files, reads, monkeypatch):
    """Nothing in the memo runs code (``allow_pickle=False``), and anything unexpected means "read the file"."""
    monkeypatch.setattr(memo, "SETTLE", -60.0)
    path = memo.memo_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    for name, content in crafted_memos(files):
        path.write_bytes(content)
        reads.clear()
        assert content_hashes(files[:1]) == [sha1(files[0])], name
        assert reads == [files[0]], name
    # The crafted memo was replaced by a good one, which is then trusted.
    reads.clear()
    assert content_hashes(files[:1]) == [sha1(files[0])] and reads == []


def test_a_pickle_in_place_of_the_memo_is_never_unpickled(files, monkeypatch):
    monkeypatch.setattr(memo, "SETTLE", -60.0)
    path = memo.memo_path()
    path.parent.mkdir(parents=True, exist_ok=True)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(files[0].parent / "pwned"),))

    path.write_bytes(pickle.dumps(Boom()))
    assert content_hashes(files[:1]) == [sha1(files[0])]
    assert not (files[0].parent / "pwned").exists()

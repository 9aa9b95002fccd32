"""Faults that lose nothing: a full disk, an unwritable --out, SIGKILL mid-write, mutated run folders."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cnnkit.errors import CnnkitError
from cnnkit.extraction import run_extract
from cnnkit.options import ExtractOptions
from cnnkit.runs import load_run
from conftest import make_class_tree, reseal

TINY = dict(backbone="tiny_cnn", weights="none", image_size=32, cv=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_class_tree(tmp_path_factory.mktemp("faults") / "data", {"a": 6, "b": 6})


@pytest.fixture
def run(data, tmp_path):
    return run_extract(data, ExtractOptions(**TINY), tmp_path / "run").run_path


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_while_writing_leaves_the_existing_run_intact(run, data, monkeypatch):
    import cnnkit.extraction

    before = _snapshot(run)

    def full_disk(pipeline, path, cache=False):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cnnkit.extraction, "save_head", full_disk)
    with pytest.raises(CnnkitError, match=r"--out .*run: cannot write the run \(.*head.skops: No space left"):
        run_extract(data, ExtractOptions(**TINY, head="knn"), run, force=True)
    assert _snapshot(run) == before and load_run(run).model.head == "logreg"
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".run.")]  # no half-built folder left


def test_an_unwritable_out_is_one_line(data, tmp_path):
    from cnnkit.cli import app

    result = CliRunner().invoke(app, ["extract", str(data), "--out", "/proc/cnnkit/run", "--backbone", "tiny_cnn",
                                      "--weights", "none", "--image-size", "32", "--cv", "3"])
    assert result.exit_code in (1, 2), result.output
    assert "/proc/cnnkit" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from cnnkit.kinds.feature_head import FeatureHeadModel
from cnnkit.runs import RunManifest, write_run

out, ready, force = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "force"
manifest = RunManifest(command="extract", class_names=["a", "b"], image_size=32, preprocessing="tf",
                       model=FeatureHeadModel(backbone="tiny_cnn", weights="none", layers=["top"], pool="avg",
                                              flip=False, head="logreg", pca=None, whiten=False, l2_normalize=False,
                                              best_params={}, cv_folds=0, feature_dims=1))

def write_files(folder):
    (folder / "head.skops").write_bytes(b"half a head")
    ready.write_text("writing")
    time.sleep(60)

write_run(out, manifest, write_files, force=force)
"""


@pytest.mark.parametrize("replace", [False, True])
def test_sigkill_while_writing_a_run_leaves_nothing_a_later_command_trusts(run, data, tmp_path, replace):
    out = run if replace else tmp_path / "new"
    before = _snapshot(run)
    ready = tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out), str(ready),
                               "force" if replace else "new"], env={**os.environ})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    if replace:
        assert _snapshot(run) == before and load_run(run).model.head == "logreg"
    else:
        with pytest.raises(CnnkitError, match="no such run folder"):
            load_run(out)
        # The half-built folder is hidden, never loaded, and does not block a new run.
        assert run_extract(data, ExtractOptions(**TINY), out).run_path == out
        assert load_run(out).model.head == "logreg"


def _paths(value, prefix=()):
    """Every (key path) inside a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*prefix, i))


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                     | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(choice=st.data())
def test_mutated_manifests_load_or_fail_with_one_line(run, tmp_path, choice):
    import shutil

    copy = tmp_path / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy)
    original = json.loads((copy / "manifest.json").read_text())
    paths = [p for p in _paths(original) if p and p[0] not in ("seal",)]
    target = choice.draw(st.sampled_from(paths))
    action = choice.draw(st.sampled_from(["replace", "delete"]))
    value = choice.draw(_JSON)
    resealed = choice.draw(st.booleans())

    def edit(data):
        parent = data
        for key in target[:-1]:
            parent = parent[key]
        if action == "delete" and isinstance(parent, dict):
            del parent[target[-1]]
        else:
            parent[target[-1]] = value

    if resealed and target[0] != "files":
        try:
            reseal(copy, edit)  # a consistent forgery: only the schema and the readers stand in the way
        except Exception:  # noqa: BLE001 - the forger's own validation refused it; write it raw instead
            resealed = False
    if not resealed:
        edit(original)
        (copy / "manifest.json").write_text(json.dumps(original))
    try:
        loaded = load_run(copy)
    except CnnkitError as error:
        assert "\n" not in str(error)
        return
    # Whatever loaded is well-typed and usable by the readers.
    assert loaded.manifest.seal == loaded.manifest.seal_of() and len(loaded.class_names) >= 2
    try:
        loaded.classifier()
    except CnnkitError as error:
        assert "\n" not in str(error)


def test_a_missing_file_is_named(run):
    (run / "index" / "labels.npy").unlink()
    with pytest.raises(CnnkitError, match="labels.npy: missing from the run"):
        load_run(run)

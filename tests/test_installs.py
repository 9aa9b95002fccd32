"""Installs that never break: with an optional package hidden, every command still runs, on TensorFlow, and says
once what to install.

Packages are hidden from a fresh process by a finder that refuses their names (as if they were not
installed); the process then runs the CLI as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cnnkit.errors import CnnkitError
from conftest import PHOTOS, make_class_tree

_HIDING = """
import importlib.abc, sys
hidden = {name for name in sys.argv[1].split(",") if name}

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Hide())
sys.argv = ["cnnkit", *sys.argv[2:]]
from cnnkit.cli import main
main()
"""


def _cnnkit(hidden: set[str], *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _HIDING, ",".join(sorted(hidden)), *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("hidden, named", [
    ({"tf2onnx"}, "tf2onnx"),  # ONNX Runtime (and OpenVINO) present, the converter not
    ({"onnx"}, "onnx"),  # OpenVINO and ONNX Runtime present, onnx not
])
def test_advise_auto_and_predict_run_on_tensorflow_and_say_once_what_to_install(hidden, named, tmp_path):
    data = make_class_tree(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    env = {**os.environ, "CNNKIT_HOME": str(tmp_path / "home"), "CNNKIT_ENGINE": ""}  # auto: measure, fall back
    for args in (["advise", str(data), "--per-class", "4"], ["auto", str(data), "--out", str(tmp_path / "run")],
                 ["predict", str(PHOTOS), "--top-k", "1"], ["predict", str(data / "a"), "--model", str(tmp_path / "run")]):
        done = _cnnkit(hidden, *args, env=env)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and named in notes[0] and "pip install" in notes[0], (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and "WARNING" not in done.stderr, (args, done.stderr[-2000:])
    record = (tmp_path / "home" / "engines" / "auto.json")
    assert not record.exists()  # nothing to choose from: TensorFlow, unmeasured


def test_an_engine_whose_conversion_fails_is_passed_over_with_a_note(monkeypatch):
    import cnnkit.convert
    import cnnkit.engines
    from cnnkit.engines import make_runner
    from cnnkit.features import FeatureConfig, FeatureExtractor

    def broken(*args, **kwargs):
        raise ValueError("an op the converter does not know")

    notes: list[str] = []
    monkeypatch.setattr(cnnkit.convert, "write_onnx", broken)
    monkeypatch.setattr(cnnkit.engines, "note", notes.append)
    monkeypatch.delenv("CNNKIT_ENGINE")  # auto measures what it can
    model = FeatureExtractor(FeatureConfig("tiny_cnn", "none", 32), "tf").model
    runner = make_runner("auto", "tiny_cnn", "broken-conversion", lambda: model, 32)
    assert runner.engine == "tf"
    assert notes and all("conversion to ONNX failed (an op the converter does not know)" in n for n in notes)
    with pytest.raises(CnnkitError, match="conversion to ONNX failed"):  # asked for by name: one line, no fallback
        make_runner("onnx", "tiny_cnn", "broken-conversion", lambda: model, 32)


def test_a_converter_that_does_not_import_is_passed_over_by_auto_and_one_line_for_export(monkeypatch):
    """tf2onnx installed but broken (find_spec sees it, its import fails): auto falls back, export says what to do."""
    import builtins

    import cnnkit.engines
    from cnnkit.convert import ConverterMissing, write_onnx
    from cnnkit.engines import make_runner
    from cnnkit.features import FeatureConfig, FeatureExtractor

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.partition(".")[0] == "tf2onnx":
            raise ImportError("tf2onnx: an incompatible protobuf")
        return real_import(name, *args, **kwargs)

    notes: list[str] = []
    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(cnnkit.engines, "note", notes.append)
    monkeypatch.delenv("CNNKIT_ENGINE")
    model = FeatureExtractor(FeatureConfig("tiny_cnn", "none", 32), "tf").model
    assert make_runner("auto", "tiny_cnn", "broken-converter", lambda: model, 32).engine == "tf"
    assert notes and all("does not import (tf2onnx: an incompatible protobuf)" in n for n in notes)
    with pytest.raises(ConverterMissing, match="^ONNX needs tf2onnx, which does not import .*pip install tf2onnx onnx$"):
        write_onnx(model, "unused.onnx", 32)

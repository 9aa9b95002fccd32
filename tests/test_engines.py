"""Inference engines: each one's numbers against TensorFlow's, `auto`, and reruns that never import TensorFlow."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cnnkit.data import load_image
from cnnkit.engines import OnnxRunner, available_engines, check_engine, choose_engine
from cnnkit.errors import CnnkitError
from cnnkit.features import FeatureConfig, FeatureExtractor
from cnnkit.options import Engine
from conftest import PHOTOS, make_class_tree

ENGINES = [Engine.onnx, Engine.openvino]


def test_the_optional_engines_are_installed_for_the_tests():
    # The test extra installs cnnkit[export]; an engine test must never pass by skipping.
    assert set(ENGINES) <= set(available_engines())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_gives_tensorflows_features_and_top1_on_the_sample_photos(engine):
    from cnnkit.predict import predict_imagenet

    config = FeatureConfig("efficientnet_lite0", image_size=224)
    images = np.stack([load_image(p, 224) for p in sorted(PHOTOS.iterdir())])
    reference = FeatureExtractor(config, Engine.tf)(images)
    features = FeatureExtractor(config, engine)(images)
    # OpenVINO computes in bfloat16 on CPUs with AMX / AVX-512-BF16 (8-bit mantissa): measured up to
    # 6 % relative error on conv1 (many cancelling terms), about 1-3 % higher up; predictions agree.
    tolerance = 1e-4 if engine == Engine.onnx else 0.1
    for stage, values in reference.items():
        error = np.linalg.norm(features[stage] - values, axis=1) / np.linalg.norm(values, axis=1)
        assert error.max() < tolerance, (stage, error.max())
    top1 = {e: [p.top[0][0] for p in predict_imagenet([PHOTOS], k=1, engine=e).predictions]
            for e in (Engine.tf, engine)}
    assert top1[engine] == top1[Engine.tf]
    assert "espresso" in top1[Engine.tf]  # the network itself works


def test_auto_measures_once_per_network_and_remembers(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path))
    extractor = FeatureExtractor(FeatureConfig("tiny_cnn", "none", 32))
    built = []

    def build():
        built.append(1)
        return extractor.model

    chosen = choose_engine("tiny_cnn", "test-key", build, 32)
    assert chosen in available_engines() and built == [1]
    record = json.loads((tmp_path / "engines" / "auto.json").read_text())
    (entry,) = record.values()
    assert entry["engine"] == chosen and set(entry["images_per_s"]) == {str(e) for e in available_engines()}
    assert choose_engine("tiny_cnn", "test-key", build, 32) == chosen and built == [1]  # no second build


@pytest.mark.parametrize("content", [b"\x00garbage", b'{"a": ' * 50_000, b"[1, 2]", b"x" * (2 << 20),
                                     b'{"%s": {"engine": "../../evil"}}', b'{"%s": "openvino"}'])
def test_a_damaged_or_crafted_speed_record_means_measuring_again(content, tmp_path, monkeypatch):
    from cnnkit.engines import speed_entry

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path))
    extractor = FeatureExtractor(FeatureConfig("tiny_cnn", "none", 32))
    (tmp_path / "engines").mkdir()
    entry = speed_entry("tiny_cnn", "test-key").encode()
    (tmp_path / "engines" / "auto.json").write_bytes(content.replace(b"%s", entry) if b"%s" in content else content)
    built = []
    chosen = choose_engine("tiny_cnn", "test-key", lambda: built.append(1) or extractor.model, 32)
    assert chosen in available_engines() and built == [1]  # measured again, no traceback
    record = json.loads((tmp_path / "engines" / "auto.json").read_text())
    assert record[entry.decode()]["engine"] == chosen


def test_a_missing_engine_package_is_one_line_saying_what_to_install(monkeypatch):
    import cnnkit.engines

    monkeypatch.setattr(cnnkit.engines, "_installed", lambda package: package not in ("openvino", "tf2onnx"))
    with pytest.raises(CnnkitError, match=r"^--engine openvino needs openvino, tf2onnx: pip install openvino tf2onnx"):
        check_engine("openvino")
    with pytest.raises(CnnkitError, match=r"^--precision bfloat16 needs OpenVINO \(openvino, tf2onnx\)"):
        check_engine("auto", "bfloat16")
    with pytest.raises(CnnkitError, match="choose from auto, tf, onnx, openvino"):
        check_engine("tensorrt")
    with pytest.raises(CnnkitError, match="only --engine openvino computes in bfloat16"):
        check_engine("tf", "bfloat16")
    assert available_engines() == [Engine.tf]


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_match_tensorflow_on_a_tiny_network(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path))
    config = FeatureConfig("tiny_cnn", "none", 32)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8)
    reference = FeatureExtractor(config, Engine.tf)(images)
    got = FeatureExtractor(config, engine)(images)
    for stage in reference:
        np.testing.assert_allclose(got[stage], reference[stage], rtol=5e-2, atol=5e-3)
    assert (tmp_path / "engines" / "tiny_cnn" / "none-32px-avg-stages" / "model.onnx").is_file()


def _pointing_outside(model: bytes, location: str) -> bytes:
    """The model with its largest weight moved to "external data" at ``location`` (a crafted cache file)."""
    import onnx

    proto = onnx.load_from_string(model)
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    length = len(weight.raw_data)
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("length", str(length))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "/etc/passwd", "../../../../etc/passwd"])
def test_a_damaged_cached_conversion_is_converted_again_not_trusted(engine, damage, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path))
    config = FeatureConfig("tiny_cnn", "none", 32)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
    first = FeatureExtractor(config, engine)(images)
    cached = tmp_path / "engines" / "tiny_cnn" / "none-32px-avg-stages" / "model.onnx"
    original = cached.read_bytes()
    damaged = ({"garbage": b"\x08\xff" * 997, "truncated": original[: len(original) // 2], "empty": b""}.get(damage)
               or _pointing_outside(original, damage))
    # A crafted conversion whose weights are "external data" in a file outside the cache: both
    # runtimes refuse the path (checked here), so it is converted again and nothing is read.
    cached.write_bytes(damaged)
    again = FeatureExtractor(config, engine)(images)
    for stage in first:
        np.testing.assert_allclose(again[stage], first[stage], rtol=1e-5, atol=1e-6)
    assert cached.read_bytes() != damaged
    OnnxRunner(cached)  # the cache holds a loadable conversion again


_NO_TENSORFLOW = """
import sys
from cnnkit.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(f"exit={code} tensorflow={'tensorflow' in sys.modules} keras={'keras' in sys.modules}", file=sys.stderr)
"""


def test_cached_reruns_of_predict_evaluate_and_similar_import_no_tensorflow(tmp_path):
    import os

    data = make_class_tree(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    env = {**os.environ, "CNNKIT_HOME": str(tmp_path / "home")}
    run = tmp_path / "run"

    def cli(*args):
        done = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW, *args], capture_output=True, text=True,
                              env=env, timeout=300)
        return done.stdout, done.stderr.strip().splitlines()[-1]

    out, status = cli("extract", str(data), "--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32",
                      "--cv", "3", "--engine", "tf", "--out", str(run), "--quiet")
    assert status == "exit=0 tensorflow=True keras=True"  # the first run computes the features
    for args in (["predict", str(data / "a"), "--model", str(run), "--json"],
                 ["evaluate", str(run), str(data), "--quiet"],
                 ["similar", str(run), str(data / "b" / "001.png"), "--json"],
                 ["extract", str(data), "--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32",
                  "--cv", "3", "--head", "knn", "--out", str(tmp_path / "knn"), "--quiet"]):
        out, status = cli(*args)
        assert status == "exit=0 tensorflow=False keras=False", (args, status)
    predicted, _ = cli("predict", str(data / "a"), "--model", str(run), "--json")
    assert {p["top"][0]["label"] for p in json.loads(predicted)} == {"a"}


def test_a_network_run_on_another_engine_needs_tensorflow_only_the_first_time(tmp_path):
    import os

    from cnnkit.options import TrainOptions
    from cnnkit.training import run_training

    data = make_class_tree(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    env = {**os.environ, "CNNKIT_HOME": str(tmp_path / "home")}
    run = run_training(data, TrainOptions(mode="train", backbone="tiny_cnn", weights="none", freeze="none",
                                          head_epochs=0, image_size=32, epochs=1, batch_size=4, val_split=0.25),
                       tmp_path / "run").run_path
    statuses = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW, "predict", str(data / "a"), "--model",
                               str(run), "--engine", "onnx", "--json"], capture_output=True, text=True, env=env,
                              timeout=300)
        statuses.append(done.stderr.strip().splitlines()[-1])
    assert statuses == ["exit=0 tensorflow=True keras=True", "exit=0 tensorflow=False keras=False"]


_SIGNAL_AFTER_OPENVINO = """
import gc, os, signal, sys, threading
import numpy as np
from cnnkit.engines import OpenVinoRunner
received = []
signal.signal(signal.SIGTERM, lambda *args: received.append(1))  # Python runs it on the alternate stack
held = [OpenVinoRunner(sys.argv[1])]
held[0](np.zeros((2, 32, 32, 3), np.uint8))
# Freed on another thread (the garbage collector runs wherever it happens to): without cnnkit's care the
# main thread's alternate signal stack was then OpenVINO's freed memory, and the signal a segfault.
freeing = threading.Thread(target=lambda: (held.clear(), gc.collect()))
freeing.start()
freeing.join()
os.kill(os.getpid(), signal.SIGTERM)
print("handled" if received else "not handled")
"""


def test_a_signal_after_openvino_ran_is_handled_not_a_segfault(tmp_path, monkeypatch):
    """OpenVINO leaves the thread's alternate signal stack on memory it frees; cnnkit puts the old one back."""
    import os

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path))
    FeatureExtractor(FeatureConfig("tiny_cnn", "none", 32), Engine.openvino)(np.zeros((1, 32, 32, 3), np.uint8))
    (model,) = (tmp_path / "engines").rglob("model.onnx")
    for _ in range(2):
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _SIGNAL_AFTER_OPENVINO, str(model)],
                              capture_output=True, text=True, timeout=120, env={**os.environ})
        assert done.returncode == 0 and done.stdout.strip() == "handled", (done.returncode, done.stderr[-2000:])


def test_openvino_leaves_the_threads_signal_stack_as_it_found_it(tmp_path, monkeypatch):
    import ctypes

    from cnnkit.engines import OpenVinoRunner

    class Stack(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    def current():
        stack = Stack()
        ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack))
        return stack.ss_sp, stack.ss_size

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path))
    FeatureExtractor(FeatureConfig("tiny_cnn", "none", 32), Engine.openvino)(np.zeros((1, 32, 32, 3), np.uint8))
    (model,) = (tmp_path / "engines").rglob("model.onnx")
    before = current()
    runner = OpenVinoRunner(model)
    runner(np.zeros((2, 32, 32, 3), np.uint8))
    assert current() == before

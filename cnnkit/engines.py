"""Inference engines: one forward-pass interface over TensorFlow, ONNX Runtime and OpenVINO.

Every command that does not train (extract's feature stage, predict,
evaluate, advise's probes, similar) runs its network through a ``Runner``: a
callable from a ``uint8`` image batch to a dict of named ``float32`` outputs.

- ``tf``: the Keras model, traced once (``inference_fn``).
- ``onnx``: ONNX Runtime on the model converted by ``cnnkit.convert`` (the
  same conversion `cnnkit export` uses).
- ``openvino``: OpenVINO reading that ONNX file, in bfloat16 where the CPU
  has AMX or AVX-512-BF16 (``INFERENCE_PRECISION_HINT``), else float32.
- ``auto``: the fastest of those installed, measured once per network and
  machine on a batch of random images and remembered in
  ``$CNNKIT_HOME/engines/auto.json``.

Each network is converted once and cached as
``$CNNKIT_HOME/engines/<name>/<key>/model.onnx`` (a backbone's key holds its
weights, input size and pooling; a run's is its seal), so a later process
runs it without importing TensorFlow at all. Why reading a cached file is
safe: an ONNX file is a protobuf of graph and tensors that both runtimes
parse as data; neither runs code from it (custom-op libraries are only loaded
when a caller registers them, and cnnkit registers none).

Numbers differ slightly between engines (float32 summation order; bfloat16
keeps 8 bits of mantissa), so features from OpenVINO bf16 agree with
TensorFlow's to about 1e-2 relative, enough for the same predictions
(tests/test_engines.py); the feature cache does not record which engine
filled it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError
from cnnkit.options import Engine
from cnnkit.paths import atomic_write, cache_dir

# The PyPI package behind each optional engine.
PACKAGES = {Engine.onnx: "onnxruntime", Engine.openvino: "openvino"}
BuildFn = Callable[[], object]  # () -> a Keras model taking uint8 images


def available_engines() -> list[Engine]:
    """TensorFlow, plus each optional engine whose package is installed."""
    return [Engine.tf] + [e for e, module in PACKAGES.items() if importlib.util.find_spec(module)]


def check_engine(engine: Engine | str) -> Engine:
    """``engine`` as an ``Engine``, or a one-line error saying what to install."""
    engine = Engine.parse(engine, "--engine")
    if engine in PACKAGES and engine not in available_engines():
        raise CnnkitError(f"--engine {engine} needs the {PACKAGES[engine]} package: "
                          f'pip install "cnnkit[export]" (or use --engine tf)')
    return engine


def inference_fn(model):
    """``model`` as one traced function that accepts any batch size without retracing."""
    import tensorflow as tf

    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


class TensorFlowRunner:
    """A Keras model run by TensorFlow."""

    engine = Engine.tf

    def __init__(self, model):
        self.model = model
        self._predict = inference_fn(model)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self._predict(images)
        if not isinstance(out, dict):
            out = {"probabilities": out}
        return {name: np.asarray(value, np.float32) for name, value in out.items()}


class OnnxRunner:
    """An ONNX file run by ONNX Runtime on the CPU."""

    engine = Engine.onnx

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(images, np.uint8)})
        return dict(zip(self.output_names, out))


def openvino_precision() -> str:
    """``bf16`` where the CPU computes in bfloat16 natively (AMX, AVX-512-BF16), else ``f32``."""
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"


class OpenVinoRunner:
    """An ONNX file compiled by OpenVINO for the CPU."""

    engine = Engine.openvino

    def __init__(self, path: Path, precision: str | None = None):
        import openvino as ov

        core = ov.Core()
        self.precision = precision or openvino_precision()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        result = self.request.infer({0: np.ascontiguousarray(images, np.uint8)})
        return {name: np.asarray(result[output], np.float32)
                for name, output in zip(self.output_names, self.compiled.outputs)}


def engine_folder(name: str, key: str) -> Path:
    return cache_dir() / "engines" / name / key


def onnx_file(name: str, key: str, build: BuildFn, image_size: int) -> Path:
    """The cached ONNX conversion of a network, converting (with TensorFlow) the first time."""
    path = engine_folder(name, key) / "model.onnx"
    if not path.is_file():
        from cnnkit.convert import write_onnx

        model = build()
        # Two processes converting at once each publish a complete file; the later one wins.
        atomic_write(path, lambda tmp: write_onnx(model, tmp, image_size))
    return path


def make_runner(engine: Engine, name: str, key: str, build: BuildFn, image_size: int, model=None):
    """A runner of one engine (``auto`` resolved by ``choose_engine``)."""
    engine = check_engine(engine)
    if engine == Engine.auto:
        engine = choose_engine(name, key, build, image_size)
    if engine == Engine.tf:
        return TensorFlowRunner(model if model is not None else build())
    convert = (lambda: model) if model is not None else build
    runner = OnnxRunner if engine == Engine.onnx else OpenVinoRunner
    path = onnx_file(name, key, convert, image_size)
    try:
        return runner(path)
    except Exception:  # noqa: BLE001 - each runtime has its own parse errors
        # The file is only a cache of cnnkit's own conversion: a damaged or edited one is
        # converted again, once, rather than trusted or turned into a traceback. An edited one
        # whose weights point at "external data" outside its folder (/etc/passwd, ../..) is
        # refused by both runtimes' path checks before anything is read (tests/test_engines.py).
        path.unlink(missing_ok=True)
        path = onnx_file(name, key, convert, image_size)
    try:
        return runner(path)
    except Exception as error:  # noqa: BLE001
        raise CnnkitError(f"{path}: {engine} cannot load cnnkit's own conversion of this network "
                          f"({str(error).splitlines()[0][:200]}); use --engine tf") from None


def machine_id() -> str:
    """The CPU model, its core count and the engines' versions: what a speed measurement depends on."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        import platform

        cpu = platform.processor() or cpu
    versions = []
    for package in ("tensorflow-cpu", "tensorflow", "onnxruntime", "openvino"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return f"{cpu}; {os.cpu_count()} cpus; " + ", ".join(versions)


def _speeds_path() -> Path:
    return cache_dir() / "engines" / "auto.json"


def _read_speeds() -> dict:
    """The remembered measurements; ``{}`` when the file is missing, damaged, crafted or too big.

    Safe on a crafted file: ``json.loads`` (data only, no code) on at most 1 MiB, deep nesting
    caught; an entry is only used when its engine is one of the installed ones (``choose_engine``).
    """
    try:
        path = _speeds_path()
        if path.stat().st_size > 1 << 20:
            return {}
        data = json.loads(path.read_text("utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}  # only a speed-up: a missing or damaged file means "measure again"


def measure(runner, images: np.ndarray, repeats: int = 3) -> float:
    """Images per second of ``runner`` on ``images`` (one untimed warm-up call first)."""
    runner(images)
    started = time.perf_counter()
    for _ in range(repeats):
        runner(images)
    return repeats * len(images) / (time.perf_counter() - started)


def choose_engine(name: str, key: str, build: BuildFn, image_size: int, batch_size: int = 32) -> Engine:
    """The fastest installed engine for a network on this machine, measured once and remembered."""
    engines = available_engines()
    if len(engines) == 1:
        return engines[0]
    entry = f"{machine_id()} | {name}/{key}"
    with _measuring_lock():  # a second process waits and reuses the result instead of racing it
        known = _read_speeds().get(entry)
        if isinstance(known, dict) and known.get("engine") in {e.value for e in engines}:
            return Engine(known["engine"])
        return _measure_engines(entry, engines, name, key, build, image_size, batch_size)


@contextmanager
def _measuring_lock():
    """An exclusive flock while the speeds are measured (none on Windows; the kernel drops it if we die)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    _speeds_path().parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_speeds_path().with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _measure_engines(entry: str, engines: list[Engine], name: str, key: str, build: BuildFn, image_size: int,
                     batch_size: int) -> Engine:
    model = build()
    images = np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8)
    speeds = {str(engine): measure(make_runner(engine, name, key, build, image_size, model=model), images)
              for engine in engines}
    best = max(speeds, key=speeds.get)
    data = _read_speeds()
    data[entry] = {"engine": best, "images_per_s": {k: round(v, 1) for k, v in speeds.items()},
                   "batch_size": batch_size, "image_size": image_size}
    try:
        atomic_write(_speeds_path(), json.dumps(data, indent=2))
    except OSError:
        pass  # an unwritable cache costs a measurement next time, nothing else
    return Engine(best)

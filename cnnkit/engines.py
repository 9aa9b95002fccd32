"""Inference engines: one forward-pass interface over TensorFlow, ONNX Runtime and OpenVINO.

Every command that does not train (extract's feature stage, predict,
evaluate, advise's probes, similar) runs its network through a ``Runner``: a
callable from a ``uint8`` image batch to a dict of named ``float32`` outputs.

- ``tf``: the Keras model, traced once (``inference_fn``).
- ``onnx``: ONNX Runtime on the model converted by ``cnnkit.convert`` (the
  same conversion `cnnkit export` uses).
- ``openvino``: OpenVINO reading that ONNX file.
- ``auto``: ``$CNNKIT_ENGINE`` when set, else the fastest usable engine,
  measured once per network, precision and machine on a batch of random
  images and remembered in ``$CNNKIT_HOME/engines/auto.json``.

Every engine computes in float32 unless the caller asks for ``bfloat16``
(OpenVINO only, on CPUs with AMX or AVX-512-BF16): the same run then gives the
same answers on every engine and machine, and as its exports do
(tests/test_kinds.py, bench/agreement.py). OpenVINO is told so (``INFERENCE_PRECISION_HINT``),
since on such CPUs it would otherwise pick bfloat16 itself, which changed 1-5 %
of predictions (docs/engines.md).

An engine is usable when its runtime and the converter (tf2onnx, onnx) are
installed and the conversion works; ``auto`` passes over one that is not and
says once, in one line, what to install (``note``), so no combination of
optional packages makes a command fail that TensorFlow alone would run.

Each network is converted once and cached as
``$CNNKIT_HOME/engines/<name>/<key>/model.onnx`` (a backbone's key holds its
weights, input size, pooling and flip-averaging; a run's is its seal), so a
later process runs it without importing TensorFlow at all. Why reading a
cached file is safe: an ONNX file is a protobuf of graph and tensors that both
runtimes parse as data; neither runs code from it (custom-op libraries are only
loaded when a caller registers them, and cnnkit registers none).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError
from cnnkit.options import Engine, Precision
from cnnkit.paths import atomic_write, cache_dir

# The PyPI packages each optional engine needs: its runtime, and the converter that writes the ONNX file it reads.
CONVERTER = ("tf2onnx", "onnx")
PACKAGES = {Engine.onnx: ("onnxruntime", *CONVERTER), Engine.openvino: ("openvino", *CONVERTER)}
NAMES = {Engine.tf: "TensorFlow", Engine.onnx: "ONNX Runtime", Engine.openvino: "OpenVINO"}
BuildFn = Callable[[], object]  # () -> a Keras model taking uint8 images


def install_hint(packages) -> str:
    """What to run for missing engine packages: ONNX Runtime and the converter come with cnnkit, OpenVINO
    with its extra."""
    packages = list(packages)
    if packages == ["openvino"]:
        return 'pip install "cnnkit[openvino]"'
    return "pip install " + " ".join(packages)

log = logging.getLogger("cnnkit")
_noted: set[str] = set()


def note(message: str) -> None:
    """Say ``message`` once per process on the ``cnnkit`` logger (the CLI prints it as one ``note:`` line)."""
    if message not in _noted:
        _noted.add(message)
        log.warning(message)


class EngineUnavailable(CnnkitError):
    """An engine cannot run this network here: a package is missing or the conversion failed."""


def missing_packages(engine: Engine) -> list[str]:
    """The packages ``engine`` needs that are not installed (none for TensorFlow); nothing is imported."""
    return [p for p in PACKAGES.get(engine, ()) if not _installed(p)]


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a finder that refuses the name, a module without a spec
        return False


def available_engines(precision: Precision | str = Precision.float32) -> list[Engine]:
    """The engines whose every package is installed that compute in ``precision`` (TensorFlow first)."""
    precision = Precision.parse(precision, "--precision")
    engines = [Engine.tf] + [e for e in PACKAGES if not missing_packages(e)]
    return engines if precision == Precision.float32 else [e for e in engines if e == Engine.openvino]


def check_engine(engine: Engine | str, precision: Precision | str = Precision.float32) -> Engine:
    """``engine`` as an ``Engine``, or a one-line error saying what to install or to choose instead."""
    engine = Engine.parse(engine, "--engine")
    precision = Precision.parse(precision, "--precision")
    missing = missing_packages(engine)
    if missing:
        raise CnnkitError(f"--engine {engine} needs {', '.join(missing)}: {install_hint(missing)} "
                          "(or use --engine auto)")
    if precision == Precision.bfloat16:
        if engine not in (Engine.auto, Engine.openvino):
            raise CnnkitError(f"--precision bfloat16: only --engine openvino computes in bfloat16 "
                              f"(--engine {engine} computes in float32)")
        missing = missing_packages(Engine.openvino)
        if missing:
            raise CnnkitError(f"--precision bfloat16 needs OpenVINO ({', '.join(missing)}): {install_hint(missing)}")
        if not openvino_has_bf16():
            raise CnnkitError("--precision bfloat16: this CPU has no bfloat16 arithmetic (AMX or AVX-512-BF16); "
                              "use --precision float32")
    return engine


class _Inference:
    """A model's inference call. An object rather than a closure: TensorFlow counts traces per Python
    function's code, so every model's closure would share one count and a job that runs several models
    (auto's probes, members, measurements) would read as one function retracing."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images):
        return self.model(images, training=False)


def inference_fn(model):
    """``model`` as a function traced once, for raw ``uint8`` batches of any size (``None`` batch dimension)."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *model.input.shape[1:]), tf.uint8, name="image")
    return tf.function(_Inference(model), input_signature=[spec])


class TensorFlowRunner:
    """A Keras model run by TensorFlow."""

    engine = Engine.tf
    precision = Precision.float32

    def __init__(self, model):
        self.model = model
        self._predict = inference_fn(model)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self._predict(images)
        if not isinstance(out, dict):
            out = {"probabilities": out}
        return {name: np.asarray(value, np.float32) for name, value in out.items()}


class OnnxRunner:
    """An ONNX file run by ONNX Runtime on the CPU, in float32."""

    engine = Engine.onnx
    precision = Precision.float32

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


def openvino_has_bf16() -> bool:
    """Whether OpenVINO can compute in bfloat16 on this CPU (AMX, AVX-512-BF16)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoRunner:
    """An ONNX file compiled by OpenVINO for the CPU, in the precision asked for (float32 by default)."""

    engine = Engine.openvino

    def __init__(self, path: Path, precision: Precision | str = Precision.float32):
        import openvino as ov

        core = ov.Core()
        self.precision = Precision.parse(precision, "--precision")
        hint = "bf16" if self.precision == Precision.bfloat16 else "f32"
        with kept_signal_stack():
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
                "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
            self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with kept_signal_stack():
            result = self.request.infer({0: np.ascontiguousarray(images, np.uint8)})
        return {name: np.asarray(result[output], np.float32)
                for name, output in zip(self.output_names, self.compiled.outputs)}


@contextmanager
def kept_signal_stack():
    """Put the calling thread's alternate signal stack back as it was after the block (Linux; else nothing).

    OpenVINO's CPU plugin points the thread that runs it at an alternate signal stack of its own
    (on CPUs with AMX, whose register state makes signal frames large) and does not always put the
    previous one back before that memory is freed. Python runs its signal handlers on the alternate
    stack (``SA_ONSTACK``), so the next Ctrl-C or SIGTERM -- the one that makes `train` save an
    interrupted run -- then killed the process with SIGSEGV instead (tests/test_engines.py).
    """
    found = _sigaltstack()
    if found is None:
        yield
        return
    sigaltstack, stack_type = found
    import ctypes

    before = stack_type()
    if sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        before.ss_flags &= ~1  # SS_ONSTACK is reported, never set
        sigaltstack(ctypes.byref(before), None)


@functools.cache
def _sigaltstack():
    """(the C library's ``sigaltstack``, its ``stack_t``) on Linux, else ``None``: looked up once, not per batch."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None

    class Stack(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    return ctypes.CDLL(None, use_errno=True).sigaltstack, Stack


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


def default_engine() -> Engine:
    """What ``auto`` means before measuring: ``$CNNKIT_ENGINE`` if set (a fixed choice), else ``auto``."""
    return Engine.parse(os.environ.get("CNNKIT_ENGINE", "auto") or "auto", "CNNKIT_ENGINE")


def make_runner(engine: Engine | str, name: str, key: str, build: BuildFn, image_size: int,
                precision: Precision | str = Precision.float32, model=None):
    """A runner of one engine; ``auto`` is resolved by ``choose_engine`` and falls back to the next usable one.

    Raises:
        CnnkitError: an engine asked for by name cannot run here, one line saying why.
    """
    engine = check_engine(engine, precision)
    precision = Precision.parse(precision, "--precision")
    if engine == Engine.auto and default_engine() != Engine.auto:
        engine = check_engine(default_engine(), precision)
    if engine != Engine.auto:
        return _runner(engine, name, key, build, image_size, precision, model)
    for candidate in choose_engines(name, key, build, image_size, precision, model=model):
        try:
            return _runner(candidate, name, key, build, image_size, precision, model)
        except EngineUnavailable as error:
            note(f"{error}; using the next engine")
    raise CnnkitError(f"no engine can run {name} at {precision} here; use --precision float32")


def _runner(engine: Engine, name: str, key: str, build: BuildFn, image_size: int, precision: Precision, model=None):
    """The runner of ``engine`` (resolved); EngineUnavailable when its conversion or runtime fails."""
    if engine == Engine.tf:
        return TensorFlowRunner(model if model is not None else build())
    convert = (lambda: model) if model is not None else build
    try:
        path = onnx_file(name, key, convert, image_size)
    except ImportError as error:  # a converter that is installed but does not import (a broken install)
        raise EngineUnavailable(f"{NAMES[engine]} needs the ONNX converter, which does not import "
                                f"({str(error).splitlines()[0][:160]}): {install_hint(CONVERTER)}") from None
    except CnnkitError:  # the network's own error (a damaged run): the same on every engine
        raise
    except Exception as error:  # noqa: BLE001 - the converter's own errors: this network cannot go to ONNX
        raise EngineUnavailable(f"{NAMES[engine]} cannot run {name}: its conversion to ONNX failed "
                                f"({str(error).splitlines()[0][:160] if str(error) else type(error).__name__})"
                                ) from None

    def load(path: Path):
        return OnnxRunner(path) if engine == Engine.onnx else OpenVinoRunner(path, precision)

    try:
        return load(path)
    except ImportError as error:
        raise EngineUnavailable(f"{NAMES[engine]} does not import ({str(error).splitlines()[0][:160]}): "
                                f"{install_hint([PACKAGES[engine][0]])}") from None
    except Exception:  # noqa: BLE001 - each runtime has its own parse errors
        # The file is only a cache of cnnkit's own conversion: a damaged or edited one is
        # converted again, once, rather than trusted or turned into a traceback. An edited one
        # whose weights point at "external data" outside its folder (/etc/passwd, ../..) is
        # refused by both runtimes' path checks before anything is read (tests/test_engines.py).
        path.unlink(missing_ok=True)
        path = onnx_file(name, key, convert, image_size)
    try:
        return load(path)
    except Exception as error:  # noqa: BLE001
        raise EngineUnavailable(f"{path}: {NAMES[engine]} cannot load cnnkit's own conversion of this network "
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
    caught; an entry is only used when its engine is one of the usable ones (``choose_engines``).
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


def speed_entry(name: str, key: str, precision: Precision | str = Precision.float32) -> str:
    """The key of a network's measurement in ``auto.json``: machine, precision and network."""
    return f"{machine_id()} | {Precision.parse(precision, '--precision')} | {name}/{key}"


def hint_for_speed() -> None:
    """One note when ``auto`` can only use TensorFlow because an engine's packages are missing (all or some)."""
    if len(available_engines()) > 1:
        return
    missing = missing_packages(Engine.onnx)
    note(f"{NAMES[Engine.onnx]} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
         f"installed, so TensorFlow runs the network at about half the speed: {install_hint(missing)}")


def choose_engines(name: str, key: str, build: BuildFn, image_size: int,
                   precision: Precision | str = Precision.float32, batch_size: int = 32, model=None) -> list[Engine]:
    """The usable engines for a network on this machine, fastest first (measured once and remembered).

    An engine whose conversion fails is left out of the measurement (with a note) and of the list.
    TensorFlow, when it computes in ``precision``, always ends the list: it needs no conversion.
    """
    precision = Precision.parse(precision, "--precision")
    hint_for_speed()
    engines = available_engines(precision)
    fallback = [Engine.tf] if Engine.tf in engines else []
    if len(engines) <= 1:
        return engines
    entry = speed_entry(name, key, precision)
    with _measuring_lock():  # a second process waits and reuses the result instead of racing it
        known = _read_speeds().get(entry)
        if isinstance(known, dict) and known.get("engine") in {e.value for e in engines}:
            best = Engine(known["engine"])
        else:
            best = _measure_engines(entry, engines, name, key, build, image_size, precision, batch_size, model)
    return [best] + [e for e in fallback if e != best]


def choose_engine(name: str, key: str, build: BuildFn, image_size: int,
                  precision: Precision | str = Precision.float32, batch_size: int = 32) -> Engine:
    """The fastest usable engine for a network (see ``choose_engines``)."""
    return choose_engines(name, key, build, image_size, precision, batch_size)[0]


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
                     precision: Precision, batch_size: int, model=None) -> Engine:
    model = model if model is not None else build()
    images = np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8)
    speeds = {}
    for engine in engines:
        try:
            speeds[str(engine)] = measure(_runner(engine, name, key, build, image_size, precision, model), images)
        except EngineUnavailable as error:
            note(f"{error}; {NAMES[Engine.tf] if Engine.tf in engines else 'another engine'} runs it instead")
    if not speeds:
        raise CnnkitError(f"no engine can run {name} at {precision} here; use --precision float32")
    best = max(speeds, key=speeds.get)
    data = _read_speeds()
    data[entry] = {"engine": best, "images_per_s": {k: round(v, 1) for k, v in speeds.items()},
                   "batch_size": batch_size, "image_size": image_size, "precision": str(precision)}
    try:
        atomic_write(_speeds_path(), json.dumps(data, indent=2))
    except OSError:
        pass  # an unwritable cache costs a measurement next time, nothing else
    return Engine(best)

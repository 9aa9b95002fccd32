"""`cnnkit export`: any run as one graph from raw ``uint8`` RGB to class probabilities.

``inference_model(run)`` is the run kind's own forward pass (``cnnkit.kinds``)
as a Keras model: a network's backbone, pooled features and softmax
classifier; a feature head's stage features and its scikit-learn head folded
into Keras layers (``cnnkit.head_graph``); an ensemble's members' graphs on the
same input, averaged with their weights. Mirror-averaging, grid pooling and
resizing for a smaller member are the ones cnnkit predicts with.

A run whose head has no exact graph (an RBF SVM: its probabilities come from
one-vs-one votes of every class pair) is refused with a one-line reason.

``export_run`` writes the graph in one format (``cnnkit.convert``), loads it
back with its own runtime (TensorFlow, the TFLite interpreter, ONNX Runtime),
runs it on images of the run's data (or ``check``) and compares it with the
run's own classifier (what ``cnnkit predict --model RUN`` computes, on the
default engine); below the agreement threshold nothing is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError
from cnnkit.options import ExportFormat, Quantize

# Least top-1 agreement with the run's own predictions an export must reach.
MIN_AGREEMENT = {Quantize.none: 0.99, Quantize.float16: 0.99, Quantize.dynamic: 0.97, Quantize.int8: 0.95}
MODEL_FILES = {ExportFormat.savedmodel: "saved_model", ExportFormat.tflite: "model.tflite",
               ExportFormat.onnx: "model.onnx"}
RESIZE = ("centre-crop a square holding crop_pct of the shorter side, resize it to image_size x image_size "
          "(bicubic), RGB, uint8, NHWC")


class ExportCheckError(CnnkitError):
    """The exported model disagrees with the run beyond the threshold: nothing was written."""


def inference_model(run):
    """A Keras model: ``image`` uint8 (None, S, S, 3) -> ``{"probabilities": (None, classes)}``."""
    import keras

    from cnnkit.kinds import get_kind

    inputs = keras.Input((run.image_size, run.image_size, 3), dtype="uint8", name="image")
    found = get_kind(run.kind, run.path).forward(run, inputs)
    return keras.Model(inputs, {"probabilities": found.probabilities}, name="cnnkit_export")


# ---------------------------------------------------------------------------
# Loading an exported file with its own runtime


def load_exported(path: Path, fmt: ExportFormat):
    """A callable ``uint8 images -> probabilities`` running an exported file in its own runtime."""
    fmt = ExportFormat.parse(fmt, "--format")
    if fmt == ExportFormat.onnx:
        from cnnkit.engines import OnnxRunner

        runner = OnnxRunner(path)
        return lambda images: runner(images)["probabilities"]
    if fmt == ExportFormat.savedmodel:
        import tensorflow as tf

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda images: serve(image=tf.constant(images))["probabilities"].numpy()
    return _tflite_runner(path)


def _tflite_runner(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the interpreter TensorFlow ships
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    interpreter = Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner("serving_default")

    def run(images):
        # The converter fixes the batch at 1 in int8 models' shapes; one image per call works for all.
        return np.concatenate([runner(image=image[None])["probabilities"] for image in images])

    return run


# ---------------------------------------------------------------------------
# Export and check


@dataclass
class Check:
    """How the exported model agrees with the run on the check images."""

    images: int
    agreement: float
    max_probability_difference: float
    threshold: float
    source: str
    accuracy_exported: float | None = None
    accuracy_run: float | None = None


@dataclass
class ExportResult:
    out: Path
    format: str
    quantize: str
    model_file: str
    size_bytes: int
    check: Check
    seconds: dict[str, float] = field(default_factory=dict)


def check_images(run, data: str | Path | None, count: int, seed: int = 0, split: str = "test"):
    """Up to ``count`` decoded images (and labels in the run's classes) from ``data`` or the run's data.

    Returns:
        (images, labels, source): labels is ``None`` when the data's classes are not the run's.
    """
    from cnnkit.data import find_images, load_dataset, load_image, sample_per_class

    source = data if data is not None else (run.manifest.data.source if run.manifest.data else None)
    if not source or not Path(source).exists():
        raise CnnkitError(f"{run.path}: its training data ({source or 'not recorded'}) is not here; "
                          "give --check DATA with images to compare on")
    labels = None
    try:
        dataset = load_dataset(source)
        samples = (dataset.splits.get(split) or dataset.splits.get("val") or dataset.samples)
        per_class = max(1, -(-count // max(len(dataset.class_names), 1)))
        samples = sample_per_class(samples, per_class, seed)[:count]
        paths = [s.path for s in samples]
        if set(dataset.class_names) <= set(run.class_names):
            labels = np.array([run.class_names.index(dataset.class_names[s.label]) for s in samples])
    except CnnkitError:  # not a labelled dataset: any images will do for a comparison
        paths, _ = find_images([str(source)])
        paths = paths[:count]
    images, keep = [], []
    for i, path in enumerate(paths):
        try:
            images.append(load_image(path, run.image_size, run.crop_pct))
            keep.append(i)
        except CnnkitError:
            continue
    if not images:
        raise CnnkitError(f"--check {source}: no readable images to compare on")
    return np.stack(images), (labels[keep] if labels is not None else None), str(source)


def representative_images(run, count: int = 200, seed: int = 0) -> list[np.ndarray]:
    """Decoded training images of the run (for int8 calibration), in batches of 32."""
    images, _, _ = check_images(run, None, count, seed, split="train")
    return [images[i:i + 32] for i in range(0, len(images), 32)]


def in_batches(fn, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([np.asarray(fn(images[i:i + batch_size]), np.float32)
                           for i in range(0, len(images), batch_size)])


def export_run(run_path: str | Path, fmt: ExportFormat | str, out: str | Path, quantize: Quantize | str = "none",
               check: str | Path | None = None, check_images_count: int = 200,
               min_agreement: float | None = None, force: bool = False) -> ExportResult:
    """Export a run and check it against the run's own predictions; publish only if it agrees.

    Args:
        run_path: the run folder.
        fmt: savedmodel, tflite or onnx.
        out: the folder to write: the model, ``labels.txt`` and ``model.json``.
        quantize: TFLite only: none, float16, dynamic or int8 (calibrated on
            the run's training images).
        check: images to compare on (default: the run's data, its test split
            when there is one).
        min_agreement: least top-1 agreement (default ``MIN_AGREEMENT``).
        force: replace an existing export at ``out``.

    Raises:
        ExportCheckError: agreement below the threshold (nothing written).
        CnnkitError: bad input, one line naming it.
    """
    from cnnkit import __version__
    from cnnkit.convert import write_onnx, write_savedmodel, write_tflite
    from cnnkit.paths import publish_folder
    from cnnkit.runs import load_run

    fmt = ExportFormat.parse(fmt, "--format")
    quantize = Quantize.parse(quantize, "--quantize")
    if quantize != Quantize.none and fmt != ExportFormat.tflite:
        raise CnnkitError(f"--quantize {quantize}: only --format tflite is quantized; drop --quantize")
    out = Path(out)
    if out.exists() and not force:
        raise CnnkitError(f"--out {out}: already exists; choose another folder or pass --force to replace it")
    if out.exists() and not (out / "model.json").is_file():
        raise CnnkitError(f"--out {out}: exists and is not a cnnkit export; refusing to replace it")
    threshold = MIN_AGREEMENT[quantize] if min_agreement is None else float(min_agreement)
    run = load_run(run_path)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    images, labels, source = check_images(run, check, check_images_count)
    reference = in_batches(run.classifier(), images)  # as `cnnkit predict --model RUN` computes it
    model = inference_model(run)
    seconds["build"] = time.perf_counter() - started
    model_file = MODEL_FILES[fmt]
    result: dict = {}

    def build(folder: Path) -> None:
        started = time.perf_counter()
        target = folder / model_file
        if fmt == ExportFormat.savedmodel:
            write_savedmodel(model, target, run.image_size)
        elif fmt == ExportFormat.onnx:
            write_onnx(model, target, run.image_size)
        else:
            representative = representative_images(run) if quantize == Quantize.int8 else None
            write_tflite(model, target, run.image_size, quantize, representative, run.class_names)
        seconds["convert"] = time.perf_counter() - started
        started = time.perf_counter()
        exported = in_batches(load_exported(target, fmt), images)
        seconds["check"] = time.perf_counter() - started
        agreement = float(np.mean(exported.argmax(1) == reference.argmax(1)))
        result["check"] = Check(
            images=len(images), agreement=agreement,
            max_probability_difference=float(np.abs(exported - reference).max()), threshold=threshold,
            source=source,
            accuracy_exported=float(np.mean(exported.argmax(1) == labels)) if labels is not None else None,
            accuracy_run=float(np.mean(reference.argmax(1) == labels)) if labels is not None else None)
        if agreement < threshold:
            raise ExportCheckError(
                f"{run_path}: the {fmt} export agrees with the run on {agreement:.1%} of {len(images)} images "
                f"(threshold {threshold:.1%}); nothing written -- try another --quantize")
        (folder / "labels.txt").write_text("\n".join(run.class_names) + "\n", encoding="utf-8")
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) if target.is_dir() \
            else target.stat().st_size
        result["size"] = size
        (folder / "model.json").write_text(json.dumps({
            "format": str(fmt), "file": model_file, "quantize": str(quantize), "size_bytes": size,
            "input": {"name": "image", "dtype": "uint8", "shape": [None, run.image_size, run.image_size, 3],
                      "layout": "NHWC, RGB, raw pixels 0..255"},
            "output": {"name": "probabilities", "dtype": "float32", "shape": [None, len(run.class_names)]},
            "image_size": run.image_size, "crop_pct": run.crop_pct, "resize": RESIZE,
            "preprocessing": f"{run.manifest.preprocessing} (inside the model: feed raw pixels)",
            "class_names": run.class_names, "cnnkit_version": __version__,
            "source_run": {"path": str(Path(run_path).resolve()), "seal": run.manifest.seal,
                           "command": run.manifest.command, "kind": run.kind,
                           "command_line": run.manifest.command_line},
            "check": asdict(result["check"]),
        }, indent=2, ensure_ascii=False), encoding="utf-8")

    publish_folder(out, build, replace=force)
    return ExportResult(out, str(fmt), str(quantize), model_file, result["size"], result["check"], seconds)

"""`cnnkit export`: any run as one graph from raw ``uint8`` RGB to class probabilities.

``inference_model(run)`` builds that graph in Keras, by the kind of run:

- network (finetune, train): the run's backbone, pooled features and softmax
  classifier (augmentation and dropout are identity at inference and left out);
- feature_head (extract): the backbone cut at the run's stages, each globally
  pooled (and averaged with the mirror image's with ``--flip``), then the
  scikit-learn head folded into Keras layers: L2 normalisation, and the affine
  steps -- standardisation, PCA (whitened or not) and the linear classifier --
  multiplied out into one Dense layer, followed by a softmax (logistic
  regression) or by the per-class sigmoid calibration of a linear SVM as an
  elementwise layer, normalised and averaged over the calibration folds
  exactly as scikit-learn does; a k-NN head as the exact distances to the
  stored training features, top-k and inverse-distance voting;
- ensemble: each member's graph on the same input, probabilities averaged
  with the members' weights; a member taking a smaller input sees the image resized
  (``cnnkit.models.resize_view``, as cnnkit itself does).

An RBF SVM head is refused with a one-line reason: its probabilities come
from the one-vs-one votes of every class pair, which an exact graph would
have to rebuild pair by pair; use ``--head logreg``, ``linear-svm`` or ``knn``.

``export_run`` writes the graph in one format (``cnnkit.convert``), loads it
back with its own runtime (TensorFlow, the TFLite interpreter, ONNX Runtime),
runs it on images of the run's data (or ``check``) and compares it with the
run's own classifier (what ``cnnkit predict --model RUN`` computes); below the
agreement threshold nothing is written.
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


# ---------------------------------------------------------------------------
# The graph


def inference_model(run):
    """A Keras model: ``image`` uint8 (None, S, S, 3) -> ``{"probabilities": (None, classes)}``."""
    import keras

    inputs = keras.Input((run.image_size, run.image_size, 3), dtype="uint8", name="image")
    return keras.Model(inputs, {"probabilities": class_probabilities(run, inputs)}, name="cnnkit_export")


def class_probabilities(run, images):
    """The symbolic class probabilities of ``run`` for the symbolic uint8 ``images``."""
    if run.kind == "network":
        return _network_probabilities(run, images)
    if run.kind == "feature_head":
        return _feature_head_probabilities(run, images)
    if run.kind == "ensemble":
        return _ensemble_probabilities(run, images)
    raise CnnkitError(f"{run.path}: cnnkit cannot export a {run.kind!r} model yet; upgrade cnnkit")


def _network_probabilities(run, images):
    import keras
    from keras import ops

    import cnnkit.backbones.preprocessing  # noqa: F401 - registers the Preprocess layer
    from cnnkit.training.network import pooled_features

    path = run.file("model.keras")
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds on a bad file
        raise CnnkitError(f"{path}: cannot load the model safely ({error})") from None
    x = ops.cast(images, "float32")
    try:
        layers = [model.get_layer(name) for name in ("backbone", run.model.feature_layer, "predictions")]
    except ValueError:  # not cnnkit's usual layout: the whole model, in inference mode
        layers = [model]
    for layer in layers:  # unique within an ensemble's graph, whose members share these names
        layer.name = f"{layer.name}_{_tag(run)}"
    if len(layers) == 1:
        probabilities = layers[0](x, training=False)
        # A layout without the pooled layer to average at: the two views' probabilities averaged.
        return (probabilities + layers[0](ops.flip(x, axis=2), training=False)) / 2.0 if run.model.flip \
            else probabilities
    backbone, pool, classifier = layers
    return classifier(pooled_features(backbone, pool, x, run.model.flip))


def _feature_head_probabilities(run, images):
    from keras import ops

    from cnnkit.backbones import BackboneSpec
    from cnnkit.features import FeatureConfig, FeatureExtractor, unmirror
    from cnnkit.heads import load_head

    m = run.model
    head = load_head(run.file("head.skops"))
    extractor = FeatureExtractor(FeatureConfig(m.backbone, m.weights, run.image_size, m.pool, m.flip, m.grid))
    stages = extractor.model
    stages.name = f"{stages.name}_{_tag(run)}"  # unique within an ensemble's graph
    x = ops.cast(images, "float32")

    def features(pixels, mirrored: bool = False):
        out = stages(pixels)
        keys = [BackboneSpec.stage_key(layer) for layer in m.layers]
        # A mirror image's grid regions are put back in place before averaging (cnnkit.features).
        parts = [unmirror(out[k], extractor.grid_of(k), ops) if mirrored else out[k] for k in keys]
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)

    feats = features(x)
    if m.flip:
        feats = (feats + features(ops.flip(x, axis=2), mirrored=True)) / 2.0
    return head_probabilities(head, feats, suffix=f"_{_tag(run)}")


def _tag(run) -> str:
    return run.manifest.seal[:8] or "run"


def _ensemble_probabilities(run, images):
    from keras import ops

    from cnnkit.models import resize_view

    total, weights = None, 0.0
    for member_run, weight in run.members():  # verified: inside the folder, sealed as recorded, same classes
        if member_run.crop_pct != run.crop_pct:
            raise CnnkitError(f"{run.path}: member {member_run.path} crops {member_run.crop_pct} of the image, the "
                              f"ensemble {run.crop_pct}; cnnkit exports ensembles whose members share one crop")
        # A smaller member sees the ensemble's image resized as cnnkit.models.member_view resizes it.
        seen = images if member_run.image_size == run.image_size else resize_view(images, member_run.image_size)
        order = [member_run.class_names.index(name) for name in run.class_names]
        probabilities = ops.take(class_probabilities(member_run, seen), order, axis=-1) * weight
        total = probabilities if total is None else total + probabilities
        weights += weight
    return total / weights


class _Affine:
    """``x @ matrix + offset``, built up step by step in float64 and applied as one Dense layer."""

    def __init__(self, dims: int):
        self.matrix = np.eye(dims)
        self.offset = np.zeros(dims)

    def then(self, matrix: np.ndarray, offset: np.ndarray) -> None:
        self.matrix = self.matrix @ matrix
        self.offset = self.offset @ matrix + offset

    def dense(self, x, name: str):
        import keras

        layer = keras.layers.Dense(self.matrix.shape[1], name=name)
        y = layer(x)
        layer.set_weights([self.matrix.astype(np.float32), self.offset.astype(np.float32)])
        return y


def head_probabilities(pipeline, feats, suffix: str = ""):
    """A fitted cnnkit head (scikit-learn pipeline) as Keras layers on symbolic features.

    Raises:
        CnnkitError: a step with no exact graph (an RBF SVM), with the head to use instead.
    """
    from keras import ops
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import Normalizer, StandardScaler

    *transforms, classifier = [step for _, step in pipeline.steps]
    x = feats
    affine = _Affine(int(feats.shape[-1]))
    for step in transforms:
        if isinstance(step, Normalizer):
            # sklearn divides by the row's L2 norm, leaving all-zero rows as they are.
            norm = ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True))
            x = x / ops.where(norm > 0, norm, ops.ones_like(norm))
        elif isinstance(step, StandardScaler):
            mean = step.mean_ if step.with_mean else np.zeros(step.n_features_in_)
            scale = step.scale_ if step.with_std else np.ones(step.n_features_in_)
            affine.then(np.diag(1.0 / scale), -mean / scale)
        elif isinstance(step, PCA):
            matrix = step.components_.T.astype(np.float64)
            if step.whiten:
                matrix = matrix / np.sqrt(step.explained_variance_)
            affine.then(matrix, -step.mean_ @ matrix)
        else:
            raise CnnkitError(f"cannot export a head with a {type(step).__name__} step")

    if isinstance(classifier, LogisticRegression):
        affine.then(classifier.coef_.T, classifier.intercept_)
        logits = affine.dense(x, "head" + suffix)
        if classifier.coef_.shape[0] == 1:  # binary: one logit for classes_[1]
            positive = ops.sigmoid(logits)
            return ops.concatenate([1.0 - positive, positive], axis=-1)
        return ops.softmax(logits, axis=-1)
    if isinstance(classifier, CalibratedClassifierCV) and _is_linear_svm(classifier):
        return _calibrated_linear(classifier, affine, x, "head" + suffix)
    if isinstance(classifier, KNeighborsClassifier):
        return _knn(classifier, affine.dense(x, "embedding" + suffix))
    raise CnnkitError(f"cannot export a {_head_name(classifier)} head exactly: its probabilities come from "
                      "one-vs-one votes over every class pair; re-create the run with --head logreg, "
                      "linear-svm or knn to export it")


def _head_name(classifier) -> str:
    inner = getattr(classifier, "estimator", classifier)
    return "RBF SVM" if type(inner).__name__ == "SVC" else type(inner).__name__


def _is_linear_svm(calibrated) -> bool:
    from sklearn.svm import LinearSVC

    return (calibrated.method == "sigmoid"
            and all(isinstance(c.estimator, LinearSVC) for c in calibrated.calibrated_classifiers_))


def _calibrated_linear(calibrated, affine: _Affine, x, name: str):
    """Platt-calibrated linear SVMs, one per calibration fold, as scikit-learn's ``predict_proba``.

    Each fold: decision d = x W + b per class; p = sigmoid(-(a d + b')) per
    class (the fitted ``_SigmoidCalibration``); binary: [1 - p, p]; else p
    normalised to sum 1 (uniform where all are 0). Folds are averaged.
    """
    from keras import ops

    n_classes = len(calibrated.classes_)
    members = calibrated.calibrated_classifiers_
    matrices, offsets, slopes, shifts = [], [], [], []
    for member in members:
        if not np.array_equal(member.estimator.classes_, calibrated.classes_):
            raise CnnkitError("cannot export this linear-svm head: a calibration fold lacked a class; "
                              "re-create the run with --head logreg")
        matrices.append(member.estimator.coef_.T)
        offsets.append(np.atleast_1d(member.estimator.intercept_))
        slopes.append([c.a_ for c in member.calibrators])
        shifts.append([c.b_ for c in member.calibrators])
    affine.then(np.concatenate(matrices, axis=1), np.concatenate(offsets))
    decisions = affine.dense(x, name)  # (n, folds * columns)
    slope = np.concatenate(slopes).astype(np.float32)
    shift = np.concatenate(shifts).astype(np.float32)
    calibrated_columns = ops.sigmoid(-(decisions * slope + shift))  # the calibration, elementwise
    columns = 1 if n_classes == 2 else n_classes
    per_fold = ops.reshape(calibrated_columns, (-1, len(members), columns))
    if n_classes == 2:
        probabilities = ops.concatenate([1.0 - per_fold, per_fold], axis=-1)
    else:
        total = ops.sum(per_fold, axis=-1, keepdims=True)
        probabilities = ops.where(total > 0, per_fold / ops.where(total > 0, total, ops.ones_like(total)),
                                  ops.ones_like(per_fold) / n_classes)
    return ops.mean(probabilities, axis=1)


def _knn(knn, embedded):
    """Exact k-NN with inverse-distance weights, as ``KNeighborsClassifier(weights="distance")``.

    Squared distances to every stored training vector are one matrix
    product (|q|^2 - 2 q.X + |X|^2); the k smallest are taken with top-k; a
    neighbour at distance 0 takes all the weight, as in scikit-learn.
    """
    from keras import ops

    if knn.weights not in ("distance", "uniform") or knn.effective_metric_ != "euclidean":
        raise CnnkitError("cannot export this k-NN head (only Euclidean distance is exported); "
                          "re-create the run with --head logreg")
    reference = np.asarray(knn._fit_X, np.float64)  # scikit-learn keeps the training vectors here
    # Distances do not change when both sides move; centring keeps |q|^2 - 2 q.X + |X|^2 from
    # cancelling large terms in float32.
    centre = reference.mean(axis=0)
    reference = reference - centre
    embedded = embedded - centre.astype(np.float32)
    labels = np.asarray(knn._y).reshape(-1)
    n_classes = len(knn.classes_)
    k = min(knn.n_neighbors, len(reference))
    squared = (ops.sum(embedded * embedded, axis=-1, keepdims=True)
               - 2.0 * ops.matmul(embedded, reference.T.astype(np.float32))
               + (reference ** 2).sum(axis=1).astype(np.float32))
    negative, index = ops.top_k(-squared, k=k, sorted=True)
    distance = ops.sqrt(ops.maximum(-negative, 0.0))
    one_hot = ops.take(np.eye(n_classes, dtype=np.float32)[labels], index, axis=0)  # (n, k, classes)
    if knn.weights == "uniform":
        weights = ops.ones_like(distance)
    else:
        exact = ops.cast(distance <= 0.0, "float32")
        any_exact = ops.max(exact, axis=-1, keepdims=True)
        weights = ops.where(any_exact > 0, exact, 1.0 / ops.maximum(distance, 1e-30))
    votes = ops.sum(one_hot * ops.expand_dims(weights, -1), axis=1)
    return votes / ops.sum(votes, axis=-1, keepdims=True)


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
    reference = in_batches(run.classifier(), images)
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

"""Classifying image files: with a backbone's own ImageNet head, or a trained run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.backbones.registry import DEFAULT_BACKBONE
from cnnkit.classifier import Classifier, RunnerClassifier
from cnnkit.data import SkippedFile, find_images

ProgressFn = Callable[[int, int], None]


@dataclass
class Prediction:
    """The top classes for one image, best first; scores are probabilities."""

    path: Path
    top: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "top": [{"label": l, "score": s} for l, s in self.top]}


@dataclass
class PredictionReport:
    """Predictions for every readable image, and the inputs that were not."""

    predictions: list[Prediction]
    failures: list[SkippedFile] = field(default_factory=list)


def top_k(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable classes of each row, best first."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(class_names[j], float(row[j])) for j in idx] for row, idx in zip(probabilities, order)]


def run_classifier(classifier: Classifier, inputs: Sequence[str | Path], class_names: Sequence[str], k: int = 5,
                   batch_size: int = 32, progress: ProgressFn | None = None, tta=None) -> PredictionReport:
    """Classify image files.

    Args:
        classifier: a ``cnnkit.classifier.Classifier`` (a run's, or a backbone's ImageNet classifier).
        tta: a ``cnnkit.tta.TTA`` to average each image's views, or ``None``.
    """
    if tta is not None:
        from cnnkit.tta import TTAClassifier

        classifier = TTAClassifier(classifier, tta)
    paths, problems = find_images(list(inputs))
    found = classifier.predict_files(paths, batch_size, progress)
    tops = top_k(found.probabilities, class_names, k) if len(found.kept) else []
    predictions = [Prediction(paths[int(i)], top) for i, top in zip(found.kept, tops)]
    return PredictionReport(predictions, problems + found.failures)


def predict_imagenet(inputs: Sequence[str | Path], backbone: str = DEFAULT_BACKBONE, k: int = 5,
                     batch_size: int = 32, weights: str | Path = "imagenet",
                     progress: ProgressFn | None = None, engine: str = "auto", tta=None,
                     precision: str = "float32") -> PredictionReport:
    """Name what is in each image with the backbone's own ImageNet classifier.

    Args:
        inputs: files, folders or glob patterns.
        backbone: a registry name.
        k: how many classes to return per image.
        weights: "imagenet" or a weights file for the backbone.
        engine: what runs the network (``cnnkit.engines``), in ``precision``.
        tta: a ``cnnkit.tta.TTA`` to average each image's views, or ``None``.
    """
    from cnnkit.backbones import get_backbone, imagenet_class_names
    from cnnkit.engines import make_runner
    from cnnkit.features import FeatureConfig

    spec = get_backbone(backbone)
    if weights not in ("imagenet", None) and not Path(weights).exists():
        spec.build(weights=weights, include_top=True)  # the registry's one-line error
    tag = FeatureConfig(backbone, str(weights), spec.input_size).weights_tag
    runner = make_runner(engine, backbone, f"{tag}-{spec.input_size}px-imagenet-classifier",
                         lambda: spec.build(weights=weights, include_top=True), spec.input_size, precision)
    names = imagenet_class_names()
    classifier = RunnerClassifier(runner, spec.input_size, spec.crop_pct, len(names))
    return run_classifier(classifier, inputs, names, k, batch_size, progress, tta)


def predict_run(inputs: Sequence[str | Path], run_path: str | Path, k: int = 5, batch_size: int = 32,
                progress: ProgressFn | None = None, engine: str = "auto", tta=None,
                precision: str = "float32") -> PredictionReport:
    """Classify images with a trained run (from extract, finetune, train or ensemble).

    Args:
        engine: what runs the network (``cnnkit.engines``), in ``precision``; a feature-head run
            whose images are all in the feature cache runs none.
        tta: ``True`` for the views the run chose on its held-out images (``Run.tta_classifier``),
            a ``cnnkit.tta.TTA`` for those views, or ``None``.
    """
    from cnnkit.evaluation import tta_classifier
    from cnnkit.runs import load_run

    run = load_run(run_path)
    classifier, _ = tta_classifier(run, tta, engine, precision)
    return run_classifier(classifier, inputs, run.class_names, k, batch_size, progress)

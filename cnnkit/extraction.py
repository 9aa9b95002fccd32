"""The first level of use: a pretrained CNN as a fixed feature extractor plus a classical head.

Features of the chosen stage(s) -> (PCA) -> SVM / linear SVM / logistic
regression / k-NN, tuned by cross-validation, evaluated on the validation and
test images, and saved as a run that predict, evaluate and similar read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError
from cnnkit.data import Dataset, SkippedFile, load_dataset, split_dataset
from cnnkit.features import FeatureConfig, compute_features, parse_layers
from cnnkit.heads import HEADS, FittedHead, fit_head, parse_pca, save_head


@dataclass
class ExtractOptions:
    """Settings of an extract run (the CLI flags, as a library object)."""

    backbone: str = "efficientnet_lite0"
    layers: str = "top"
    weights: str = "imagenet"
    image_size: int | None = None
    pool: str = "avg"
    flip: bool = False
    l2_normalize: bool = False
    pca: str | int | None = "auto"
    whiten: bool = False
    head: str = "logreg"
    cv: int = 5
    val_split: float = 0.2
    seed: int = 0
    batch_size: int = 32
    use_cache: bool = True
    strict: bool = False


@dataclass
class ExtractResult:
    """What an extract run measured and where it was saved."""

    run_path: Path | None
    dataset: Dataset
    layers: list[str]
    feature_dims: int
    fitted: FittedHead
    metrics: dict[str, float | None]
    counts: dict[str, int]
    skipped: list[SkippedFile] = field(default_factory=list)
    computed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def _accuracy(pipeline, features: np.ndarray, labels: np.ndarray) -> float | None:
    if len(labels) == 0:
        return None
    return float(np.mean(pipeline.predict(features) == labels))


def run_extract(data: str | Path, options: ExtractOptions, out: str | Path | None = None,
                force: bool = False, progress: Callable[[int, int], None] | None = None,
                dataset: Dataset | None = None) -> ExtractResult:
    """Fit a feature-extraction classifier on ``data`` and save it to ``out``.

    Args:
        data: a dataset folder or CSV (see ``load_dataset``).
        options: backbone, layers, head and the rest.
        out: the run folder to write; ``None`` to only measure.
        force: replace an existing run at ``out``.
        progress: ``(done, total)`` callback over images needing a forward pass.
        dataset: an already loaded dataset (``data`` is then only recorded).
    """
    from cnnkit.backbones import get_backbone
    from cnnkit.runs import check_destination, write_run

    if out is not None:
        check_destination(Path(out), force)
    spec = get_backbone(options.backbone)
    layers = parse_layers(spec, options.layers)
    if options.head not in HEADS:
        raise CnnkitError(f"--head {options.head!r}: choose from {', '.join(HEADS)}")
    pca = parse_pca(options.pca)
    config = FeatureConfig(options.backbone, options.weights, options.image_size, options.pool,
                           options.flip).resolved()
    timings: dict[str, float] = {}

    started = time.perf_counter()
    dataset = dataset or load_dataset(data, strict=options.strict)
    splits = split_dataset(dataset, options.val_split, options.seed)
    samples = [s for split in splits.values() for s in split]
    table = compute_features([s.path for s in samples], config, options.batch_size,
                             options.use_cache, progress=progress)
    timings["features"] = time.perf_counter() - started
    if options.strict and table.failures:
        first = table.failures[0]
        raise CnnkitError(f"{first.path}: {first.reason} (drop --strict to skip unreadable files)")

    split_of = np.array([name for name, split in splits.items() for _ in split])
    labels = np.array([s.label for s in samples], np.int64)
    x_all = table.select(layers)
    kept_split, kept_labels = split_of[table.kept], labels[table.kept]
    parts = {name: (x_all[kept_split == name], kept_labels[kept_split == name]) for name in splits}

    started = time.perf_counter()
    x_train, y_train = parts["train"]
    fitted = fit_head(x_train, y_train, options.head, pca, options.whiten, options.l2_normalize,
                      options.cv, options.seed)
    timings["head"] = time.perf_counter() - started
    metrics = {"cv_accuracy": fitted.cv_accuracy, "train_accuracy": _accuracy(fitted.pipeline, *parts["train"])}
    for name in ("val", "test"):
        if name in parts:
            metrics[f"{name}_accuracy"] = _accuracy(fitted.pipeline, *parts[name])
    counts = {name: int(len(y)) for name, (_, y) in parts.items()}

    run_path = None
    if out is not None:
        train_paths = [samples[i].path for i in table.kept[kept_split == "train"]]

        def write_files(folder: Path) -> None:
            from cnnkit.similarity import write_index

            from cnnkit.models import embed_features

            save_head(fitted.pipeline, folder / "head.skops")
            write_index(folder, embed_features(fitted.pipeline, x_train), y_train, train_paths)

        manifest = {
            "strategy": "extract",
            "backbone": config.backbone,
            "weights": str(config.weights),
            "layers": layers,
            "image_size": config.image_size,
            "crop_pct": 1.0,
            "pool": config.pool,
            "flip": config.flip,
            "preprocessing": spec.preprocessing,
            "class_names": dataset.class_names,
            "head": {"kind": options.head, "pca": pca, "whiten": options.whiten,
                     "l2_normalize": options.l2_normalize, "best_params": fitted.best_params,
                     "cv_folds": fitted.cv_folds},
            "feature_dims": int(x_all.shape[1]),
            "metrics": metrics,
            "data": {"source": str(Path(data).resolve()), "counts": counts,
                     "classes": dataset.summary().counts, "skipped": len(dataset.skipped) + len(table.failures)},
        }
        run_path = write_run(out, manifest, write_files, force)

    return ExtractResult(run_path, dataset, layers, int(x_all.shape[1]), fitted, metrics, counts,
                         dataset.skipped + table.failures, table.computed, timings)

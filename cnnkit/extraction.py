"""The first level of use: a pretrained CNN as a fixed feature extractor plus a classical head.

Features of the chosen stage(s) -> (PCA) -> SVM / linear SVM / logistic
regression / k-NN, tuned by cross-validation, evaluated on the validation and
test images, and saved as a run that predict, evaluate and similar read.

``--layer auto`` and ``--head auto`` search: every candidate stage set
(``STAGE_CANDIDATES``) is scored by cross-validation with a logistic head,
then the best set also with an RBF SVM, and the best (stages, head) is fitted.
One forward pass gives every stage, so the search costs no extra network time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnkit.data import Dataset, Sample, SkippedFile, load_excluding, split_dataset
from cnnkit.errors import CnnkitError
from cnnkit.features import FeatureConfig, compute_features, parse_layers, take_rows
from cnnkit.heads import FittedHead, fit_head, save_head
from cnnkit.kinds import TriedRow
from cnnkit.options import ExtractOptions, Head

if TYPE_CHECKING:
    from cnnkit.evaluation import Evaluation

# Stage sets `--layer auto` compares: single stages, and the combinations
# that beat single stages on our benchmarks (docs/benchmarks.md).
STAGE_CANDIDATES = ("conv3", "conv4", "top", "conv4,top", "conv3,conv4,top")
AUTO = "auto"
# Fewer validation images than this: the views are measured out of fold on the (more) training images.
VALIDATION_EVIDENCE = 100


@dataclass
class ExtractResult:
    """What an extract run measured and where it was saved.

    ``tried`` lists each (layers, head) the search scored, with its CV accuracy; ``evaluation``
    holds the held-out probabilities the run's report shows, measured on ``held_out`` ("test",
    "val", or "cv": out-of-fold on the training images), when there were any.
    """

    run_path: Path | None
    dataset: Dataset
    layers: list[str]
    head: str
    feature_dims: int
    fitted: FittedHead
    metrics: dict[str, float | None]
    counts: dict[str, int]
    skipped: list[SkippedFile] = field(default_factory=list)
    computed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    tried: list[TriedRow] = field(default_factory=list)
    evaluation: Evaluation | None = None
    held_out: str | None = None


def _predict(pipeline, features: np.ndarray, method: str = "predict") -> np.ndarray:
    """``pipeline.predict`` (or ``method``) on one thread, as fit_head fits: k-NN's distances run in
    scikit-learn's OpenMP loop, and on these small matrices two threads on a busy two-core machine
    are ~5x slower than one (800 x 1,280 k-NN: 0.22 s vs 0.04 s)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return getattr(pipeline, method)(features)


def _accuracy(pipeline, features: np.ndarray, labels: np.ndarray) -> float | None:
    if len(labels) == 0:
        return None
    return float(np.mean(_predict(pipeline, features) == labels))


def search_head(table, rows: np.ndarray, labels: np.ndarray, layer_sets: Sequence[list[str]],
                heads: Sequence[Head], options: ExtractOptions,
                report: Callable[[TriedRow], None] | None = None) -> tuple[list[TriedRow], list[str], Head]:
    """Score stage sets with a logistic head, then the best set with each other head, by CV.

    PCA is left out of the search to keep it quick; the final fit uses the
    options' PCA. ``report`` is called with each candidate's entry as it is
    scored. Returns (tried, best layers, best head).
    """
    tried: list[TriedRow] = []

    def score(layers: list[str], head: Head) -> None:
        try:
            fitted = fit_head(table.select(layers)[rows], labels, head, None, options.whiten,
                              options.l2_normalize, options.cv, options.seed, cache=options.use_cache,
                              param_value=options.head_param)
        except CnnkitError as error:  # e.g. too few images per class for this head
            tried.append(TriedRow(layers=",".join(layers), head=str(head), error=str(error)))
            return
        tried.append(TriedRow(layers=",".join(layers), head=str(head), cv_accuracy=fitted.cv_accuracy,
                              best_params=fitted.best_params))
        if report:
            report(tried[-1])

    first, *others = heads
    for layers in layer_sets:
        score(layers, first)
    scored = [t for t in tried if t.cv_accuracy is not None]
    if not scored:
        return tried, layer_sets[0], first
    best_layers = max(scored, key=lambda t: t.cv_accuracy).layers.split(",")
    for head in others:
        score(best_layers, head)
    best = max((t for t in tried if t.cv_accuracy is not None), key=lambda t: t.cv_accuracy)
    return tried, best.layers.split(","), Head(best.head)


def run_extract(data: str | Path, options: ExtractOptions, out: str | Path | None = None,
                force: bool = False, progress: Callable[[int, int], None] | None = None,
                dataset: Dataset | None = None, attach: Sequence = (),
                table_strategy: str | None = None, report: Callable[[TriedRow], None] | None = None) -> ExtractResult:
    """Fit a feature-extraction classifier on ``data`` and save it to ``out``.

    Args:
        data: a dataset folder or CSV (see ``load_dataset``).
        options: backbone, layers, head and the rest.
        out: the run folder to write; ``None`` to only measure.
        force: replace an existing run at ``out``.
        progress: ``(done, total)`` callback over images needing a forward pass.
        dataset: an already loaded dataset (``data`` is then only recorded; ``options.exclude`` was applied).
        attach: hooks adding reports to the run (see ``cnnkit.runs.Attachment``).
        table_strategy: the strategy-table cell this run carries out, to record.
        report: called with each (layers, head) candidate as the search scores it.
    """
    from cnnkit.backbones import get_backbone
    from cnnkit.runs import check_destination

    if out is not None:
        check_destination(Path(out), force)
    spec = get_backbone(options.backbone)
    if options.layers == AUTO:
        layer_sets = [parse_layers(spec, c) for c in STAGE_CANDIDATES
                      if all(part in spec.layer_choices for part in c.split(","))]
    else:
        layer_sets = [parse_layers(spec, options.layers)]
    if options.head == Head.auto and options.head_param is not None:
        raise CnnkitError("--head-param needs one --head (C and k mean different things): drop one of them")
    if options.head_param is not None and not options.head_param > 0:
        raise CnnkitError(f"--head-param {options.head_param:g}: give a positive number (C, or k for --head knn)")
    heads = [Head.logreg, Head.svm] if options.head == Head.auto else [options.head]
    pca = options.pca
    config = FeatureConfig(options.backbone, options.weights, options.image_size, options.pool,
                           options.flip, options.grid).resolved()
    timings: dict[str, float] = {}

    started = time.perf_counter()
    dataset = dataset or load_excluding(data, options.exclude, strict=options.strict)
    splits = split_dataset(dataset, options.val_split, options.seed)
    samples = [s for split in splits.values() for s in split]
    needed = sorted({spec.stage_key(layer) for layers in layer_sets for layer in layers})
    table = compute_features([s.path for s in samples], config, options.batch_size,
                             options.use_cache, progress=progress, engine=options.engine, stages=needed)
    timings["features"] = time.perf_counter() - started
    if options.strict and table.failures:
        first = table.failures[0]
        raise CnnkitError(f"{first.path}: {first.reason} (drop --strict to skip unreadable files)")

    split_of = np.array([name for name, split in splits.items() for _ in split])
    labels = np.array([s.label for s in samples], np.int64)
    kept_split, kept_labels = split_of[table.kept], labels[table.kept]
    rows = {name: np.flatnonzero(kept_split == name) for name in splits}
    y_train = kept_labels[rows["train"]]

    started = time.perf_counter()
    tried: list[TriedRow] = []
    layers, head = layer_sets[0], heads[0]
    if len(layer_sets) > 1 or len(heads) > 1:
        tried, layers, head = search_head(table, rows["train"], y_train, layer_sets, heads, options, report)
    x_all = table.select(layers)
    x_train = take_rows(x_all, rows["train"])
    fitted = fit_head(x_train, y_train, head, pca, options.whiten, options.l2_normalize, options.cv, options.seed,
                      cache=options.use_cache, param_value=options.head_param)
    timings["head"] = time.perf_counter() - started
    metrics = {"cv_accuracy": fitted.cv_accuracy, "train_accuracy": _accuracy(fitted.pipeline, x_train, y_train)}
    for name in ("val", "test"):
        if name in rows:
            metrics[f"{name}_accuracy"] = _accuracy(fitted.pipeline, take_rows(x_all, rows[name]),
                                                         kept_labels[rows[name]])
    counts = {name: int(len(r)) for name, r in rows.items()}

    run_path, evaluation, held_out = None, None, None
    if out is not None:
        from cnnkit.kinds.feature_head import FeatureHeadModel, embed_features
        from cnnkit.options import command_line
        from cnnkit.runs import RunManifest, data_summary, write_run
        from cnnkit.similarity import write_index

        train_paths = [samples[i].path for i in table.kept[rows["train"]]]

        def write_files(folder: Path) -> None:
            save_head(fitted.pipeline, folder / "head.skops", cache=options.use_cache)
            write_index(folder, x_train, y_train, train_paths, embed=partial(embed_features, fitted.pipeline))

        manifest = RunManifest(
            command="extract", strategy=table_strategy, command_line=command_line("extract", data, options),
            options=asdict(options), class_names=dataset.class_names, image_size=config.image_size,
            crop_pct=1.0, preprocessing=spec.preprocessing,
            data=data_summary(dataset, splits, len(dataset.skipped) + len(table.failures)),
            metrics=metrics,
            model=FeatureHeadModel(backbone=config.backbone, weights=str(config.weights), layers=layers,
                                   pool=str(config.pool), flip=config.flip, grid=config.grid, head=str(head), pca=pca,
                                   whiten=options.whiten, l2_normalize=options.l2_normalize,
                                   best_params=fitted.best_params, cv_folds=fitted.cv_folds,
                                   feature_dims=int(x_all.shape[1]), tried=tried),
        )
        from cnnkit.evaluation import Evaluation, write_choice
        from cnnkit.heads import cross_validated_probabilities
        from cnnkit.reporting import run_attachments

        held_out = next((name for name in ("test", "val") if len(rows.get(name, ()))), None)
        evaluation = None
        if held_out is not None:
            picked = rows[held_out]
            probabilities = _predict(fitted.pipeline, take_rows(x_all, picked), "predict_proba")
            evaluation = Evaluation(dataset.class_names, kept_labels[picked], probabilities.astype(np.float32),
                                    [samples[i].path for i in table.kept[picked]])
        elif fitted.cv_folds >= 2:  # every image trained the head (--val-split 0): the report shows CV evidence
            held_out = "cv"
            evaluation = Evaluation(dataset.class_names, y_train,
                                    cross_validated_probabilities(fitted, x_train, y_train, options.seed),
                                    train_paths)

        val_rows = rows.get("val", np.zeros(0, int))
        choice = choose_views(fitted, config, layers, options.engine, x_train, y_train, train_paths,
                              [samples[i] for i in table.kept[val_rows]], take_rows(x_all, val_rows),
                              options.seed, options.batch_size)
        hooks = run_attachments(evaluation, held_out, dataset.skipped + table.failures,
                                [*([lambda folder, _: write_choice(folder, choice)] if choice else []), *attach],
                                dataset.excluded)
        run_path = write_run(out, manifest, write_files, force, attach=hooks)

    return ExtractResult(run_path, dataset, layers, str(head), int(x_all.shape[1]), fitted, metrics, counts,
                         dataset.skipped + table.failures, table.computed, timings, tried, evaluation, held_out)


def choose_views(fitted: FittedHead, config: FeatureConfig, layers: list[str], engine, x_train: np.ndarray,
                 y_train: np.ndarray, train_paths: list[Path], val: list, x_val: np.ndarray, seed: int = 0,
                 batch_size: int = 32):
    """Which test-time views help this feature head (``cnnkit.tta.choose``), or ``None`` with too few images.

    On validation images when the data has at least ``VALIDATION_EVIDENCE`` of them (the fitted head
    scores their views); otherwise out of fold on up to ``EVIDENCE_IMAGES`` training images: the head's pipeline is refitted without each
    fold's images (on the cached features of every other training image) and scores the fold's views.
    The views' features come from ``view_features`` (computed once per image and view); the plain
    image's are the cached ones (``x_train``, ``x_val``). A head fitted on mirror-averaged features is scored on
    zoomed views only.
    """
    from sklearn.base import clone
    from threadpoolctl import threadpool_limits

    from cnnkit.backbones import get_backbone
    from cnnkit.evaluation import evidence_sample
    from cnnkit.heads import cv_folds
    from cnnkit.tta import EVIDENCE_IMAGES, MIN_EVIDENCE, all_boxes, candidates_for, choose

    spec = get_backbone(config.backbone)
    symmetric = config.flip
    candidates = candidates_for(symmetric)
    boxes = all_boxes(candidates)
    if len(val) < VALIDATION_EVIDENCE and len(train_paths) > len(val):
        val = []
    if val:
        rows = evidence_sample(list(range(len(val))), EVIDENCE_IMAGES, seed)
        picked, plain, evidence = [val[i] for i in rows], x_val, "validation"
    else:
        rows = evidence_sample(list(range(len(train_paths))), EVIDENCE_IMAGES, seed)
        picked, plain, evidence = [Sample(train_paths[i], int(y_train[i])) for i in rows], x_train, "out-of-fold"
    labels = np.array([s.label for s in picked], np.int64)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, int)
    folds = min(fitted.cv_folds, int(counts[counts > 0].min())) if len(labels) else 0
    if not len(labels) or (not val and folds < 2):
        return None
    rows = np.asarray(rows, int)
    if len(labels) < MIN_EVIDENCE:  # too few to choose by (``choose``): the views need not be computed
        candidates, boxes = {}, boxes[:1]
    keys = [spec.stage_key(layer) for layer in layers]
    found = view_features([s.path for s in picked], boxes[1:], config, engine, batch_size)
    features = {box: np.concatenate([found[box][k] for k in keys], axis=1) for box in boxes[1:]}
    features[boxes[0]] = take_rows(plain, rows)
    if val:
        probabilities = {box: np.asarray(fitted.pipeline.predict_proba(f), np.float64) for box, f in features.items()}
    else:
        classes = fitted.pipeline.classes_
        probabilities = {box: np.zeros((len(rows), len(classes))) for box in boxes}
        with threadpool_limits(1, user_api="blas"):  # small matrices: see fit_head
            for _, held in cv_folds(folds, seed).split(rows, labels):
                keep = np.setdiff1d(np.arange(len(train_paths)), rows[held])
                head = clone(fitted.pipeline).fit(take_rows(x_train, keep), y_train[keep])
                columns = np.searchsorted(classes, head.classes_)
                for box in boxes:
                    probabilities[box][np.ix_(held, columns)] = head.predict_proba(features[box][held])
    classes = fitted.pipeline.classes_
    if not np.isin(labels, classes).all():  # a class the head never saw: no column to score it by
        return None
    return choose(probabilities, np.searchsorted(classes, labels), candidates, evidence)


def view_features(paths: list[Path], boxes: list[tuple], config: FeatureConfig, engine,
                  batch_size: int = 32) -> dict[tuple, dict[str, np.ndarray]]:
    """Stage features of each view (``boxes`` as ``cnnkit.tta.TTA.boxes`` gives them) of each image file:
    box -> {stage: one row per file}, from a cache of views beside the feature cache.

    A view is a function of the file's bytes, the input size and its box, so its rows are keyed by
    the SHA-1 of the file's hash and the box, in a ``FeatureCache`` of the same configuration under
    ``views/``: a second run on the same images (another head, layer or seed) computes none and
    imports no TensorFlow. The files must be readable (rows the run already has features of).
    """
    import hashlib

    from cnnkit.evaluation import decode_samples
    from cnnkit.features import FeatureCache, FeatureExtractor, file_hash
    from cnnkit.paths import cache_dir
    from cnnkit.tta import map_views

    if not boxes:
        return {}
    cache = FeatureCache(config, cache_dir() / "views")
    hashes = [file_hash(Path(p)) for p in paths]
    key = {(i, box): hashlib.sha1(f"{hashes[i]} {box}".encode()).hexdigest()
           for i in range(len(paths)) for box in boxes}
    cached_hashes, cached = cache.load()
    row_of = {h: r for r, h in enumerate(cached_hashes)}
    todo = [i for i in range(len(paths)) if any(key[i, box] not in row_of for box in boxes)]
    if todo:
        images, _, kept = decode_samples([Sample(Path(paths[i]), 0) for i in todo], config.image_size)
        if len(kept) < len(todo):
            raise CnnkitError(f"{paths[todo[0]]}: cannot be read any more; was it changed during the run?")
        extractor = FeatureExtractor(config, engine)
        widths: dict[str, int] = {}

        def side_by_side(view) -> np.ndarray:  # map_views gathers arrays: the stages side by side
            found = extractor(view)
            widths.update({s: a.shape[1] for s, a in found.items()})
            return np.concatenate(list(found.values()), axis=1)

        computed = map_views(side_by_side, images, boxes, batch_size)
        ends = np.cumsum(list(widths.values()))
        new_keys = [key[i, box] for box in boxes for i in todo]
        stacked = np.concatenate([computed[box] for box in boxes])
        arrays = {s: np.ascontiguousarray(stacked[:, end - w:end]) for (s, w), end in zip(widths.items(), ends)}
        cached_hashes, cached = cache.add(new_keys, arrays, (cached_hashes, cached))
        row_of = {h: r for r, h in enumerate(cached_hashes)}
    return {box: {s: a[[row_of[key[i, box]] for i in range(len(paths))]] for s, a in cached.items()}
            for box in boxes}

"""`cnnkit doctor`: what is wrong with a dataset before it is trained on.

One pass over the data gives everything the checks read: the cached pretrained features of
every image (``cnnkit.features``, keyed by content hash: a dataset that was already extracted
or advised costs no forward pass), each file's content hash, and a 64 x 64 grey thumbnail with
the stored size. Then:

- **exact duplicates** (same bytes), within a split and across splits;
- **leaks**: a training image that is a copy (exact or near: re-encoded, resized, shifted,
  cropped, brightened) of a validation or test image (``cnnkit.doctor.duplicates``);
- **near-duplicates** within a split;
- **likely label errors** by confident learning (``cnnkit.doctor.labels``);
- **outliers**: images far from every other image in the feature space (the shared
  nearest-neighbour index, ``cnnkit.neighbours``);
- **image properties** and unreadable files (``cnnkit.doctor.properties``);
- class balance.

Each finding has a kind, a score (higher: surer or worse), the file, the other file of a
pair, and an action: ``exclude`` (``--exclude issues.csv`` leaves it out of training) or
``review`` (worth a look, not wrong in itself).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.backbones.registry import DEFAULT_BACKBONE
from cnnkit.doctor.duplicates import LEAK_THRESHOLDS, CopyThresholds
from cnnkit.doctor.properties import PropertyThresholds
from cnnkit.errors import CnnkitError
from cnnkit.options import Engine, Precision

# The kinds, most serious first; the action a finding of each kind gets.
KINDS = {
    "unreadable": "exclude", "leak": "exclude", "exact-duplicate": "exclude", "label-error": "exclude",
    "blank": "exclude", "near-duplicate": "exclude", "outlier": "review", "dark": "review", "light": "review",
    "held-out-label": "review", "blurry": "review", "tiny": "review", "odd-aspect": "review", "grey-as-colour": "review",
}
CSV_COLUMNS = ("path", "kind", "score", "action", "other", "given", "suggested", "split", "detail")
# Splits that train, and the held-out ones a copy of must not be trained on.
HELD_OUT = ("test", "val")


@dataclass
class DoctorOptions:
    """What features the checks read and when they flag.

    The default features are those of ``auto``'s little-data plan on a different domain
    (conv4 over 3 x 3 regions and the top layer, mirror-averaged): the best label-error
    precision of the feature sets measured (docs/doctor.md), and a dataset ``auto`` has seen
    is then read from the cache.
    """

    backbone: str = DEFAULT_BACKBONE
    layers: str = "conv4,top"
    grid: int = 3
    flip: bool = True
    image_size: int | None = None
    weights: str = "imagenet"
    engine: Engine = Engine.auto
    precision: Precision = Precision.float32
    batch_size: int = 32
    folds: int | None = None  # None: 10, or 5 past 10,000 images (cnnkit.doctor.labels.folds_for)
    seed: int = 0
    neighbours: int = 10
    outlier_z: float = 3.0
    copies: CopyThresholds = field(default_factory=CopyThresholds)  # within a split
    leaks: CopyThresholds = LEAK_THRESHOLDS  # a held-out image against training images
    properties: PropertyThresholds = field(default_factory=PropertyThresholds)
    use_cache: bool = True


# The threshold groups of ``DoctorOptions`` that ``with_thresholds`` (``cnnkit doctor --threshold``) sets.
THRESHOLD_GROUPS = ("copies", "leaks", "properties")
# The thresholds that count something (whole numbers, at least 1; ``shortlist`` may also be ``none``); the rest are
# numbers.
COUNT_THRESHOLDS = ("tries", "shortlist")


def threshold_names() -> list[str]:
    """Every ``GROUP.NAME`` ``with_thresholds`` takes (the fields of ``CopyThresholds`` and ``PropertyThresholds``)."""
    from dataclasses import fields

    defaults = DoctorOptions()
    return [f"{group}.{f.name}" for group in THRESHOLD_GROUPS for f in fields(getattr(defaults, group))]


def with_thresholds(options: DoctorOptions, settings: list[str]) -> DoctorOptions:
    """``options`` with thresholds set from ``GROUP.NAME=VALUE`` strings (``copies.gap=0.1``, ``properties.dark=30``).

    The defaults and the experiments behind them are in docs/doctor.md. ``shortlist`` also takes ``none``.

    Raises:
        CnnkitError: a setting that is not ``GROUP.NAME=VALUE``, an unknown name or a value of the wrong kind,
            named as the ``--threshold`` it came from.
    """
    from dataclasses import replace

    groups = {group: getattr(options, group) for group in THRESHOLD_GROUPS}
    for setting in settings:
        name, equals, text = setting.partition("=")
        group, _, field_name = name.strip().partition(".")
        if not equals:
            raise CnnkitError(f"--threshold {setting}: write it as NAME=VALUE, e.g. properties.dark=30")
        if group not in groups or field_name not in groups[group].__dataclass_fields__:
            raise CnnkitError(f"--threshold {setting}: unknown name {name.strip()!r}; choose from "
                              + ", ".join(threshold_names()))
        text = text.strip()
        count = field_name in COUNT_THRESHOLDS
        try:
            value = None if field_name == "shortlist" and text.lower() == "none" else int(text) if count else float(text)
        except ValueError:
            raise CnnkitError(f"--threshold {setting}: {text!r} is not {'a whole number' if count else 'a number'}") \
                from None
        if value is not None and not math.isfinite(value):
            raise CnnkitError(f"--threshold {setting}: {text!r} is not a finite number")
        if count and value is not None and value < 1:
            raise CnnkitError(f"--threshold {setting}: {field_name} must be at least 1")
        groups[group] = replace(groups[group], **{field_name: value})
    return replace(options, **groups)


@dataclass
class Finding:
    """One thing wrong (or worth a look) with one file."""

    path: str
    kind: str
    score: float
    split: str = ""
    other: str = ""
    given: str = ""
    suggested: str = ""
    detail: str = ""

    @property
    def action(self) -> str:
        return KINDS[self.kind]

    def row(self) -> dict:
        return {**asdict(self), "score": round(self.score, 4), "action": self.action}


@dataclass
class Diagnosis:
    """Everything `doctor` found, and what it looked at."""

    source: str
    class_names: list[str]
    counts: dict[str, dict[str, int]]
    images: int
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)
    computed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # The images the feature checks read, in order, with their split, given label and
    # out-of-fold class probabilities (for scripts and bench/doctor.py; not in to_dict).
    checked: list[str] = field(default_factory=list, repr=False)
    checked_splits: list[str] = field(default_factory=list, repr=False)
    checked_labels: np.ndarray | None = field(default=None, repr=False)
    probabilities: np.ndarray | None = field(default=None, repr=False)

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    @property
    def kind_counts(self) -> dict[str, int]:
        return {kind: n for kind in KINDS if (n := len(self.of_kind(kind)))}

    @property
    def imbalance(self) -> float:
        train = [n for n in self.counts.get("train", {}).values()]
        return max(train) / min(train) if train and min(train) else float("inf")

    def to_dict(self) -> dict:
        return {"source": self.source, "images": self.images, "classes": self.class_names, "counts": self.counts,
                "imbalance": self.imbalance if np.isfinite(self.imbalance) else None,
                "kinds": self.kind_counts, "notes": self.notes, "computed": self.computed,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "findings": [f.row() for f in self.findings]}

    def write_csv(self, path: Path) -> None:
        """``issues.csv``: one row per finding (``CSV_COLUMNS``), the form ``--exclude`` reads."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(f.row() for f in self.findings)


# Training images a held-out image is checked against, nearest first by features.
LEAK_CANDIDATES = 30


def _uncentred_similarities(features: np.ndarray, neighbours: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Cosine similarity of each row's features, as the network gives them, to its ``neighbours``' rows."""
    unit = np.asarray(features, np.float32)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    out = np.empty(neighbours.shape, np.float32)
    for begin in range(0, len(unit), chunk):
        rows = slice(begin, begin + chunk)
        out[rows] = np.einsum("nd,nkd->nk", unit[rows], unit[neighbours[rows]])
    return out


def diagnose(data: str | Path, options: DoctorOptions | None = None,
             progress: Callable[[int, int], None] | None = None,
             say: Callable[[str], None] | None = None) -> Diagnosis:
    """Check a dataset (a folder of class folders, train/val/test trees, or a CSV) for the faults above."""
    from cnnkit.backbones import get_backbone
    from cnnkit.data import load_dataset
    from cnnkit.features import FeatureConfig, compute_features, parse_layers
    from cnnkit.forked import Background
    from cnnkit.neighbours import NeighbourIndex

    options = options or DoctorOptions()
    say = say or (lambda message: None)
    # Seconds per stage; "labels" and "properties" ran beside "duplicates" ("waited": for how long they
    # outlasted it), so the stages add up to more than "total".
    seconds: dict[str, float] = {}
    started = begun = time.perf_counter()
    # No header check here: the content hashes and the feature step open every file anyway and name
    # the ones they cannot read (a separate header pass cost 17 s of 60,000 images, docs/doctor.md).
    dataset = load_dataset(data, check_headers=False)
    spec = get_backbone(options.backbone)
    layers = parse_layers(spec, options.layers)
    top = spec.stage_key("top")
    samples = [(name, s) for name, split in dataset.splits.items() for s in split]
    findings = [Finding(str(s.path), "unreadable", 1.0, detail=s.reason) for s in dataset.skipped]

    say(f"features of {len(samples)} images ({options.backbone} {options.layers})")
    config = FeatureConfig(options.backbone, options.weights, options.image_size, flip=options.flip,
                           grid=options.grid, precision=options.precision)
    table = compute_features([s.path for _, s in samples], config, options.batch_size, options.use_cache,
                             progress=progress, engine=options.engine,
                             stages=sorted({top, *(spec.stage_key(layer) for layer in layers)}))
    seconds["features"] = time.perf_counter() - started
    failed = {f.path for f in table.failures}
    split_of = {str(s.path): name for name, s in samples}
    findings += [Finding(str(f.path), "unreadable", 1.0, split_of.get(str(f.path), ""), detail=f.reason)
                 for f in table.failures]
    kept = [samples[i] for i in table.kept]
    if not kept:
        raise CnnkitError(f"{data}: no readable images to check")

    started = time.perf_counter()
    say("reading pixels")
    from cnnkit.doctor.pixels import read_pixels

    pixels, reasons = read_pixels([s.path for _, s in kept], table.hashes or None, options.use_cache)
    readable = np.array([reason is None for reason in reasons], bool)
    findings += [Finding(str(kept[i][1].path), "unreadable", 1.0, kept[i][0], detail=reasons[i])
                 for i in np.flatnonzero(~readable) if kept[i][1].path not in failed]
    rows = np.flatnonzero(readable)
    kept = [kept[i] for i in rows]
    hashes = [table.hashes[i] for i in rows] if table.hashes else [str(i) for i in range(len(rows))]
    features = {stage: table.features[stage][rows] for stage in table.features}
    paths = [str(s.path) for _, s in kept]
    splits = np.array([name for name, _ in kept])
    labels = np.array([s.label for _, s in kept], np.int64)
    names = dataset.class_names
    if len(rows) == len(readable):
        thumbnails, zoomed, sizes, grey = pixels.thumbnails, pixels.zoomed, pixels.sizes, pixels.grey
    else:
        thumbnails, zoomed, sizes, grey = pixels.thumbnails[rows], pixels.zoomed[rows], pixels.sizes[rows], pixels.grey[rows]
    del pixels
    seconds["pixels"] = time.perf_counter() - started

    started = time.perf_counter()
    findings += _exact_duplicates(paths, splits, labels, names, hashes)
    say("nearest neighbours")
    index = NeighbourIndex.build(features[top], seed=options.seed)
    neighbours, similarity = index.graph(options.neighbours)
    seconds["neighbours"] = time.perf_counter() - started

    # Label errors, outliers and image properties need neither the copy search nor each other's results: they
    # are found in a forked process (``cnnkit.forked``) beside it, the longest stage (at 60,000 images: labels
    # 10-14 s, properties 4-8 s, copies 37-39 s; docs/doctor.md), on one BLAS thread (the copy search runs one per
    # process too: more threads than cores spin for each other).
    held_out = np.isin(splits, HELD_OUT)
    label_features = [features[spec.stage_key(layer)] for layer in layers]

    def beside_copies():
        started = time.perf_counter()
        found, probabilities = _label_findings(paths, splits, labels, names, label_features, held_out, options)
        middle = time.perf_counter()
        more, note = _outlier_and_property_findings(paths, splits, labels, names, features[top], neighbours, thumbnails,
                                                    sizes, grey, options)
        return found + more, probabilities, note, {"labels": middle - started, "properties": time.perf_counter() - middle}

    say("label errors (out-of-fold probabilities), outliers and image properties, beside the copy search")
    with Background(beside_copies, threads=1) as other_checks:
        started = time.perf_counter()
        findings += _copy_findings(paths, splits, labels, names, hashes, index, neighbours, similarity, thumbnails,
                                   zoomed, sizes, options)
        seconds["duplicates"] = time.perf_counter() - started
        started = time.perf_counter()
        found, probabilities, note, taken = other_checks.result()
        findings += found
        seconds.update(taken, waited=time.perf_counter() - started)

    seconds["total"] = time.perf_counter() - begun
    order = {kind: i for i, kind in enumerate(KINDS)}
    findings.sort(key=lambda f: (order[f.kind], -f.score, f.path))
    counts = {name: dataset.summary(name).counts for name in dataset.splits}
    notes = [note] if note else []
    train_counts = list(counts.get("train", {}).values())
    if train_counts and min(train_counts) and max(train_counts) / min(train_counts) >= 3:
        notes.append(f"classes are unbalanced: {max(train_counts)} training images in the largest class, "
                     f"{min(train_counts)} in the smallest (heads weight classes; consider more of the small ones)")
    return Diagnosis(str(dataset.source), names, counts, len(samples) + len(dataset.skipped), findings, notes,
                     table.computed, seconds, paths, list(splits), labels, probabilities)


def _exact_duplicates(paths: list[str], splits: np.ndarray, labels: np.ndarray, names: list[str],
                      hashes: list[str]) -> list[Finding]:
    """Files with the same bytes: a leak when a training file is one of a held-out file, else an exact duplicate."""
    findings: list[Finding] = []
    # The first file of each content is the original, in split then path order.
    rank = {name: i for i, name in enumerate(("train", "val", "test"))}
    first_of: dict[str, int] = {}
    exact_twin = np.full(len(paths), -1, np.int64)
    for row in sorted(range(len(paths)), key=lambda r: (-rank.get(splits[r], 0), paths[r])):
        original = first_of.setdefault(hashes[row], row)
        if original != row:
            exact_twin[row] = original
    for row in np.flatnonzero(exact_twin >= 0):
        original = exact_twin[row]
        conflict = labels[row] != labels[original]
        kind = "leak" if splits[row] != splits[original] and splits[row] not in HELD_OUT else "exact-duplicate"
        findings.append(Finding(paths[row], kind, 1.0, splits[row], paths[original], names[labels[row]],
                                names[labels[original]] if conflict else "",
                                "exact copy" + (f" labelled {names[labels[original]]} there" if conflict else "")))
    return findings


def _copy_findings(paths: list[str], splits: np.ndarray, labels: np.ndarray, names: list[str], hashes: list[str],
                   index, neighbours: np.ndarray, similarity: np.ndarray, thumbnails: np.ndarray, zoomed: np.ndarray,
                   sizes: np.ndarray, options: DoctorOptions) -> list[Finding]:
    """Leaks and near-duplicates: each image's candidates in the feature ``index`` (its ``neighbours``), tested on
    pixels (``cnnkit.doctor.duplicates``)."""
    from cnnkit.doctor.duplicates import find_copies
    from cnnkit.neighbours import NeighbourIndex

    findings: list[Finding] = []
    content = np.unique(np.array(hashes), return_inverse=True)[1].reshape(-1)
    same_content = content[neighbours] == content[:, None]

    # Leaks: each held-out image against its nearest training images.
    # More candidates than the graph keeps: a shifted or cropped copy of a plain garment can rank
    # below ten look-alikes by features (two of twenty planted copies on one bench set, docs/doctor.md).
    held = np.flatnonzero(np.isin(splits, HELD_OUT))
    trained = np.flatnonzero(~np.isin(splits, HELD_OUT))
    if len(held) and len(trained):
        among = NeighbourIndex(index.vectors[trained], index.mean, index.components)
        nearest = trained[among.search(index.vectors[held], LEAK_CANDIDATES)[0]]
        candidates = np.where(content[nearest] != content[held, None], nearest, -1)
        for match in find_copies(thumbnails, held, candidates, options.leaks, zoomed=zoomed, sizes=sizes):
            train_row = match.original
            findings.append(Finding(paths[train_row], "leak", match.score, splits[train_row], paths[match.copy],
                                    names[labels[train_row]],
                                    detail=f"near copy of a {splits[match.copy]} image (detail correlation "
                                           f"{match.score:.3f}, " + (f"{match.gap:.2f} above the next candidate)"
                                           if match.gap >= 0 else "and it lines up to the pixel, unlike its look-alikes)")))
    # Near-duplicates within a split: the three nearest, when the features already nearly agree.
    close = ((splits[neighbours] == splits[:, None]) & ~same_content & (similarity >= 0.85))[:, :3]
    queries = np.flatnonzero(close.any(axis=1))
    reported: set[frozenset] = set()
    for match in find_copies(thumbnails, queries, np.where(close[queries], neighbours[queries, :3], -1),
                             options.copies, zoomed=zoomed, sizes=sizes):
        pair = frozenset((match.copy, match.original))
        if pair in reported:
            continue
        reported.add(pair)
        later, earlier = max(pair, key=lambda r: paths[r]), min(pair, key=lambda r: paths[r])
        findings.append(Finding(paths[later], "near-duplicate", match.score, splits[later], paths[earlier],
                                names[labels[later]], detail=f"detail correlation {match.score:.3f}"))
    return findings


def _label_findings(paths: list[str], splits: np.ndarray, labels: np.ndarray, names: list[str],
                    stages: list[np.ndarray], held_out: np.ndarray, options: DoctorOptions):
    """Confident learning's suspects (``cnnkit.doctor.labels``) among the training images, and among the held-out
    ones (judged by heads that learnt from every image): (findings, out-of-fold probabilities)."""
    from cnnkit.doctor.labels import confident_issues, find_label_issues

    issues = find_label_issues(np.concatenate(stages, axis=1), labels, options.folds, options.seed, judged=~held_out)
    suspects = [("label-error", issues)]
    if held_out.any() and issues.probabilities.size:
        suspects.append(("held-out-label", confident_issues(issues.probabilities, labels, held_out)))
    findings = []
    for kind, found in suspects:
        for row, suggested, margin in zip(found.rows, found.suggested, found.margins):
            probabilities = found.probabilities[row]
            findings.append(Finding(paths[row], kind, float(margin), splits[row], given=names[labels[row]],
                                    suggested=names[suggested],
                                    detail=f"looks like {names[suggested]} ({probabilities[suggested]:.2f}), "
                                           f"not {names[labels[row]]} ({probabilities[labels[row]]:.2f})"))
    return findings, issues.probabilities


def _outlier_and_property_findings(paths: list[str], splits: np.ndarray, labels: np.ndarray, names: list[str],
                                   top_features: np.ndarray, neighbours: np.ndarray, thumbnails: np.ndarray,
                                   sizes: np.ndarray, grey: np.ndarray, options: DoctorOptions):
    """Outliers and odd images (blank, dark, blurry, tiny, ...): (findings, a note on the properties or "")."""
    from cnnkit.doctor.properties import property_flags, robust_z

    findings = []
    # Far from its ten nearest images in the whole dataset, by the cosine of the features as the network
    # gives them (uncentred: ``NeighbourIndex.build``). Ten, not fewer: junk comes in small crowds
    # (ten photos dropped into Fashion-MNIST are each other's nearest neighbours).
    typical = _uncentred_similarities(top_features, neighbours[:, :10])
    distance = 1.0 - typical.mean(axis=1) if typical.shape[1] else np.zeros(len(paths))
    outlying = robust_z(distance)
    for row in np.flatnonzero(outlying >= options.outlier_z):
        findings.append(Finding(paths[row], "outlier", float(outlying[row]), splits[row], given=names[labels[row]],
                                detail=f"unlike the rest: mean similarity to its 10 nearest images "
                                       f"{1 - distance[row]:.2f} (robust z {outlying[row]:.1f})"))
    flags, note = property_flags(thumbnails, sizes, grey, options.properties)
    findings += [Finding(paths[f.row], f.kind, f.score, splits[f.row], given=names[labels[f.row]], detail=f.detail)
                 for f in flags]
    return findings, note

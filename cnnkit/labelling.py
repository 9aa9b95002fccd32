"""Which images to label next: from no labels (typical, diverse images) to a trained run (its doubts).

Labelling is the expensive part of training a classifier, and which images get
labelled changes how far a labelling budget goes. The rules, from the published
evidence on frozen pretrained features, and measured against random picks on
Fashion-MNIST and natural photos in ``bench/label_next.py`` (docs/label_next.md):

- **typical** (no run; TypiClust, Hacohen et al. ICML 2022): k-means of the pool
  into ``n`` + (labelled images) clusters; from each of the largest clusters
  holding no labelled image, its most typical image (typicality: the inverse of
  the mean distance to its ``TYPICALITY_NEIGHBOURS`` nearest neighbours). At very
  low budgets uncertainty is worse than random: a model of a few labels is
  confidently wrong, and picks of outliers teach little.
- **margin** (a run): where the run is unsure, by the gap between its two most
  probable classes (doubt = 1 - margin), one image per region: k-means of the pool
  into ``n`` groups with each image weighted by its doubt squared (``DOUBT_POWER``),
  the image nearest each group's centre (Zhdanov 2019, "Diverse mini-batch active
  learning"). The centres sit in the doubtful regions, but are their representative
  images, not their most doubtful ones: the most ambiguous images are often ones no
  label makes learnable (picks by the smallest margins of a model that had seen every
  pool label scored 0.72, against 0.87 for random picks). 300 labels picked this way
  (after 100 typical ones) scored 0.889 against 0.867 for random picks (Fashion-MNIST,
  10 seeds, docs/label_next.md); the smallest margins spread over clusters, the rule
  before, 0.877 in the same replay as this rule's 0.885 (bench/label_next_rules.py).
- **random**: the control every claim here is measured against.

Features come from the feature cache (``cnnkit.features``) with the features
of `auto`'s little-data plan (EfficientNet-Lite0 at its own size, conv4 over
3 x 3 regions and top, mirror-averaged; the index uses top: ``INDEX_LAYERS``), so
the pool is passed through the network once for `label-next` and `auto` alike; neighbours and typicality come
from the index `doctor` uses (``cnnkit.neighbours``).

Images already labelled (``labeled``, or the run's training data) are never
picked again, recognised by content (SHA-1 of the file), so a copy under another
name is excluded too; of the pool's exact duplicates only one can be picked.
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.backbones.registry import DEFAULT_BACKBONE
from cnnkit.data import SkippedFile
from cnnkit.errors import CnnkitError

ProgressFn = Callable[[int, int], None]

RULES = ("auto", "typical", "margin", "random")
# Neighbours that define how typical an image is (TypiClust's k).
TYPICALITY_NEIGHBOURS = 20
# The weight of an image in the margin rule's k-means: doubt (1 - margin) to this power. 1, 2 and 3 scored
# alike (0.884, 0.885, 0.887 at 300 Fashion-MNIST labels, 10 seeds, bench/label_next_rules.py); 0 (plain
# k-means, no doubt) 0.866, as random picks (0.867); the smallest margins spread over clusters, 0.877.
DOUBT_POWER = 2.0
# The features of the index: the top of auto's little-data plan's features (advise.LINEAR_* for
# linear-stages), so the pool's forward passes serve both commands. Top alone, not conv4 + top: on a pool of
# 5,000 Fashion-MNIST images, 100 typical picks of conv4 + top left a class with 3-4 images (seeds 1-3),
# of top alone with 6-8, and a logistic head on them scored the same (docs/label_next.md).
INDEX_LAYERS = ("top",)
INDEX_GRID = 3
INDEX_FLIP = True
CSV_NAME = "to_label.csv"
REPORT_NAME = "report.html"
CSV_HEADER = ["rank", "path", "score", "why", "guess", "confidence", "label"]


@dataclass
class Pick:
    """One image to label.

    Attributes:
        path: the pool file.
        score: how strongly the rule wants it (typical: typicality, the inverse mean distance to its
            neighbours; margin: the image's doubt, 1 - (top1 - top2) of the run's probabilities; random: 0).
        why: one sentence a person can read.
        cluster: the group it was picked from, and ``cluster_size`` how many pool images that group holds.
        guess: the run's most probable class (``None`` without a run), ``confidence`` its probability.
    """

    path: Path
    score: float
    why: str
    cluster: int | None = None
    cluster_size: int | None = None
    guess: str | None = None
    confidence: float | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass
class LabelNext:
    """What ``label_next`` picked, and from what.

    Attributes:
        picks: best first.
        rule: the rule applied (typical, margin, random); ``reason`` why it applies.
        pool: image files found in the pool; ``candidates`` those left to pick from (readable, not
            labelled, one per distinct content).
        already_labelled: pool files whose content is labelled already; ``duplicates`` pool files
            whose content another pool file has.
        failures: pool files that could not be read.
        class_names: the run's classes (``None`` without a run).
        computed: images that needed a forward pass (0: every feature came from the cache).
        labelled_from: where the labelled images to leave out came from ("" : none given).
    """

    picks: list[Pick]
    rule: str
    reason: str
    pool: int
    candidates: int
    already_labelled: int = 0
    duplicates: int = 0
    failures: list[SkippedFile] = field(default_factory=list)
    class_names: list[str] | None = None
    computed: int = 0
    labelled_from: str = ""


def index_config(backbone: str = DEFAULT_BACKBONE):
    """The ``FeatureConfig`` of the index's features (see the module docstring)."""
    from cnnkit.features import FeatureConfig

    return FeatureConfig(backbone, flip=INDEX_FLIP, grid=INDEX_GRID)


def labelled_images(labeled: str | Path | None, run=None) -> tuple[list[Path], list[str] | None, str]:
    """The labelled image files to exclude, their class names, and where they came from.

    ``labeled`` (a dataset, every split) wins; else the run's training data, if that folder still exists.
    A run whose classes differ from ``labeled``'s is refused: its probabilities would name other classes.
    """
    from cnnkit.data import load_dataset

    if labeled is not None:
        dataset = load_dataset(labeled)
        if run is not None and sorted(run.class_names) != sorted(dataset.class_names):
            raise CnnkitError(
                f"--model {run.path}: its classes ({', '.join(run.class_names)}) are not those of --labeled "
                f"{labeled} ({', '.join(dataset.class_names)}); pass the run trained on that data")
        return [s.path for s in dataset.samples], dataset.class_names, f"--labeled {labeled}"
    if run is None or run.manifest.data is None:
        return [], None, ""
    source = Path(run.manifest.data.source)
    if not source.exists():
        return [], None, f"the run's training data ({source}) is gone"
    try:
        dataset = load_dataset(source)
    except CnnkitError:
        return [], None, f"the run's training data ({source}) cannot be read"
    return [s.path for s in dataset.samples], dataset.class_names, f"the run's training data {source}"


def label_next(pool: str | Path, n: int, model: str | Path | None = None, labeled: str | Path | None = None,
               rule: str = "auto", backbone: str = DEFAULT_BACKBONE, engine: str = "auto", seed: int = 0,
               progress: ProgressFn | None = None) -> LabelNext:
    """Pick the ``n`` images of ``pool`` whose labels should help a classifier most.

    Args:
        pool: a folder of unlabelled images (searched recursively).
        n: how many to pick.
        model: a run (``cnnkit auto``, ``extract``, ...): its uncertainty picks.
        labeled: the labelled dataset; its images are never picked (default: the run's training data).
        rule: auto (typical without a run, margin with one), or typical, margin, random to force one.
        backbone: the index's backbone (the run's classes come from the run itself).
        seed: k-means and random picks.

    Raises:
        CnnkitError: an empty or unreadable pool, ``n`` beyond the images left, a run of other classes.
    """
    from cnnkit.data import find_images
    from cnnkit.content_hashes import content_hashes

    if rule not in RULES:
        raise CnnkitError(f"--rule {rule}: choose one of {', '.join(RULES)}")
    if n < 1:
        raise CnnkitError(f"-n {n}: pick at least one image")
    pool = Path(pool)
    if not pool.is_dir():
        raise CnnkitError(f"{pool}: no such folder; POOL is a folder of unlabelled images")
    paths, _ = find_images([pool])
    if not paths:
        raise CnnkitError(f"{pool}: holds no image files (searched every subfolder)")
    run = None
    if model is not None:
        from cnnkit.runs import load_run

        run = load_run(model)
    labelled, _, labelled_from = labelled_images(labeled, run)
    if rule == "auto":
        rule = "margin" if run is not None else "typical"
    if rule == "margin" and run is None:
        raise CnnkitError("--rule margin: needs a trained run (--model RUN)")

    labelled_hashes = set(content_hashes(labelled)) - {""}
    first_of: dict[str, int] = {}
    already = 0
    for i, digest in enumerate(content_hashes(paths)):
        digest = digest or f"unreadable {i}"  # each its own candidate: the header check below names it
        if digest in labelled_hashes:
            already += 1
        elif digest not in first_of:
            first_of[digest] = i
    duplicates = len(paths) - already - len(first_of)
    candidates = [paths[i] for i in sorted(first_of.values())]
    _check_enough(pool, n, len(paths), len(candidates), already, duplicates)
    # A header check first: a pool of files that are no images fails in one line, before any forward pass.
    from cnnkit.data.images import check_image_header

    problems = {path: check_image_header(path) for path in candidates}
    bad_headers = [SkippedFile(path, reason) for path, reason in problems.items() if reason]
    candidates = [path for path in candidates if not problems[path]]
    if not candidates:
        raise CnnkitError(f"{pool}: none of its {len(bad_headers)} image files can be read "
                          f"(first: {bad_headers[0].path}: {bad_headers[0].reason})")
    _check_enough(pool, n, len(paths), len(candidates), already, duplicates, len(bad_headers))

    from cnnkit.features import compute_features

    config = index_config(backbone)
    table = compute_features(candidates, config, engine=engine, progress=progress,
                             stages=[_stage_key(config, layer) for layer in INDEX_LAYERS])
    readable = [candidates[i] for i in table.kept]
    failures = bad_headers + list(table.failures)
    if not readable:
        raise CnnkitError(f"{pool}: none of its {len(failures)} image files can be read "
                          f"(first: {failures[0].path}: {failures[0].reason})")
    _check_enough(pool, n, len(paths), len(readable), already, duplicates, len(failures))
    from cnnkit.neighbours import NeighbourIndex

    index = NeighbourIndex.build(np.concatenate([table.features[_stage_key(config, l)] for l in INDEX_LAYERS],
                                                axis=1), seed=seed)
    probabilities, class_names = None, None
    if run is not None:
        probabilities, class_names = run_probabilities(run, readable, engine), run.class_names

    if rule == "random":
        chosen = np.random.default_rng(seed).choice(len(readable), n, replace=False)
        picks = [Pick(readable[i], 0.0, "a random pick (the control)") for i in chosen]
        reason = "random picks: the control the other rules are measured against"
    elif rule == "typical":
        labelled_vectors = _labelled_vectors(labelled, config, engine) if labelled else None
        picks = typical_picks(index, readable, n, labelled_vectors, seed)
        reason = ("no run: typical, diverse images (one per k-means cluster of the pool's features, the most "
                  "typical of each of the largest clusters no labelled image is in); with no labels they beat "
                  "random picks (Fashion-MNIST, 100 labels: +1.9 points, 10 seeds, docs/label_next.md)")
    else:
        picks = margin_picks(index, readable, n, probabilities, class_names, seed)
        reason = (f"a run of {len(class_names)} classes: where it is least sure (the gap between its two most "
                  "probable classes), one image per region: the centre of each cluster of the pool weighted by "
                  "the run's doubt, not the most ambiguous images, which teach least (Fashion-MNIST, 300 labels "
                  "in three rounds: +2.2 points over random picks, 10 seeds, docs/label_next.md)")
    if probabilities is not None:
        row_of = {p: i for i, p in enumerate(readable)}
        for pick in picks:
            row = probabilities[row_of[pick.path]]
            best = int(np.argmax(row))
            pick.guess, pick.confidence = class_names[best], float(row[best])
    return LabelNext(picks, rule, reason, len(paths), len(readable), already, duplicates,
                     failures, class_names, table.computed, labelled_from)


def run_probabilities(run, paths: Sequence[Path], engine: str = "auto") -> np.ndarray:
    """The run's class probabilities of ``paths`` (every one readable), from the feature cache where it can.

    A feature-head run reads its features from the cache (``FeatureHeadClassifier.predict_files``). An
    ensemble's own classifier decodes every image and runs every member's network on it, each time; when
    its members see the images as it does (same size and crop: what `auto`'s plans make), the same weighted
    mean is taken here of each member's own ``predict_files`` -- on a pool whose features are cached, no
    forward pass at all (5,000 images: seconds instead of minutes on two cores).
    """
    paths = list(paths)
    parts = None
    if run.kind == "ensemble":
        from cnnkit.kinds.ensemble import members

        found = members(run)
        if all(m.image_size == run.image_size and m.crop_pct == run.crop_pct for m, _ in found):
            parts = [(m, w) for m, w in found]
    if parts is None:
        parts = [(run, 1.0)]
    total = np.zeros((len(paths), len(run.class_names)), np.float64)
    for member, weight in parts:
        predicted = member.classifier(engine).predict_files(paths)
        if len(predicted.kept) != len(paths):
            first = predicted.failures[0] if predicted.failures else None
            raise CnnkitError(f"--model {run.path}: cannot classify every pool image"
                              + (f" ({first.path}: {first.reason})" if first else ""))
        order = [member.class_names.index(name) for name in run.class_names]
        total += weight * np.asarray(predicted.probabilities, np.float64)[:, order]
    return (total / sum(weight for _, weight in parts)).astype(np.float32)


def _stage_key(config, layer: str) -> str:
    from cnnkit.backbones import get_backbone

    return get_backbone(config.backbone).stage_key(layer)


def _check_enough(pool: Path, n: int, found: int, left: int, already: int, duplicates: int,
                  unreadable: int = 0) -> None:
    if n <= left:
        return
    details = [f"{count} {what}" for count, what in ((already, "already labelled"), (duplicates, "duplicates"),
                                                       (unreadable, "unreadable")) if count]
    extra = f" ({', '.join(details)})" if details else ""
    raise CnnkitError(f"-n {n}: {pool} has only {left} image(s) left to label of {found}{extra}; "
                      f"ask for at most {left}")


def _labelled_vectors(labelled: Sequence[Path], config, engine: str) -> np.ndarray:
    """The labelled images' index features (from the cache in the loop: they were pool images)."""
    from cnnkit.features import compute_features

    table = compute_features(list(labelled), config, engine=engine,
                             stages=[_stage_key(config, layer) for layer in INDEX_LAYERS])
    if not len(table.kept):
        return np.zeros((0, 0), np.float32)
    return np.concatenate([table.features[_stage_key(config, l)] for l in INDEX_LAYERS], axis=1)


def typicality(index, neighbours: int = TYPICALITY_NEIGHBOURS) -> np.ndarray:
    """Each row's inverse mean distance to its nearest other rows (TypiClust): high in dense regions."""
    _, similarities = index.graph(neighbours)
    if similarities.shape[1] == 0:
        return np.ones(len(index), np.float32)
    distances = np.sqrt(np.maximum(2.0 - 2.0 * similarities, 0.0))  # unit rows: chord distance
    return (1.0 / (distances.mean(axis=1) + 1e-6)).astype(np.float32)


def _kmeans(vectors: np.ndarray, clusters: int, seed: int, weights: np.ndarray | None = None):
    """(cluster labels, the fitted model) of ``vectors`` (each row weighted by ``weights``, if given):
    scikit-learn's KMeans (MiniBatchKMeans when big)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    clusters = max(1, min(clusters, len(vectors)))
    if clusters * len(vectors) > 5_000_000:
        model = MiniBatchKMeans(clusters, random_state=seed, n_init=3, batch_size=4096)
    else:
        model = KMeans(clusters, random_state=seed, n_init=1)
    return model.fit(vectors, sample_weight=weights).labels_, model


def typical_picks(index, paths: Sequence[Path], n: int, labelled_vectors: np.ndarray | None = None,
                  seed: int = 0) -> list[Pick]:
    """TypiClust: ``n`` + labelled clusters; the most typical image of each largest uncovered cluster."""
    labelled_count = 0 if labelled_vectors is None else len(labelled_vectors)
    labels, model = _kmeans(index.vectors, n + labelled_count, seed)
    sizes = np.bincount(labels, minlength=labels.max() + 1)
    covered = np.zeros(len(sizes), np.int64)
    if labelled_count:
        covered = np.bincount(model.predict(index.embed(labelled_vectors).astype(model.cluster_centers_.dtype)),
                              minlength=len(sizes))
    typical = typicality(index)
    # Uncovered clusters first, then the largest; ties by cluster number, for repeatable answers.
    order = sorted(range(len(sizes)), key=lambda c: (covered[c], -sizes[c], c))
    picks = []
    for cluster in order:
        if len(picks) == n:
            break
        members = np.flatnonzero(labels == cluster)
        if not len(members):
            continue
        best = members[np.argmax(typical[members])]
        labelled_note = f", {covered[cluster]} labelled" if covered[cluster] else ""
        picks.append(Pick(paths[best], float(typical[best]),
                          f"typical of cluster {cluster} ({sizes[cluster]} images{labelled_note})",
                          int(cluster), int(sizes[cluster])))
    # A cluster per pick is guaranteed unless k-means left clusters empty: fill from the most typical rest.
    taken = {p.path for p in picks}
    for row in np.argsort(-typical, kind="stable"):
        if len(picks) == n:
            break
        if paths[row] not in taken:
            picks.append(Pick(paths[row], float(typical[row]), "typical of the pool", int(labels[row]),
                              int(sizes[labels[row]])))
            taken.add(paths[row])
    return sorted(picks, key=lambda p: -p.score)


def margin_picks(index, paths: Sequence[Path], n: int, probabilities: np.ndarray, class_names: Sequence[str],
                 seed: int = 0, power: float = DOUBT_POWER) -> list[Pick]:
    """One image per doubtful region: k-means weighted by doubt to ``power``, the image nearest each centre."""
    top2 = np.sort(probabilities, axis=1)[:, -2:] if probabilities.shape[1] > 1 else None
    doubt = (1.0 - (top2[:, 1] - top2[:, 0])) if top2 is not None else np.zeros(len(paths))
    # A pool the run is sure of everywhere still gets n spread picks (plain k-means), never a zero weight sum.
    weights = np.maximum(doubt, 1e-6) ** power
    labels, model = _kmeans(index.vectors, n, seed, weights)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :2]
    sizes = np.bincount(labels, minlength=n)
    mean_doubt = np.bincount(labels, weights=doubt, minlength=n) / np.maximum(sizes, 1)

    def pick(row: int, cluster: int | None) -> Pick:
        # The centre of a doubtful region may itself be an image the run is fairly sure of: say both.
        first, second = order[row]
        guess = (f"{class_names[first]} {probabilities[row, first]:.2f} vs {class_names[second]} "
                 f"{probabilities[row, second]:.2f}")
        if cluster is None:
            why = f"the run is unsure: {guess}"
        else:
            size = sizes[cluster]
            why = (f"the centre of a region of {size} image{'s' if size != 1 else ''} (the run's mean doubt "
                   f"there: {mean_doubt[cluster]:.2f}); here {guess}")
        return Pick(paths[row], float(doubt[row]), why, cluster, None if cluster is None else int(sizes[cluster]))

    picks, taken = [], set()
    for cluster in range(len(model.cluster_centers_)):
        members = np.flatnonzero(labels == cluster)
        if not len(members):
            continue
        distances = ((index.vectors[members] - model.cluster_centers_[cluster]) ** 2).sum(axis=1)
        row = int(members[np.argmin(distances)])
        picks.append(pick(row, cluster))
        taken.add(row)
    for row in np.argsort(-doubt, kind="stable"):  # k-means left a cluster empty: the most doubtful of the rest
        if len(picks) == n:
            break
        if int(row) not in taken:
            picks.append(pick(int(row), None))
            taken.add(int(row))
    return sorted(picks, key=lambda p: -p.score)[:n]


# ------------------------------------------------------------------ outputs

SHEET_MARKER = "<!-- written by cnnkit label-next -->"


def check_destinations(out: str | Path | None, copy_to: str | Path | None) -> None:
    """Refuse, before any work, an ``--out`` or ``--copy-to`` that would overwrite something not ours.

    ``--out`` may be an existing folder: only ``to_label.csv`` and ``report.html`` are written there, and
    only over files label-next wrote (the CSV's header, the page's generator tag), so a loop can write
    each round to the same folder while a user's own files of those names are never replaced.
    """
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise CnnkitError(f"--out {out}: is a file; give a folder")
        csv_path, report_path = out / CSV_NAME, out / REPORT_NAME
        if csv_path.exists() and not _is_our_csv(csv_path):
            raise CnnkitError(f"--out {out}: {CSV_NAME} there was not written by label-next; refusing to "
                              "overwrite it -- choose another folder")
        if report_path.exists() and not _is_our_sheet(report_path):
            raise CnnkitError(f"--out {out}: {REPORT_NAME} there was not written by label-next; refusing to "
                              "overwrite it -- choose another folder")
    if copy_to is not None and Path(copy_to).exists() and not Path(copy_to).is_dir():
        raise CnnkitError(f"--copy-to {copy_to}: is a file; give a folder")


def _is_our_csv(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return next(csv.reader(handle), None) == CSV_HEADER
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def _is_our_sheet(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as handle:
            return SHEET_MARKER in handle.read(1 << 16)
    except (OSError, UnicodeDecodeError):
        return False


def picks_csv(found: LabelNext) -> str:
    """``to_label.csv``: one row per pick, best first, and an empty ``label`` column to fill in."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for rank, pick in enumerate(found.picks, start=1):
        writer.writerow([rank, str(pick.path), f"{pick.score:.4f}", pick.why, pick.guess or "",
                         "" if pick.confidence is None else f"{pick.confidence:.4f}", ""])
    return buffer.getvalue()


def write_outputs(found: LabelNext, out: str | Path) -> list[Path]:
    """Write ``to_label.csv`` and the contact sheet ``report.html`` into ``out`` (each atomically)."""
    from cnnkit.paths import atomic_write
    from cnnkit.reporting.label_sheet import render_sheet

    out = Path(out)
    check_destinations(out, None)
    csv_path = atomic_write(out / CSV_NAME, picks_csv(found))
    report_path = atomic_write(out / REPORT_NAME, render_sheet(found, SHEET_MARKER))
    return [csv_path, report_path]


def copy_names(paths: Sequence[Path]) -> list[str]:
    """A file name per pick: its own, or ``<folder>__<name>`` where two picks share a name."""
    names = [Path(p).name for p in paths]
    clashing = {name for name in names if names.count(name) > 1}
    return [f"{Path(p).parent.name}__{Path(p).name}" if Path(p).name in clashing else Path(p).name for p in paths]


def copy_picks(picks: Sequence[Pick], destination: str | Path) -> list[Path]:
    """Copy (never move) the picked files into ``destination``; refuses, before copying any, to replace
    a different file. A file already there with the same content is kept as it is.

    Returns:
        the files in ``destination`` that hold the picks.
    """
    from cnnkit.paths import file_digest

    destination = Path(destination)
    targets = [destination / name for name in copy_names([p.path for p in picks])]
    for pick, target in zip(picks, targets):
        if target.exists() and (not target.is_file() or file_digest(target) != file_digest(pick.path)):
            raise CnnkitError(f"--copy-to {destination}: {target.name} exists there and is another file; "
                              "refusing to overwrite it -- choose an empty folder")
    destination.mkdir(parents=True, exist_ok=True)
    for pick, target in zip(picks, targets):
        if not target.exists():
            shutil.copy2(pick.path, target)
    return targets

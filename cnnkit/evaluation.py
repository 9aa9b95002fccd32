"""Evaluating a run on labelled images: accuracy, top-5, per-class report, confusion matrix."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data import SkippedFile, load_excluding
from cnnkit.errors import CnnkitError


@dataclass
class Evaluation:
    """Scores of a run on a dataset."""

    class_names: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    paths: list[Path]
    skipped: list[SkippedFile] = field(default_factory=list)
    # With test-time augmentation: the views averaged, and the plain view's probabilities.
    tta_views: int = 0
    plain_probabilities: np.ndarray | None = None
    tta_line: str = ""

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.predictions == self.labels))

    def top_k_accuracy(self, k: int) -> float:
        from sklearn.metrics import top_k_accuracy_score

        return float(top_k_accuracy_score(self.labels, self.probabilities, k=k,
                                          labels=range(len(self.class_names))))

    def confusion(self) -> np.ndarray:
        from sklearn.metrics import confusion_matrix

        return confusion_matrix(self.labels, self.predictions, labels=range(len(self.class_names)))

    def per_class(self) -> dict[str, dict[str, float]]:
        from sklearn.metrics import precision_recall_fscore_support

        p, r, f, support = precision_recall_fscore_support(
            self.labels, self.predictions, labels=range(len(self.class_names)), zero_division=0)
        return {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(support[i])} for i, name in enumerate(self.class_names)}

    def to_dict(self) -> dict:
        data = {"accuracy": self.accuracy, "images": int(len(self.labels)),
                "skipped": len(self.skipped), "per_class": self.per_class(),
                "class_names": self.class_names, "confusion_matrix": self.confusion().tolist()}
        if len(self.class_names) > 5:
            data["top5_accuracy"] = self.top_k_accuracy(5)
        if self.plain_probabilities is not None:
            data["tta_views"] = self.tta_views
            data["accuracy_without_tta"] = float(np.mean(self.plain_probabilities.argmax(axis=1) == self.labels))
            if self.tta_line:
                data["tta"] = self.tta_line
        return data


def evaluate_run(run_path: str | Path, data: str | Path, split: str | None = None, batch_size: int = 32,
                 progress: Callable[[int, int], None] | None = None, engine: str = "auto",
                 tta=None, precision: str = "float32", exclude: str | Path | None = None) -> Evaluation:
    """Classify every labelled image of ``data`` with the run and score it.

    Args:
        run_path: a run folder, or an already loaded ``Run``.
        split: "train", "val" or "test"; by default the test split when the
            data has one, else every image.
        engine: what runs the network (``cnnkit.engines``), in ``precision``; a feature-head run
            whose images are all in the feature cache runs none.
        tta: ``True`` for the views the run chose on its held-out images when it was made
            (``Run.tta_classifier``), a ``cnnkit.tta.TTA`` for those views, or ``None``; the scores
            without it come from the same pass.
        exclude: a file listing images of ``data`` to leave out (``cnnkit.data.exclude``).
    """
    from cnnkit.runs import Run, load_run

    run = run_path if isinstance(run_path, Run) else load_run(run_path)
    dataset = load_excluding(data, exclude)
    if split is None:
        samples = dataset.splits.get("test") or dataset.samples
    elif split in dataset.splits:
        samples = dataset.splits[split]
    else:
        raise CnnkitError(f"--split {split}: {data} has only {', '.join(dataset.splits)}")
    unknown = sorted(set(dataset.class_names) - set(run.class_names))
    if unknown:
        raise CnnkitError(f"{data}: classes {', '.join(unknown)} are not among the run's classes "
                          f"({', '.join(run.class_names)})")
    to_run_label = {i: run.class_names.index(name) for i, name in enumerate(dataset.class_names)}
    classifier, line = tta_classifier(run, tta, engine, precision)
    found = classifier.predict_files([s.path for s in samples], batch_size, progress)
    if not len(found.kept):
        raise CnnkitError(f"{data}: no readable images to evaluate")
    labels = np.array([to_run_label[samples[i].label] for i in found.kept])
    return Evaluation(run.class_names, labels, found.probabilities, [samples[i].path for i in found.kept],
                      dataset.skipped + found.failures, getattr(classifier, "views", 0) if tta is not None else 0,
                      found.plain, line)


def tta_classifier(run, tta, engine: str = "auto", precision: str = "float32"):
    """(classifier, the line saying what TTA does) for ``tta`` as ``evaluate_run`` takes it; the line is
    also a ``note`` (the CLI prints it once)."""
    if tta is True:
        from cnnkit.engines import note

        note(run.tta_line)
        return run.tta_classifier(engine, precision), run.tta_line
    classifier = run.classifier(engine, precision)
    if tta is None or tta is False:
        return classifier, ""
    from cnnkit.tta import TTAClassifier

    views = tta.for_run(run)
    return TTAClassifier(classifier, views), f"TTA: {views.views} views as given"


def write_evaluation(evaluation: Evaluation, out: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
    """Write metrics.json, confusion.json and confusion.png into ``out`` (replaced atomically).

    Args:
        extra: called with the folder being written, to add more files (a report).
    """
    from cnnkit.paths import publish_folder

    def build(folder: Path) -> None:
        write_evaluation_files(evaluation, folder)
        if extra is not None:
            extra(folder)

    return publish_folder(out, build, replace=True)


def write_evaluation_files(evaluation: Evaluation, folder: Path) -> None:
    """metrics.json, confusion.json and confusion.png in an existing ``folder``."""
    data = evaluation.to_dict()
    (folder / "metrics.json").write_text(json.dumps(data, indent=2, ensure_ascii=False))
    (folder / "confusion.json").write_text(json.dumps(
        {"class_names": evaluation.class_names, "matrix": data["confusion_matrix"],
         "rows": "true class", "columns": "predicted class"}, indent=2, ensure_ascii=False))
    plot_confusion(evaluation.confusion(), evaluation.class_names, folder / "confusion.png")


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    """A confusion matrix heat map with counts, true classes down, predictions across.

    Drawn as scikit-learn's ``ConfusionMatrixDisplay`` draws it (no colour bar), on a bare
    ``Figure`` with the Agg canvas: pyplot and the display class are not imported. The
    image is a function of the counts, the class names and matplotlib's version alone, so
    the one drawn before for the same ones is reused (``reuse_or_write``): a cached
    `extract` rerun does not import matplotlib (~0.5 s with the drawing).
    """
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    from cnnkit.paths import reuse_or_write

    matrix = np.asarray(matrix)
    try:
        key = hashlib.sha256(json.dumps(["confusion.png 1", version("matplotlib"), matrix.dtype.kind,
                                         matrix.tolist(), list(class_names)]).encode()).hexdigest()
    except PackageNotFoundError:  # no version to key on: draw it
        key = None
    reuse_or_write(path, key and f"plots/{key}.png", lambda target: _draw_confusion(matrix, class_names, target))


def _draw_confusion(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(class_names)
    size = max(4.0, 0.5 * n + 2)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, interpolation="nearest", cmap="Blues")
    if n <= 30:
        # Light text on dark cells and the reverse; an integer in the shorter of "d" and ".2g".
        low, high = image.cmap(0), image.cmap(1.0)
        threshold = (matrix.max() + matrix.min()) / 2.0
        for (i, j), value in np.ndenumerate(matrix):
            text = format(value, ".2g")
            if matrix.dtype.kind != "f" and len(format(value, "d")) < len(text):
                text = format(value, "d")
            ax.text(j, i, text, ha="center", va="center", color=high if value < threshold else low)
    ax.set(xticks=np.arange(n), yticks=np.arange(n), xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="true", ylim=(n - 0.5, -0.5),
           title=f"accuracy {np.trace(matrix) / max(matrix.sum(), 1):.3f}")
    for label in ax.get_xticklabels():
        label.set_rotation(45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def evidence_sample(samples: list, limit: int, seed: int = 0) -> list:
    """At most ``limit`` of ``samples``, the same share of every class (all of them when few)."""
    if len(samples) <= limit:
        return list(samples)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(samples), limit, replace=False)  # uniform: each class in proportion, on average
    return [samples[i] for i in sorted(picked)]


def tta_evidence_hook(samples: list, engine: str = "auto", seed: int = 0, seen: list[str] | None = None):
    """An attach hook (``cnnkit.runs.Attachment``) that measures which views help the run being written.

    On up to ``cnnkit.tta.EVIDENCE_IMAGES`` of the held-out ``samples`` (the validation images: never
    the test split), the run's own classifier scores the plain image and each candidate view set
    (``cnnkit.tta.choose``); ``tta.json`` records the scores and the choice, sealed with the run, and
    ``--tta`` reads it. Unreadable images are left out; with none readable, nothing is recorded.
    ``seen``: the view sets the network's augmentation showed it (``cnnkit.tta.seen_candidates``).
    """
    from cnnkit.tta import EVIDENCE_IMAGES, all_boxes, candidates_for, choose, map_views

    picked = evidence_sample(samples, EVIDENCE_IMAGES, seed)

    def hook(folder: Path, manifest) -> None:
        from cnnkit.runs import open_unsealed

        run = open_unsealed(folder, manifest)
        images, labels, _ = decode_samples(picked, run.image_size, run.crop_pct)
        if not len(labels):
            return
        candidates = candidates_for(run.mirror_symmetric or bool(getattr(run.model, "flip", False)))
        boxes = all_boxes(candidates)
        classifier = run.classifier(engine)
        found = map_views(lambda view: np.asarray(classifier(view), np.float64), images, boxes)
        write_choice(folder, choose(found, labels, candidates, "validation", seen or ()))

    return hook


def decode_samples(samples: list, size: int, crop_pct: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw ``uint8`` images, labels, their indices in ``samples``) of the readable ``samples``, decoded
    as a run decodes them."""
    from cnnkit.data.images import UnreadableImageError, load_image

    images, kept = [], []
    for i, sample in enumerate(samples):
        try:
            images.append(load_image(sample.path, size, crop_pct))
        except UnreadableImageError:
            continue
        kept.append(i)
    labels = np.array([samples[i].label for i in kept], np.int64)
    return (np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)), labels, np.array(kept, int)


def write_choice(folder: Path, choice) -> None:
    """``tta.json`` (a ``cnnkit.tta.TTAChoice``) into a run being written."""
    from cnnkit.tta import CHOICE_FILE

    (Path(folder) / CHOICE_FILE).write_text(choice.model_dump_json(indent=2), encoding="utf-8")

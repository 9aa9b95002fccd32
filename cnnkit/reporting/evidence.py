"""What a report shows that must be computed while the model is at hand.

Written into a run (``heldout/<split>/``) by the producer's attach hook before
the seal, or beside `evaluate`'s outputs: the held-out scores and confusion
matrix, thumbnails of the most confident mistakes, and Grad-CAM (or
occlusion) overlays of a few held-out images. ``cnnkit.reporting.html`` then
renders the report from these files alone, without TensorFlow.

Layout of an evidence folder::

    metrics.json, confusion.json, confusion.png   as `evaluate` writes them
    mistakes.json     the most confident mistakes: path, true, predicted, score, thumbnail
    mistakes/<i>.png  their thumbnails (longest side THUMBNAIL px)
    gradcam.json      the explained images: path, true, predicted, score, method, layer, overlay
    gradcam/<i>.png   their overlays
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnkit.data import SkippedFile, UnreadableImageError, load_image
from cnnkit.errors import CnnkitError

THUMBNAIL = 160
MISTAKES = 8
OVERLAYS = 4


def confident_mistakes(evaluation, count: int = MISTAKES) -> list[int]:
    """Rows of the wrong predictions, most confident first."""
    predicted = evaluation.predictions
    wrong = np.flatnonzero(predicted != evaluation.labels)
    confidence = evaluation.probabilities[wrong, predicted[wrong]]
    return [int(i) for i in wrong[np.argsort(-confidence, kind="stable")][:count]]


def overlay_rows(evaluation, count: int = OVERLAYS) -> list[int]:
    """Rows to explain: the two most confident mistakes, then the most confident right answers of other classes."""
    rows = confident_mistakes(evaluation, count // 2)
    predicted = evaluation.predictions
    right = np.flatnonzero(predicted == evaluation.labels)
    seen: set[int] = set()
    for i in right[np.argsort(-evaluation.probabilities[right, predicted[right]], kind="stable")]:
        if len(rows) >= count:
            break
        if int(evaluation.labels[i]) not in seen:
            seen.add(int(evaluation.labels[i]))
            rows.append(int(i))
    return rows


def write_thumbnail(source: Path, target: Path, side: int = THUMBNAIL) -> bool:
    """A small PNG copy of an image; ``False`` if the source can no longer be read."""
    from PIL import Image

    try:
        pixels = load_image(source)
    except UnreadableImageError:
        return False
    image = Image.fromarray(pixels)
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, format="PNG")
    return True


def write_mistakes(evaluation, folder: Path, count: int = MISTAKES) -> None:
    """mistakes.json and mistakes/<i>.png."""
    names = evaluation.class_names
    entries = []
    for rank, row in enumerate(confident_mistakes(evaluation, count)):
        predicted = int(evaluation.predictions[row])
        thumbnail = f"mistakes/{rank}.png"
        if not write_thumbnail(evaluation.paths[row], folder / thumbnail):
            thumbnail = None
        entries.append({"path": str(evaluation.paths[row]), "true": names[int(evaluation.labels[row])],
                        "predicted": names[predicted], "score": float(evaluation.probabilities[row, predicted]),
                        "thumbnail": thumbnail})
    (folder / "mistakes.json").write_text(json.dumps(entries, indent=2, ensure_ascii=False))


def write_overlays(evaluation, run, folder: Path, count: int = OVERLAYS) -> None:
    """gradcam.json and gradcam/<i>.png: where the run looked in a few held-out images.

    A run whose model cannot be explained records why instead of failing.
    Heat maps need TensorFlow's gradients: when this process has not loaded
    TensorFlow (every feature came from the cache, or another engine ran the
    network) they are left out with a note, because importing it and running
    a forward and backward pass per overlay would undo what the cache saved.
    """
    import sys

    if "tensorflow" not in sys.modules:
        (folder / "gradcam.json").write_text(json.dumps({"error": (
            "not drawn, so that this report needed no TensorFlow (its features came from the cache or "
            "another engine); `cnnkit explain IMAGE --model RUN` draws them")}, ensure_ascii=False))
        return
    from cnnkit.explain import explain_image, explainer_for, plot_overlay

    names = evaluation.class_names
    entries: list[dict] = []
    try:
        explainer = explainer_for(run)
    except CnnkitError as error:
        (folder / "gradcam.json").write_text(json.dumps({"error": str(error)}, ensure_ascii=False))
        return
    for rank, row in enumerate(overlay_rows(evaluation, count)):
        path = evaluation.paths[row]
        try:
            explanation = explain_image(explainer, path, int(evaluation.predictions[row]))
            image = load_image(path)
        except UnreadableImageError:
            continue
        overlay = f"gradcam/{rank}.png"
        (folder / "gradcam").mkdir(exist_ok=True)
        truth = names[int(evaluation.labels[row])]
        plot_overlay(image, explanation.heatmap, f"predicted {explanation.label} {explanation.score:.2f}, "
                     f"true {truth}", folder / overlay, max_side=320)
        entries.append({"path": str(path), "true": truth, "predicted": explanation.label,
                        "score": explanation.score, "method": explanation.method, "layer": explanation.layer,
                        "overlay": overlay})
    (folder / "gradcam.json").write_text(json.dumps(entries, indent=2, ensure_ascii=False))


def write_evidence(evaluation, folder: Path, run=None, scores: bool = True) -> None:
    """Everything a report shows about ``evaluation`` into ``folder`` (created); overlays if ``run`` is given.

    Args:
        scores: also write metrics.json and the confusion matrix (as `evaluate` does).
    """
    from cnnkit.evaluation import write_evaluation_files

    folder.mkdir(parents=True, exist_ok=True)
    if scores:
        write_evaluation_files(evaluation, folder)
    write_mistakes(evaluation, folder)
    if run is not None:
        write_overlays(evaluation, run, folder)


def write_excluded(folder: Path, excluded: Sequence[Path]) -> None:
    """excluded.txt: the files ``--exclude`` left out of the run's data, one path a line."""
    (folder / "excluded.txt").write_text("".join(f"{path}\n" for path in excluded), encoding="utf-8")


def write_skipped(folder: Path, skipped: Sequence[SkippedFile]) -> None:
    """skipped.json: the files a run could not read, with why."""
    (folder / "skipped.json").write_text(json.dumps(
        [{"path": str(s.path), "reason": s.reason} for s in skipped], indent=2, ensure_ascii=False))

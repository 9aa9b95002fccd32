"""Model ensembles: a run that averages the class probabilities of other runs.

The notes: averaging several independently trained models gains "a few
percent". An ensemble is a run like any other (``EnsembleModel`` in its
manifest), so predict, evaluate and explain read it as they read any run.

It cannot change behind its back: each member run is copied into
``members/<i>/`` of the ensemble (only the files its manifest lists, plus the
manifest), the ensemble's manifest records each member's seal and, like every
run, the checksum of every file -- the members' included. Loading verifies the
ensemble, then each member as ``load_run`` does, then that each member still
carries the recorded seal and the same class names.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path


from cnnkit.errors import CnnkitError
from cnnkit.kinds.ensemble import EnsembleMember, EnsembleModel, check_same_classes
from cnnkit.runs import MANIFEST, Run, RunManifest, check_destination, load_run, open_unsealed, write_run


def parse_weights(text: str | None, count: int) -> list[float]:
    """``"2,1"`` -> ``[2.0, 1.0]``; ``None`` -> equal weights. One positive number per member."""
    if text is None:
        return [1.0] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise CnnkitError(f"--weights {text!r}: use comma-separated numbers, one per run, e.g. 2,1") from None
    if len(weights) != count:
        raise CnnkitError(f"--weights {text!r}: {len(weights)} number(s) for {count} runs; give one per run")
    if not all(w > 0 and w != float("inf") for w in weights):
        raise CnnkitError(f"--weights {text!r}: every weight must be a positive number")
    return weights


def make_ensemble(members: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None,
                  force: bool = False, attach: Sequence = (), data: str | Path | None = None,
                  progress: Callable[[int, int], None] | None = None, table_strategy: str | None = None,
                  command_line: str | None = None, split: str | None = None,
                  exclude: str | Path | None = None) -> Path:
    """Write a run at ``out`` averaging the probabilities of the runs ``members``.

    Args:
        members: two or more run folders (any kind, ensembles included).
        out: the ensemble run to write.
        weights: one positive weight per member (normalised to sum 1);
            ``None`` for equal weights.
        force: replace an existing run at ``out``.
        attach: hooks adding reports to the run (see ``cnnkit.runs.Attachment``).
        data: labelled images to score the ensemble on (their test split if
            they have one), recorded as ``data_accuracy`` and shown in its report.
        split: score ``data``'s split of this name instead, recorded as ``<split>_accuracy``
            (`auto`'s plans: the test split of the data the members learned from).
        progress: ``(done, total)`` callback over those images.
        exclude: a file listing images of ``data`` to leave out of the score (``--exclude``; `auto`'s plans).
        table_strategy: the strategy-table cell this run carries out (`auto`), to record.
        command_line: the commands that made it, to record, when not this one call (`auto`'s plan).

    Raises:
        CnnkitError: fewer than two runs, a damaged member, members whose class
            names differ, bad weights, or ``out`` exists without ``force``.
    """
    if len(members) < 2:
        raise CnnkitError("an ensemble needs at least two runs")
    out = Path(out)
    check_destination(out, force)
    runs = [load_run(path) for path in members]
    for run in runs[1:]:
        check_same_classes(runs[0], run)
    weights = list(weights) if weights is not None else [1.0] * len(runs)
    if len(weights) != len(runs) or not all(w > 0 for w in weights):
        raise CnnkitError(f"--weights: give one positive weight per run ({len(runs)})")
    given = weights
    total = sum(weights)
    weights = [w / total for w in weights]

    def write_files(folder: Path) -> None:
        for i, run in enumerate(runs):
            copy_run(run, folder / "members" / str(i))

    manifest = RunManifest(
        command="ensemble", strategy=table_strategy, command_line=command_line or shlex.join(
            ["cnnkit", "ensemble", *map(str, members), "--out", str(out),
             "--weights", ",".join(f"{w:g}" for w in given)]),
        options={"members": [str(Path(p).resolve()) for p in members], "weights": weights},
        class_names=runs[0].class_names, image_size=max(r.image_size for r in runs),
        # Members that learned from the same files (auto's plans): the ensemble did too, so
        # export's check and `info` find that data as they do for a single run.
        data=runs[0].manifest.data if all(r.manifest.data == runs[0].manifest.data for r in runs) else None,
        crop_pct=max(r.crop_pct for r in runs), preprocessing="per member",
        metrics=member_metrics(runs),
        model=EnsembleModel(members=[EnsembleMember(path=f"members/{i}", seal=run.manifest.seal, weight=w)
                                     for i, (run, w) in enumerate(zip(runs, weights))]),
    )
    from cnnkit.reporting import write_report

    def score(folder: Path, manifest: RunManifest) -> None:
        from cnnkit.evaluation import evaluate_run
        from cnnkit.reporting.evidence import write_evidence

        run = open_unsealed(folder, manifest)
        evaluation = evaluate_run(run, data, split=split, progress=progress, exclude=exclude)
        write_evidence(evaluation, folder / "heldout" / (split or "data"), run)
        manifest.metrics[f"{split or 'data'}_accuracy"] = evaluation.accuracy

    hooks = [score] if data is not None else []
    return write_run(out, manifest, write_files, force, attach=[*hooks, *attach, write_report])


def copy_run(run: Run, destination: Path) -> None:
    """Copy exactly the files ``run``'s manifest lists, and the manifest, into ``destination``."""
    for name in [*run.manifest.files, MANIFEST]:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.path / name, target)


def member_metrics(runs: Sequence[Run]) -> dict[str, float | None]:
    """The members' held-out accuracies, ``member<i>_<metric>``, for the record."""
    metrics: dict[str, float | None] = {}
    for i, run in enumerate(runs):
        for key in ("cv_accuracy", "val_accuracy", "test_accuracy"):
            value = run.manifest.metrics.get(key)
            if isinstance(value, float):
                metrics[f"member{i}_{key}"] = value
    return metrics

"""Reports a person looks at: report.html in every run, and beside `evaluate`'s results.

``run_attachments`` gives a producer (extract, finetune, train, ensemble) the
attach hooks that write the report's evidence and then ``report.html`` into
the run before it is sealed; ``write_evaluation_report`` does the same for an
evaluation folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cnnkit.reporting.evidence import write_evidence, write_excluded, write_skipped
from cnnkit.reporting.html import REPORT, render, write_report


def run_attachments(evaluation=None, split: str | None = None, skipped: Sequence = (),
                    attach: Sequence = (), excluded: Sequence = ()) -> list:
    """Hooks for ``write_run``: the evidence, then the producer's own ``attach`` hooks, then report.html last.

    Args:
        evaluation: held-out scores of the new model (a ``cnnkit.evaluation.Evaluation``), or ``None``.
        split: what ``evaluation`` was measured on ("test", "val", "data"): its folder ``heldout/<split>``
            (not ``eval/``, where `evaluate` writes by default).
        skipped: the files the run could not read.
        attach: the producer's caller's hooks (auto's report.md), run before report.html so it can show them.
        excluded: the files ``--exclude`` left out, listed in excluded.txt.
    """

    def evidence(folder: Path, manifest) -> None:
        from cnnkit.runs import open_unsealed

        if skipped:
            write_skipped(folder, skipped)
        if excluded:
            write_excluded(folder, excluded)
        if evaluation is not None:
            write_evidence(evaluation, folder / "heldout" / (split or "data"), open_unsealed(folder, manifest))

    return [evidence, *attach, write_report]


def write_evaluation_report(evaluation, out: str | Path, run) -> Path:
    """`evaluate`'s outputs with the evidence and a report.html of the run and these results, in ``out``."""
    from cnnkit.evaluation import write_evaluation

    def extra(folder: Path) -> None:
        write_evidence(evaluation, folder, run, scores=False)  # write_evaluation wrote the scores
        title = f"Evaluation: {len(evaluation.labels)} images"
        (folder / REPORT).write_text(render(run.path, run.manifest, [(title, folder)], name=run.path.name),
                                     encoding="utf-8")

    return write_evaluation(evaluation, out, extra)


__all__ = ["REPORT", "render", "run_attachments", "write_evaluation_report", "write_report"]

"""A plan: what a strategy runs, as a command, its options object and the equivalent command line.

`advise` returns a ``Plan``; `advise` prints it and `auto` executes it, so the
command shown and the one run are built from the same values (the command
line comes from ``cnnkit.options.command_line``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from cnnkit.kinds import TriedRow
from cnnkit.options import Strategy, command_line


@dataclass
class Plan:
    """What to run for a strategy.

    Attributes:
        strategy: the table's strategy.
        command: "extract", "finetune", "train" or "ensemble".
        data: the dataset.
        options: ``ExtractOptions`` or ``TrainOptions``; ``None`` for an ensemble.
        members: an ensemble's plans, each run on its own, then averaged (``cnnkit ensemble``).
        weights: an ensemble's weight for each member's probabilities; ``None`` for equal weights.
    """

    strategy: Strategy
    command: str
    data: str
    options: object = None
    members: list[Plan] = field(default_factory=list)
    weights: list[float] | None = None

    @property
    def command_line(self) -> str:
        """The commands a user would type; an ensemble's members go to ``RUN-0``, ``RUN-1``..."""
        if self.command != "ensemble":
            return command_line(self.command, self.data, self.options)
        names = [f"RUN-{i}" for i in range(len(self.members))]
        steps = [f"{member.command_line} --out {name}" for member, name in zip(self.members, names)]
        weights = f" --weights {','.join(f'{w:g}' for w in self.weights)}" if self.weights else ""
        return " && ".join([*steps, f"cnnkit ensemble {' '.join(names)}{weights} --out RUN"])

    def to_dict(self) -> dict:
        if self.command == "ensemble":
            return {"strategy": str(self.strategy), "command": self.command, "data": self.data,
                    "members": [member.to_dict() for member in self.members], "weights": self.weights,
                    "command_line": self.command_line}
        return {"strategy": str(self.strategy), "command": self.command, "data": self.data,
                "options": {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self.options).items()},
                "command_line": self.command_line}

    def run(self, out: str | Path, force: bool = False, dataset=None, attach=(), report=None, say=None):
        """Carry the plan out: ``run_extract`` or ``run_training`` with its options, into ``out``.

        ``report`` gets each searched candidate (extract) or finished epoch (training); ``say`` short
        status lines (training).
        """
        if self.command == "ensemble":
            return self._run_ensemble(out, force, dataset, attach, report, say)
        if self.command == "extract":
            from cnnkit.extraction import run_extract

            return run_extract(self.data, self.options, out, force, dataset=dataset, attach=attach,
                               table_strategy=str(self.strategy), report=report)
        from cnnkit.training import run_training

        return run_training(self.data, self.options, out, force, report=report, say=say,
                            dataset=dataset, attach=attach, table_strategy=str(self.strategy))

    def _run_ensemble(self, out, force, dataset, attach, report, say) -> EnsembleResult:
        """Each member into a scratch folder, then the ensemble run (which copies them in) at ``out``.

        The ensemble's held-out evidence is its members' averaged where they share it (same images,
        same views), else the ensemble's own pass over the data's test split, when it has one.
        """
        import tempfile

        from cnnkit.ensemble import make_ensemble
        from cnnkit.runs import load_run

        weights = self.weights or [1.0] * len(self.members)
        with tempfile.TemporaryDirectory(prefix="cnnkit-members-") as scratch:
            results = [member.run(Path(scratch) / f"{i}-{member.options.backbone}", dataset=dataset, report=report,
                                  say=say)
                       for i, member in enumerate(self.members)]
            shared = _held_out_average(results, weights)
            scored = "test" if not shared and dataset is not None and dataset.splits.get("test") else None
            path = make_ensemble([result.run_path for result in results], out, weights=weights, force=force,
                                 attach=[*shared, *attach], table_strategy=str(self.strategy),
                                 command_line=self.command_line, data=self.data if scored else None, split=scored,
                                 exclude=self.members[0].options.exclude)
        run = load_run(path)
        return EnsembleResult(path, run.manifest.metrics, tried_in(run))


def tried_in(run) -> list[TriedRow]:
    """The candidates a run's search scored (an ensemble's, member by member, named by backbone)."""
    from cnnkit.kinds import get_kind

    return get_kind(run.kind, run.path).tried(run)


@dataclass
class EnsembleResult:
    """What an ensemble plan wrote: the run, its metrics (the members', see ``member_metrics``), and
    every candidate its members scored (``tried``)."""

    run_path: Path
    metrics: dict
    tried: list[TriedRow]


def _held_out_average(results, weights) -> list:
    """A hook writing the ensemble's own held-out evidence and accuracy, when its members have some.

    Members of one plan see the same images in the same order and, with ``--val-split 0``, the
    same CV folds (same labels and seed), so the weighted mean of their held-out (or out-of-fold)
    probabilities is exactly what the ensemble predicts there: its CV accuracy and confusion
    matrix, not the members'. Members without such evidence (training runs) get none here.
    """
    evaluations = [result.evaluation for result in results]
    splits = {result.held_out for result in results}
    if None in evaluations or len(splits) != 1 or any(e.paths != evaluations[0].paths for e in evaluations):
        return []
    from dataclasses import replace

    import numpy as np

    split = splits.pop()
    evaluation = replace(evaluations[0], probabilities=np.average([e.probabilities for e in evaluations], axis=0,
                                                                  weights=weights),
                         tta_views=0, plain_probabilities=None)

    def evidence(folder: Path, manifest) -> None:
        from cnnkit.reporting.evidence import write_evidence
        from cnnkit.runs import open_unsealed

        write_evidence(evaluation, folder / "heldout" / split, open_unsealed(folder, manifest))
        manifest.metrics[f"{split}_accuracy"] = evaluation.accuracy

    return [evidence]

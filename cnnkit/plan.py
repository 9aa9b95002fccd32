"""A plan: what a strategy runs, as a command, its options object and the equivalent command line.

`advise` returns a ``Plan``; `advise` prints it and `auto` executes it, so the
command shown and the one run are built from the same values (the command
line comes from ``cnnkit.options.command_line``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from cnnkit.choices import Choice
from cnnkit.options import command_line


class Strategy(Choice):
    """The cells of the notes' table (see ``cnnkit.advise``)."""

    linear_top = "linear-top"
    linear_stages = "linear-stages"
    finetune_few = "finetune-few"
    finetune_many = "finetune-many"
    train_scratch = "train-scratch"


@dataclass
class Plan:
    """What to run for a strategy.

    Attributes:
        strategy: the table's strategy.
        command: "extract", "finetune" or "train".
        data: the dataset.
        options: ``ExtractOptions`` or ``TrainOptions``.
    """

    strategy: Strategy
    command: str
    data: str
    options: object

    @property
    def command_line(self) -> str:
        return command_line(self.command, self.data, self.options)

    def to_dict(self) -> dict:
        return {"strategy": str(self.strategy), "command": self.command, "data": self.data,
                "options": {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self.options).items()},
                "command_line": self.command_line}

    def run(self, out: str | Path, force: bool = False, dataset=None, attach=(), report=None, progress=None):
        """Carry the plan out: ``run_extract`` or ``run_training`` with its options, into ``out``.

        ``report`` gets each searched candidate (extract) or finished epoch (training).
        """
        if self.command == "extract":
            from cnnkit.extraction import run_extract

            return run_extract(self.data, self.options, out, force, dataset=dataset, attach=attach,
                               strategy=str(self.strategy), report=report)
        from cnnkit.training import run_training

        return run_training(self.data, self.options, out, force, report=report, progress=progress,
                            dataset=dataset, attach=attach, strategy=str(self.strategy))

"""Finding and reading the checkpoint an interrupted run continues from.

While a run trains, its checkpoints live in a hidden work folder beside the
destination (``.RUN.training/checkpoints``); a run saved after Ctrl-C or
SIGTERM also carries a copy in ``RUN/checkpoints``. ``state.json`` names the
last complete epoch folder and holds the options and every stateful
callback's state (see ``callbacks.EpochCheckpoint``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cnnkit.errors import CnnkitError
from cnnkit.training.callbacks import CHECKPOINT_FORMAT
from cnnkit.options import TrainOptions


def work_folder(out: Path, task: str = "") -> Path:
    """The hidden folder beside ``out`` that holds a run's checkpoints while it trains.

    Args:
        task: a worker that is not the chief of a multi-worker run ("worker-1")
            keeps its own checkpoints in a folder of its own, so workers sharing
            a file system never write the same files.
    """
    out = Path(out)
    return out.parent / (f".{out.name}.training" + (f"-{task}" if task else ""))


@dataclass
class ResumePoint:
    """Where an interrupted run stopped.

    Attributes:
        folder: the checkpoints folder it was found in.
        options: the run's options.
        phase: the phase of the last finished epoch.
        next_epoch: the first epoch still to run (0-based, counted over all phases).
        checkpoint: the folder (in ``folder``) with that epoch's weights and optimizer.
        callbacks: each stateful callback's saved state.
        sanity: the sanity-check result, if one ran.
    """

    folder: Path
    options: TrainOptions
    phase: str
    next_epoch: int
    checkpoint: str
    callbacks: dict
    sanity: dict | None = None

    @property
    def weights(self) -> Path:
        return self.folder / self.checkpoint / "model.weights.h5"

    @property
    def optimizer(self) -> Path:
        return self.folder / self.checkpoint / "optimizer.npz"


def find_resume_point(out: Path, task: str = "") -> ResumePoint:
    """The latest checkpoint of the run at ``out``: from its work folder (killed) or the run (interrupted).

    Args:
        task: this worker's task, when it is not the chief (see ``work_folder``).

    Raises:
        CnnkitError: no checkpoint, or one that is damaged or from another cnnkit version.
    """
    out = Path(out)
    for folder in (work_folder(out, task) / "checkpoints", out / "checkpoints"):
        if (folder / "state.json").exists():
            break
    else:
        raise CnnkitError(f"--resume {out}: no checkpoint found")
    try:
        # Plain JSON, validated below: a checkpoint folder cannot run code.
        state = json.loads((folder / "state.json").read_text())
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CnnkitError(f"--resume {out}: the checkpoint was written by another cnnkit version; "
                              "start a new run")
        point = ResumePoint(folder, TrainOptions(**state["options"]), str(state["phase"]),
                            int(state["next_epoch"]), str(state["checkpoint"]), dict(state["callbacks"]),
                            state.get("sanity"))
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise CnnkitError(f"--resume {out}: damaged checkpoint ({error}); start a new run") from None
    if Path(point.checkpoint).name != point.checkpoint or not point.weights.is_file():
        raise CnnkitError(f"--resume {out}: damaged checkpoint (no {point.checkpoint}); start a new run")
    return point

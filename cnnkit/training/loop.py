"""The phase loop: each phase freezes what it must, compiles, and fits with its callbacks.

Fine-tuning is two phases (the new head with the backbone frozen, then the
stages above ``--freeze`` at a tenth of the rate); training every layer is
one. Epochs are counted across phases, so a checkpoint's ``next_epoch`` says
where to continue whatever phase it falls in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cnnkit.options import Mode, Optimizer, Schedule, TrainOptions


@dataclass(frozen=True)
class Phase:
    """One ``model.fit`` of a run.

    Attributes:
        name: "head", "finetune" or "train".
        freeze: the stage frozen through ("all": the whole backbone, "none").
        epochs: how many epochs the phase has.
        rate: its base learning rate.
        schedule: its per-epoch decay.
        warmup: epochs of warm-up at its start.
    """

    name: str
    freeze: str
    epochs: int
    rate: float
    schedule: Schedule
    warmup: int


def plan_phases(options: TrainOptions) -> list[Phase]:
    """The phases of a run, in order."""
    if options.mode == Mode.train:
        return [Phase("train", "none", options.epochs, options.lr, options.schedule, options.warmup)]
    phases = []
    if options.head_epochs > 0:
        phases.append(Phase("head", "all", options.head_epochs, options.lr, Schedule.constant, 0))
    phases.append(Phase("finetune", str(options.freeze), options.epochs, options.lr * options.finetune_lr_scale,
                        options.schedule, options.warmup))
    return phases


def make_optimizer(options: TrainOptions, rate: float):
    """SGD with momentum (the notes' default), Adam or AdamW, with weight decay."""
    import keras

    decay = options.weight_decay or None
    if options.optimizer == Optimizer.adam:
        return keras.optimizers.Adam(rate, weight_decay=decay)
    if options.optimizer == Optimizer.adamw:
        return keras.optimizers.AdamW(rate, weight_decay=options.weight_decay or 0.004)
    return keras.optimizers.SGD(rate, momentum=options.momentum, weight_decay=decay)


def compile_model(model, options: TrainOptions, rate: float) -> None:
    import keras

    model.compile(
        optimizer=make_optimizer(options, rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=options.label_smoothing),
        metrics=["accuracy"],
        jit_compile=False,
    )
    model.optimizer.build(model.trainable_variables)


def truncate_history(path: Path, epochs: int) -> None:
    """Keep the header and the rows of the first ``epochs`` epochs of a CSVLogger file.

    The logger writes an epoch's row before its checkpoint, so after a crash
    the file may hold one row more than the checkpoint; resuming drops it.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: 1 + epochs]))


def read_history(path: Path) -> dict[str, list]:
    """A CSVLogger file as columns: ``phase`` as strings, ``epoch`` as ints, the rest as floats."""
    import csv

    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    history: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key == "phase":
                history.setdefault(key, []).append(value)
            elif key == "epoch":
                history.setdefault(key, []).append(int(value))
            else:
                history.setdefault(key, []).append(float(value) if value not in ("", "NA") else float("nan"))
    return history


@dataclass
class LoopContext:
    """What the phases share: the network, its data and where checkpoints go."""

    model: object
    spec: object
    options: TrainOptions
    device: object  # DeviceSetup
    train_ds: object
    val_ds: object
    epoch_var: object
    train_images: int
    work: Path
    sanity: dict | None = None
    ratios: object = None  # the run-wide UpdateRatioMonitor, set by run_phases
    best: object = None  # the run-wide BestWeights, set by run_phases


def run_phases(ctx: LoopContext, resume=None, report: Callable[[dict], None] | None = None,
               say: Callable[[str], None] | None = None):
    """Train every phase (or what remains of them after ``resume``).

    The run-wide stateful callbacks (update ratios, best weights) are left
    in ``ctx.ratios`` and ``ctx.best``, also when training is interrupted.

    Raises:
        KeyboardInterrupt: Ctrl-C or SIGTERM; the last finished epoch is checkpointed.
    """
    import keras

    from cnnkit.training.callbacks import BestWeights, EpochCheckpoint, EpochReporter, EpochSeeding, EpochStats
    from cnnkit.training.callbacks import restore_optimizer
    from cnnkit.training.monitor import UpdateRatioMonitor
    from cnnkit.training.network import backbone_of, freeze_through, stage_groups
    from cnnkit.training.schedule import LearningRatePolicy

    say = say or (lambda message: None)
    options, model = ctx.options, ctx.model
    checkpoints = ctx.work / "checkpoints"
    history = ctx.work / "history.csv"
    steps = max(1, -(-ctx.train_images // options.batch_size))
    ratios = ctx.ratios = UpdateRatioMonitor(stage_groups(ctx.spec, backbone_of(model)), steps)
    best = ctx.best = BestWeights(checkpoints / "best.weights.h5")
    start = 0
    if resume is not None:
        start = resume.next_epoch
        ratios.restore(resume.callbacks["update_ratios"])
        best.restore(resume.callbacks["best"])
        truncate_history(history, start)

    first = 0
    for phase in plan_phases(options):
        last = first + phase.epochs
        if start >= last:
            first = last
            continue
        freeze_through(ctx.spec, model, phase.freeze)
        with ctx.device.strategy.scope():
            compile_model(model, options, phase.rate)
        policy = LearningRatePolicy(phase.rate, phase.schedule, phase.epochs, phase.warmup,
                                    patience=options.plateau_patience, first_epoch=first)
        if resume is not None:
            # The weights of the last finished epoch; mid-phase also the optimizer and the rate.
            model.load_weights(resume.weights)
            if resume.phase == phase.name and start > first:
                restore_optimizer(model, resume.optimizer)
                policy.restore(resume.callbacks["policy"])
            resume = None
        say(f"phase {phase.name}: {'backbone frozen' if phase.freeze == 'all' else 'frozen through ' + phase.freeze}, "
            f"lr {phase.rate:g}, epochs {max(start, first) + 1}-{last}")
        # Order matters: statistics first, the CSV row before the checkpoint (a
        # resume drops an extra row), the report after it (a reported epoch is saved).
        callbacks = [
            EpochSeeding(ctx.epoch_var, options.seed),
            EpochStats(phase.name, ctx.train_images),
            policy,
            ratios,
            best,
            keras.callbacks.CSVLogger(str(history), append=True),
            EpochCheckpoint(checkpoints, options, phase.name, {"policy": policy, "best": best, "update_ratios": ratios},
                            extra={"sanity": ctx.sanity}),
            EpochReporter(report or (lambda row: None)),
            keras.callbacks.EarlyStopping("val_accuracy", patience=options.patience, mode="max"),
        ]
        if options.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(ctx.work / "tensorboard")))
        model.fit(ctx.train_ds, validation_data=ctx.val_ds, epochs=last, initial_epoch=max(start, first),
                  callbacks=callbacks, verbose=0)
        # Early stopping ends the head phase (the head has converged), or the whole run.
        if model.stop_training and phase.name != "head":
            break
        first = last
        start = max(start, last)

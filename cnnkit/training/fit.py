"""Fine-tuning above a named stage, and training every layer, with the notes' practice.

``run_training`` composes the pieces, each in its own module:

1. ``resume``: find the checkpoint an interrupted run continues from;
2. ``options``: check every flag before any slow work;
3. ``device``: pick CPU or GPU(s) and the precision;
4. ``network``: build the classifier (``sanity`` first overfits two batches if asked);
5. ``loop``: train phase by phase with one callback per job (``callbacks``,
   ``schedule``, ``monitor``); Ctrl-C or SIGTERM stops after the last
   finished epoch;
6. ``save``: write the run, with a checkpoint to ``--resume`` from if it was
   interrupted.

A resumed run continues from the next epoch with the same data order and the
same result as an uninterrupted run of the same seed.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data import Dataset, load_dataset, load_image, split_dataset
from cnnkit.errors import CnnkitError
from cnnkit.options import Mode, TrainOptions


@dataclass
class TrainResult:
    """What a training run measured and where it was saved."""

    run_path: Path
    history: dict[str, list]
    metrics: dict[str, float | int | None]
    diagnosis: list[str]
    sanity: dict | None = None
    interrupted: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list = field(default_factory=list)


def check_options(options: TrainOptions):
    """Validate what the option types cannot: the stage against the backbone, weights against the mode.

    Returns:
        the backbone's registry entry.
    """
    from cnnkit.backbones import get_backbone

    spec = get_backbone(options.backbone)
    if options.mode == Mode.finetune:
        if options.weights == "none":
            raise CnnkitError("finetune starts from pretrained weights; use `cnnkit train --weights none` "
                              "to train from scratch")
        if options.freeze != "none":
            spec.check_stage(str(options.freeze))
    return spec


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Treat SIGTERM (a scheduler's stop, `kill`) like Ctrl-C while training."""
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread; Ctrl-C still works
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_training(data: str | Path, options: TrainOptions, out: str | Path, force: bool = False,
                 resume: bool = False, report: Callable[[dict], None] | None = None,
                 progress: Callable[[str], None] | None = None, dataset: Dataset | None = None,
                 attach: Sequence = (), strategy: str | None = None) -> TrainResult:
    """Train a classifier network on ``data`` and save it as a run at ``out``.

    Args:
        options: see ``TrainOptions``; with ``resume`` they come from the checkpoint.
        force: replace an existing run at ``out``.
        resume: continue the interrupted run at ``out`` from its last epoch.
        report: called with each finished epoch's numbers.
        progress: called with short status lines (phase changes, sanity check).
        attach: hooks adding reports to the run (see ``cnnkit.runs.Attachment``).
        strategy: the strategy-table cell this run carries out, to record.
    """
    import tensorflow as tf

    from cnnkit.runs import check_destination
    from cnnkit.training.augment import Augmentation
    from cnnkit.training.datasets import evaluation_batches, training_batches
    from cnnkit.training.device import setup_device
    from cnnkit.training.loop import LoopContext, read_history, run_phases
    from cnnkit.training.monitor import diagnose
    from cnnkit.training.network import build_network, freeze_through
    from cnnkit.training.resume import find_resume_point, work_folder
    from cnnkit.training.sanity import sanity_check
    from cnnkit.training.save import TrainingOutcome, save_training_run

    out = Path(out)
    say = progress or (lambda message: None)
    point = None
    if resume:
        point = find_resume_point(out)
        options = point.options
    else:
        check_destination(out, force)

    spec = check_options(options)
    augmentation = Augmentation.preset(options.augment)
    weights = None if options.weights == "none" else options.weights
    image_size = options.image_size or spec.input_size
    device = setup_device(options.device, options.deterministic, options.seed)
    say(f"training on {device.description}")

    dataset = dataset or load_dataset(data, strict=options.strict)
    if "val" not in dataset.splits and options.val_split <= 0:
        raise CnnkitError("training needs validation images: give DATA a val/ folder or --val-split > 0")
    splits = split_dataset(dataset, options.val_split, options.seed)
    train, val = splits["train"], splits.get("val", [])
    if not val:
        raise CnnkitError(f"{data}: too few images for a validation split; add images or a val/ folder")
    num_classes = len(dataset.class_names)

    work = work_folder(out)
    if point is None:
        shutil.rmtree(work, ignore_errors=True)
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    if point is not None and point.folder != work / "checkpoints":
        shutil.copytree(point.folder, work / "checkpoints", dirs_exist_ok=True)
        if (out / "history.csv").exists() and not (work / "history.csv").exists():
            shutil.copyfile(out / "history.csv", work / "history.csv")
        point.folder = work / "checkpoints"

    def network(dropout: float, augment: Augmentation):
        with device.strategy.scope(), device.precision():
            return build_network(spec, num_classes, weights, image_size, dropout, augment, options.seed)

    model = network(options.dropout, augmentation)
    sanity = point.sanity if point else None
    if options.sanity and sanity is None:
        say("sanity check: overfitting two batches")
        subset = train[: min(len(train), 2 * min(options.batch_size, 16))]
        images = np.stack([load_image(s.path, image_size) for s in subset])
        labels = np.array([s.label for s in subset])

        def fresh():
            copy = network(0.0, Augmentation())
            freeze_through(spec, copy, str(options.freeze) if options.mode == Mode.finetune else "none")
            return copy

        sanity = sanity_check(fresh, images, labels, num_classes)
        say(f"sanity check {'passed' if sanity['passed'] else 'FAILED'}: loss {sanity['initial_loss']:.3f} -> "
            f"{sanity['final_loss']:.4f} in {sanity['steps']} steps")

    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    train_ds, train_stream = training_batches(train, num_classes, image_size, options.batch_size, options.seed,
                                              epoch_var)
    val_ds, val_stream = evaluation_batches(val, num_classes, image_size, options.batch_size)
    ctx = LoopContext(model, spec, options, device, train_ds, val_ds, epoch_var, len(train), work, sanity)
    interrupted = False
    try:
        with sigterm_as_interrupt():
            run_phases(ctx, point, report, say)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: saving the best model so far and a checkpoint to --resume from")

    history = read_history(work / "history.csv")
    best_weights = work / "checkpoints" / "best.weights.h5"
    if best_weights.exists():
        model.load_weights(best_weights)
    ratio_history = ctx.ratios.history if ctx.ratios else []
    best_epoch, best_value = (ctx.best.best_epoch, ctx.best.best) if ctx.best else (0, None)
    diagnosis = diagnose(history, ratio_history, mode=str(options.mode))
    metrics = {"best_epoch": best_epoch, "val_accuracy": best_value if best_epoch else None,
               "train_accuracy": history["accuracy"][-1] if history.get("accuracy") else None}
    if splits.get("test") and not interrupted:
        test_ds, _ = evaluation_batches(splits["test"], num_classes, image_size, options.batch_size)
        metrics["test_accuracy"] = float(model.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"])
    outcome = TrainingOutcome(model, history, ratio_history, diagnosis, metrics, sanity, interrupted, best_epoch)
    skipped = dataset.skipped + train_stream.failures + val_stream.failures
    run_path = save_training_run(out, outcome, spec, options, dataset, splits, image_size, work,
                                 replace=force or resume, skipped=skipped, attach=attach, strategy=strategy)
    if not interrupted:
        shutil.rmtree(work, ignore_errors=True)
    return TrainResult(run_path, history, metrics, diagnosis, sanity, interrupted,
                       {k: len(v) for k, v in splits.items()}, skipped)


"""Fine-tuning above a named stage, and training every layer, with the notes' practice.

``run_training`` composes the pieces, each in its own module:

1. ``resume``: find the checkpoint an interrupted run continues from;
2. ``options``: check every flag before any slow work;
3. ``device``: pick CPU, GPU(s) or the workers of ``TF_CONFIG``, and the precision;
4. ``network``: build the classifier (``sanity`` first overfits two batches if asked);
5. ``loop``: train phase by phase with one callback per job (``callbacks``,
   ``schedule``, ``monitor``); Ctrl-C or SIGTERM stops after the last
   finished epoch;
6. ``save``: write the run, with a checkpoint to ``--resume`` from if it was
   interrupted (across several workers, only the chief writes it).

A resumed run continues from the next epoch with the same data order and the
same result as an uninterrupted run of the same seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data import Dataset, left_out_line, load_excluding, load_image, split_dataset
from cnnkit.errors import CnnkitError
from cnnkit.options import Mode, TrainOptions


@dataclass
class TrainResult:
    """What a training run measured and where it was saved (``run_path`` None: a worker that is not the chief)."""

    run_path: Path | None
    history: dict[str, list]
    metrics: dict[str, float | int | None]
    diagnosis: list[str]
    sanity: dict | None = None
    interrupted: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    weights_digest: str = ""
    # What an ensemble plan averages across members (see ExtractResult): a network's held-out evidence is
    # written into its own run, and an ensemble with a network member scores itself.
    evaluation: None = None
    held_out: None = None
    tried: list = field(default_factory=list)  # a network run searches no candidates


def weights_digest(model) -> str:
    """A short hash of every weight of ``model``: workers that trained together print the same one."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()[:16]


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
                 say: Callable[[str], None] | None = None, dataset: Dataset | None = None,
                 attach: Sequence = (), table_strategy: str | None = None) -> TrainResult:
    """Train a classifier network on ``data`` and save it as a run at ``out``.

    With ``TF_CONFIG`` naming several workers (see ``device``), every worker
    calls this with the same arguments; the chief writes the run at ``out``,
    the others write theirs to a temporary folder they delete (``run_path``
    is then None).

    Args:
        options: see ``TrainOptions``; with ``resume`` they come from the checkpoint.
        force: replace an existing run at ``out``.
        resume: continue the interrupted run at ``out`` from its last epoch.
        report: called with each finished epoch's numbers.
        say: called with short status lines (phase changes, sanity check).
        dataset: an already loaded dataset (``options.exclude`` was applied to it).
        attach: hooks adding reports to the run (see ``cnnkit.runs.Attachment``).
        table_strategy: the strategy-table cell this run carries out, to record (not a ``tf.distribute``
            strategy: that is ``device.strategy``).

    Raises:
        CnnkitError: bad options or data; in a multi-worker run, a worker that
            stopped or became unreachable (the others stop with this error).
    """
    import tensorflow as tf

    from cnnkit.runs import check_destination
    from cnnkit.training.device import helper_task, setup_device
    from cnnkit.training.resume import find_resume_point

    out = Path(out)
    started = time.monotonic()
    say = say or (lambda message: None)
    task = helper_task()
    point = None
    if resume:
        point = find_resume_point(out, task)
        options = point.options
    else:
        check_destination(out, force)

    spec = check_options(options)
    # First TensorFlow work of the run: a multi-worker strategy must come before any other.
    device = setup_device(options.device, options.deterministic, options.seed)
    say(f"training on {device.description}")
    try:
        deadline = started + options.time_limit * 60 if options.time_limit else None
        return _train(data, options, out, force, point, report, say, dataset, attach, table_strategy, spec, device,
                      deadline)
    except (tf.errors.UnavailableError, tf.errors.InternalError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError, tf.errors.AbortedError) as error:
        if device.workers == 1:
            raise
        # A collective op failed: a peer died or is unreachable (TensorFlow's health checks
        # abort the others' collectives within seconds instead of letting them wait forever).
        raise CnnkitError(
            f"training across {device.workers} workers stopped: a worker failed or became unreachable "
            f"({_first_words(error)}); every finished epoch is checkpointed: start all workers again with "
            f"--resume {out}") from None


def _first_words(error: Exception, limit: int = 240) -> str:
    """TensorFlow's error message on one line, without the graph node's Python traceback and decorations."""
    import re

    text = getattr(error, "message", str(error))
    text = re.sub(r"Graph execution error:|Detected at node \S+ defined at \(most recent call last\):"
                  r"(\s*File .*)*", " ", text)
    text = re.sub(r"\{\{[^}]*\}\}|\[\[[^\]]*\]\]|\[Op:[^\]]*\]", " ", text)
    text = " ".join(text.split())
    return (text[:limit] + "...") if len(text) > limit else text or type(error).__name__


def _train(data, options: TrainOptions, out: Path, force: bool, point, report, say, dataset, attach, table_strategy,
           spec, device, deadline: float | None = None) -> TrainResult:
    import tensorflow as tf

    from cnnkit.training.augment import Augmentation
    from cnnkit.training.datasets import evaluation_batches, training_batches
    from cnnkit.training.loop import LoopContext, Steps, read_history, run_phases
    from cnnkit.training.monitor import diagnose
    from cnnkit.kinds.network import inference_network
    from cnnkit.training.network import build_network, freeze_through, probabilities_of
    from cnnkit.training.resume import work_folder
    from cnnkit.training.sanity import sanity_check
    from cnnkit.training.save import TrainingOutcome, save_training_run
    from cnnkit.evaluation import tta_evidence_hook
    from cnnkit.tta import seen_candidates

    augmentation = Augmentation.preset(options.augment, options.erase)
    weights = None if options.weights == "none" else options.weights
    image_size = options.image_size or spec.input_size

    if dataset is None:
        dataset = load_excluding(data, options.exclude, strict=options.strict)
        if options.exclude:
            say(left_out_line(dataset, options.exclude))
    if "val" not in dataset.splits and options.val_split <= 0:
        raise CnnkitError("training needs validation images: give DATA a val/ folder or --val-split > 0")
    splits = split_dataset(dataset, options.val_split, options.seed)
    train, val = splits["train"], splits.get("val", [])
    if not val:
        raise CnnkitError(f"{data}: too few images for a validation split; add images or a val/ folder")
    num_classes = len(dataset.class_names)
    device.agree("data", _fingerprint(dataset.class_names, splits))
    device.agree("checkpoints (last finished epochs)", point.next_epoch if point else 0,
                 f"a worker stopped while writing one: copy the chief's {work_folder(out).name}/checkpoints "
                 f"over the others' {work_folder(out, 'worker-N').name}/checkpoints, then --resume again")

    work = work_folder(out, "" if device.chief else device.task)
    if point is None:
        shutil.rmtree(work, ignore_errors=True)
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    if point is not None and point.folder != work / "checkpoints":
        shutil.copytree(point.folder, work / "checkpoints", dirs_exist_ok=True)
        if (out / "history.csv").exists() and not (work / "history.csv").exists():
            shutil.copyfile(out / "history.csv", work / "history.csv")
        point.folder = work / "checkpoints"

    def network(dropout: float, augment: Augmentation, distributed: bool = True):
        scope = device.strategy.scope() if distributed else contextlib.nullcontext()
        with scope, device.precision():
            return build_network(spec, num_classes, weights, image_size, dropout, augment, options.seed)

    model = network(options.dropout, augmentation)
    sanity = point.sanity if point else None
    if options.sanity and sanity is None:
        say("sanity check: overfitting two batches")
        subset = train[: min(len(train), 2 * min(options.batch_size, 16))]
        images = np.stack([load_image(s.path, image_size) for s in subset])
        labels = np.array([s.label for s in subset])

        def fresh():
            # Outside the strategy: each worker checks its own copy, no gradient exchange.
            copy = network(0.0, Augmentation(), distributed=False)
            freeze_through(spec, copy, str(options.freeze) if options.mode == Mode.finetune else "none",
                           str(options.batchnorm) if options.mode == Mode.finetune else "train")
            return copy

        sanity = sanity_check(fresh, images, labels, num_classes)
        say(f"sanity check {'passed' if sanity['passed'] else 'FAILED'}: loss {sanity['initial_loss']:.3f} -> "
            f"{sanity['final_loss']:.4f} in {sanity['steps']} steps")

    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    train_ds, train_stream = training_batches(train, num_classes, image_size, options.batch_size, options.seed,
                                              epoch_var, device.strategy)
    val_ds, val_stream = evaluation_batches(val, num_classes, image_size, options.batch_size, device.strategy)
    ctx = LoopContext(model, spec, options, device, train_ds, val_ds, epoch_var, len(train), work, sanity,
                      deadline=deadline)
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
    with device.strategy.scope():
        predictor = inference_network(model, options.flip)  # as the saved run will predict
    if splits.get("test") and not interrupted:
        test_ds, _ = evaluation_batches(splits["test"], num_classes, image_size, options.batch_size,
                                        device.strategy)
        metrics["test_accuracy"] = float(Steps(probabilities_of(predictor), device.strategy)
                                         .evaluate(test_ds)["accuracy"])
    outcome = TrainingOutcome(model, predictor, history, ratio_history, diagnosis, metrics, sanity, interrupted,
                              best_epoch)
    skipped = dataset.skipped + train_stream.failures + val_stream.failures

    # Which test-time views help this network, measured on its validation images (tta.json; --tta reads it).
    seen = seen_candidates(augmentation.flip, augmentation.crop)
    hooks = [tta_evidence_hook(val, "tf", options.seed, seen), *attach]

    def save(destination: Path, replace: bool) -> Path:
        return save_training_run(destination, outcome, spec, options, dataset, splits, image_size, work,
                                 replace=replace, skipped=skipped, attach=hooks,
                                 table_strategy=table_strategy)

    if device.chief:
        run_path = save(out, force or point is not None)
    else:
        # The same work as the chief (saving may read distributed variables
        # together), written where nobody looks and deleted.
        with tempfile.TemporaryDirectory(prefix=f"cnnkit-{device.task}-") as scratch:
            save(Path(scratch) / out.name, False)
        run_path = None
    if not interrupted:
        shutil.rmtree(work, ignore_errors=True)
    return TrainResult(run_path, history, metrics, diagnosis, sanity, interrupted,
                       {k: len(v) for k, v in splits.items()}, skipped, weights_digest(model))


def _fingerprint(class_names: list[str], splits: dict) -> int:
    """A number that differs when two workers split different data (names, counts, labels, file names)."""
    digest = hashlib.sha256(json.dumps(class_names).encode())
    for name in sorted(splits):
        for sample in splits[name]:
            digest.update(f"{name}/{sample.label}/{Path(sample.path).name}\n".encode())
    return int.from_bytes(digest.digest()[:6], "big")

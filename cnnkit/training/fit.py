"""Fine-tuning above a named stage, and training every layer, with the notes' practice.

Fine-tuning runs in two phases: the new head alone with the backbone frozen,
then the stages above ``--freeze`` unfrozen at a tenth of the rate. Training
(``cnnkit train``) is one phase with every layer trainable.

Every epoch writes a checkpoint (weights, optimizer state, learning-rate
policy, history) to a hidden work folder beside the run; Ctrl-C or SIGTERM
stops after saving a usable run marked ``interrupted`` that ``--resume``
continues from the next epoch, with the same data order and the same result as
an uninterrupted run of the same seed.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data import Dataset, load_dataset, load_image, split_dataset
from cnnkit.errors import CnnkitError

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class TrainOptions:
    """Settings of a finetune or train run (the CLI flags, as a library object)."""

    mode: str = "finetune"  # or "train"
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    freeze: str = "conv4"
    image_size: int | None = None
    epochs: int = 10
    head_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.01
    finetune_lr_scale: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    schedule: str = "exp"
    warmup: int = 0
    weight_decay: float = 1e-4
    dropout: float = 0.2
    augment: str = "light"
    label_smoothing: float = 0.0
    val_split: float = 0.2
    patience: int = 5
    plateau_patience: int = 2
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    tensorboard: bool = False
    sanity: bool = False
    strict: bool = False


@dataclass
class TrainResult:
    """What a training run measured and where it was saved."""

    run_path: Path
    history: dict[str, list[float]]
    metrics: dict[str, float | None]
    diagnosis: list[str]
    sanity: dict | None = None
    interrupted: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list = field(default_factory=list)


def _phases(options: TrainOptions) -> list[tuple[str, str, int, float]]:
    """(phase, freeze, epochs, learning rate) in order."""
    if options.mode == "train":
        return [("train", "none", options.epochs, options.lr)]
    phases = []
    if options.head_epochs > 0:
        phases.append(("head", "all", options.head_epochs, options.lr))
    phases.append(("finetune", options.freeze, options.epochs, options.lr * options.finetune_lr_scale))
    return phases


def _optimizer(options: TrainOptions, rate: float):
    import keras

    decay = options.weight_decay or None
    if options.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=options.momentum, weight_decay=decay)
    if options.optimizer == "adam":
        return keras.optimizers.Adam(rate, weight_decay=decay)
    if options.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=options.weight_decay or 0.004)
    raise CnnkitError(f"--optimizer {options.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")


def _compile(model, options: TrainOptions, rate: float):
    import keras

    model.compile(
        optimizer=_optimizer(options, rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=options.label_smoothing),
        metrics=["accuracy"],
        jit_compile=False,
    )
    model.optimizer.build(model.trainable_variables)


def configure_device(device: str, deterministic: bool, seed: int) -> str:
    """Pick CPU or GPU(s); mixed precision on GPUs. Returns a description."""
    import keras
    import tensorflow as tf

    if device not in ("auto", "cpu", "gpu"):
        raise CnnkitError(f"--device {device!r}: choose from auto, cpu, gpu")
    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu" and not gpus:
        raise CnnkitError("--device gpu: no GPU visible to TensorFlow (see `cnnkit info`)")
    if device == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")
        gpus = []
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    if gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
        return f"{len(gpus)} GPU(s), mixed precision"
    return "CPU"


def _strategy():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def _training_dataset(paths, labels, num_classes, image_size, batch_size, seed, epoch_var):
    """Batches in an order that depends only on (seed, epoch), so a resumed run sees the same data."""
    import tensorflow as tf

    from cnnkit.data import ImageStream

    stream = ImageStream(paths, image_size)
    indices = tf.range(len(paths), dtype=tf.int64)
    labels_table = tf.constant(np.asarray(labels, np.int64))

    def epoch_order(_):
        order = tf.random.experimental.stateless_shuffle(
            indices, seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch_var.read_value(), tf.int64)]))
        return tf.data.Dataset.from_tensor_slices(order)

    ds = stream.decoded(tf.data.Dataset.from_tensors(0).flat_map(epoch_order))
    ds = ds.map(lambda image, index: (image, tf.one_hot(tf.gather(labels_table, index), num_classes)))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE), stream


def _eval_dataset(paths, labels, num_classes, image_size, batch_size):
    import tensorflow as tf

    from cnnkit.data import ImageStream

    stream = ImageStream(paths, image_size)
    ds = stream.dataset(batch_size, labels=labels)
    return ds.map(lambda image, label: (image, tf.one_hot(label, num_classes))), stream


def sanity_check(model_factory: Callable, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 max_steps: int = 150, target: float = 0.05) -> dict:
    """Overfit a tiny subset (the notes' first debugging step): the loss must fall near zero.

    Trains a fresh copy of the network (no augmentation or dropout) with Adam
    on ``images`` alone for up to ``max_steps`` steps.
    """
    import keras

    model = model_factory()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    y = keras.utils.to_categorical(labels, num_classes)
    first = last = float(model.evaluate(images, y, verbose=0))
    steps = 0
    for steps in range(1, max_steps + 1):
        last = float(model.train_on_batch(images, y))
        if last < target:
            break
    return {"passed": last < target, "initial_loss": first, "final_loss": last, "steps": steps,
            "images": int(len(images))}


def _work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.training"


def _checkpoint_dir(out: Path) -> Path | None:
    """Where a run's latest checkpoint is: the work folder (killed) or the run (interrupted)."""
    for folder in (_work_folder(out) / "checkpoints", out / "checkpoints"):
        if (folder / "state.json").exists():
            return folder
    return None


def run_training(data: str | Path, options: TrainOptions, out: str | Path, force: bool = False,
                 resume: bool = False, report: Callable[[dict], None] | None = None,
                 progress: Callable[[str], None] | None = None,
                 dataset: Dataset | None = None) -> TrainResult:
    """Train a classifier network on ``data`` and save it as a run at ``out``.

    Args:
        options: see ``TrainOptions``; with ``resume`` they come from the checkpoint.
        force: replace an existing run at ``out``.
        resume: continue the interrupted run at ``out`` from its last epoch.
        report: called with each finished epoch's numbers.
        progress: called with short status lines (phase changes, sanity check).
    """
    import keras
    import tensorflow as tf

    from cnnkit.backbones import get_backbone
    from cnnkit.runs import check_destination
    from cnnkit.training.augment import Augmentation
    from cnnkit.training.checkpoint import Checkpointer, EpochSync, restore_optimizer
    from cnnkit.training.monitor import EpochReporter, UpdateRatioMonitor, diagnose
    from cnnkit.training.network import FREEZE_CHOICES, build_network, freeze_through, stage_groups
    from cnnkit.training.schedule import LearningRatePolicy, schedule_factor

    out = Path(out)
    say = progress or (lambda message: None)
    state: dict = {}
    if resume:
        checkpoint = _checkpoint_dir(out)
        if checkpoint is None:
            raise CnnkitError(f"--resume {out}: no checkpoint found")
        from cnnkit.training.checkpoint import CHECKPOINT_FORMAT

        try:
            state = json.loads((checkpoint / "state.json").read_text())
            options = TrainOptions(**state["options"])
        except (ValueError, KeyError, TypeError) as error:
            raise CnnkitError(f"--resume {out}: damaged checkpoint ({error}); start a new run") from None
        if state.get("format") != CHECKPOINT_FORMAT or "checkpoint" not in state:
            raise CnnkitError(f"--resume {out}: the checkpoint was written by another cnnkit version; "
                              "start a new run")
    else:
        check_destination(out, force)

    # Validate every flag before any slow work.
    spec = get_backbone(options.backbone)
    if options.mode == "finetune" and options.freeze not in FREEZE_CHOICES[:-1]:
        raise CnnkitError(f"--freeze {options.freeze!r}: choose from {', '.join(FREEZE_CHOICES[:-1])}")
    if options.mode == "finetune" and options.freeze != "none":
        spec.check_stage(options.freeze)
    if options.optimizer not in OPTIMIZERS:
        raise CnnkitError(f"--optimizer {options.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
    schedule_factor(options.schedule, 0, max(options.epochs, 1), options.warmup)
    augmentation = Augmentation.preset(options.augment)
    weights = None if options.weights == "none" else options.weights
    if options.mode == "finetune" and weights is None:
        raise CnnkitError("finetune starts from pretrained weights; use `cnnkit train --weights none` "
                          "to train from scratch")
    image_size = options.image_size or spec.input_size
    device = configure_device(options.device, options.deterministic, options.seed)
    say(f"training on {device}")

    dataset = dataset or load_dataset(data, strict=options.strict)
    if "val" not in dataset.splits and options.val_split <= 0:
        raise CnnkitError("training needs validation images: give DATA a val/ folder or --val-split > 0")
    splits = split_dataset(dataset, options.val_split, options.seed)
    train, val = splits["train"], splits.get("val", [])
    if not val:
        raise CnnkitError(f"{data}: too few images for a validation split; add images or a val/ folder")
    num_classes = len(dataset.class_names)

    work = _work_folder(out)
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    if resume and checkpoint != work / "checkpoints":
        shutil.copytree(checkpoint, work / "checkpoints", dirs_exist_ok=True)

    strategy = _strategy()
    with strategy.scope():
        model = build_network(spec, num_classes, weights, image_size, options.dropout, augmentation, options.seed)
    backbone = model.get_layer("backbone")
    groups = stage_groups(spec, backbone)

    sanity = state.get("sanity")
    if options.sanity and sanity is None:
        say("sanity check: overfitting two batches")
        subset = train[: min(len(train), 2 * min(options.batch_size, 16))]
        images = np.stack([load_image(s.path, image_size) for s in subset])
        labels = np.array([s.label for s in subset])

        def factory():
            fresh = build_network(spec, num_classes, weights, image_size, 0.0, Augmentation(), options.seed)
            freeze_through(spec, fresh, options.freeze if options.mode == "finetune" else "none")
            return fresh

        sanity = sanity_check(factory, images, labels, num_classes)
        say(f"sanity check {'passed' if sanity['passed'] else 'FAILED'}: loss {sanity['initial_loss']:.3f} -> "
            f"{sanity['final_loss']:.4f} in {sanity['steps']} steps")

    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    train_ds, train_stream = _training_dataset([s.path for s in train], [s.label for s in train], num_classes,
                                               image_size, options.batch_size, options.seed, epoch_var)
    val_ds, val_stream = _eval_dataset([s.path for s in val], [s.label for s in val], num_classes,
                                       image_size, options.batch_size)
    steps = math.ceil(len(train) / options.batch_size)
    record = {"history": state.get("history", {}), "update_ratios": state.get("update_ratios", []),
              "best": state.get("best", {"val_accuracy": -1.0, "epoch": 0}), "sanity": sanity}
    start_epoch = state.get("next_epoch", 0)
    interrupted = False
    previous_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread; Ctrl-C still works
        previous_handler = None

    try:
        offset = 0
        for phase, freeze, epochs, rate in _phases(options):
            end = offset + epochs
            if start_epoch >= end:
                offset = end
                continue
            freeze_through(spec, model, freeze)
            with strategy.scope():
                _compile(model, options, rate)
            head_phase = phase == "head"
            policy = LearningRatePolicy(rate, "constant" if head_phase else options.schedule, epochs,
                                        0 if head_phase else options.warmup, patience=options.plateau_patience)
            if state and start_epoch > 0:
                # Resuming: the weights of the last finished epoch; mid-phase also the optimizer and rate.
                last = work / "checkpoints" / state["checkpoint"]
                model.load_weights(last / "model.weights.h5")
                if state["phase"] == phase and start_epoch > offset:
                    restore_optimizer(model, last / "optimizer.npz")
                    policy.restore(state["policy"])
                state = {}
            say(f"phase {phase}: {'backbone frozen' if freeze == 'all' else 'frozen through ' + freeze}, "
                f"lr {rate:g}, epochs {max(start_epoch, offset) + 1}-{end}")
            ratio_monitor = UpdateRatioMonitor(groups, steps)
            # The checkpoint is written before the epoch is reported, so an interrupt
            # seen while reporting never loses a finished epoch.
            callbacks = [EpochSync(epoch_var, policy, offset, options.seed, len(train)), ratio_monitor,
                         Checkpointer(work / "checkpoints", options, phase, policy, record, ratio_monitor),
                         EpochReporter(report or (lambda row: None), phase),
                         keras.callbacks.EarlyStopping("val_accuracy", patience=options.patience, mode="max")]
            if options.tensorboard:
                callbacks.append(keras.callbacks.TensorBoard(str(work / "tensorboard")))
            model.fit(train_ds, validation_data=val_ds, epochs=end, initial_epoch=max(start_epoch, offset),
                      callbacks=callbacks, verbose=0)
            # Early stopping ends the head phase (the head has converged), or the whole run.
            if model.stop_training and not head_phase:
                break
            offset = end
            start_epoch = max(start_epoch, end)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: saving the best model so far and a checkpoint to --resume from")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    history, ratios, best = record["history"], record["update_ratios"], record["best"]
    best_weights = work / "checkpoints" / "best.weights.h5"
    if best_weights.exists():
        model.load_weights(best_weights)
    diagnosis = diagnose(history, ratios)
    metrics = {"best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"] if best["epoch"] else None,
               "train_accuracy": history.get("accuracy", [None])[-1] if history.get("accuracy") else None}
    if "test" in splits and splits["test"] and not interrupted:
        test_ds, _ = _eval_dataset([s.path for s in splits["test"]], [s.label for s in splits["test"]],
                                   num_classes, image_size, options.batch_size)
        metrics["test_accuracy"] = float(model.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"])
    index = _training_features(model, train, image_size, options.batch_size)
    run_path = _save_run(out, model, spec, options, dataset, splits, history, ratios, diagnosis, metrics,
                         sanity, interrupted, work, image_size, force or resume, index)
    skipped = dataset.skipped + train_stream.failures + val_stream.failures
    if not interrupted:
        shutil.rmtree(work, ignore_errors=True)
    return TrainResult(run_path, history, metrics, diagnosis, sanity, interrupted,
                       {k: len(v) for k, v in splits.items()}, skipped)


def _training_features(model, samples, image_size: int, batch_size: int):
    """Pooled features of the training images, for `cnnkit similar`."""
    import keras

    from cnnkit.data import ImageStream
    from cnnkit.features import inference_fn

    features_fn = inference_fn(keras.Model(model.input, model.get_layer("features").output))
    stream = ImageStream([s.path for s in samples], image_size)
    rows, kept = stream.map_batches(lambda images: np.asarray(features_fn(images), np.float32), batch_size)
    features = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    return features, [samples[i].label for i in kept], [samples[i].path for i in kept]


def _save_run(out, model, spec, options, dataset, splits, history, ratios, diagnosis, metrics, sanity,
              interrupted, work, image_size, replace, index) -> Path:
    import csv

    from cnnkit.runs import write_run
    from cnnkit.training.plots import plot_first_layer_filters, plot_history, plot_update_ratios

    def write_files(folder: Path) -> None:
        from cnnkit.similarity import write_index

        model.save(folder / "model.keras")
        write_index(folder, *index)
        keys = [k for k in history if k != "phase"]
        with (folder / "history.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["epoch", "phase", *keys])
            for i in range(len(history.get("loss", []))):
                writer.writerow([i + 1, history["phase"][i], *[history[k][i] for k in keys]])
        plots = folder / "plots"
        plots.mkdir()
        plot_history(history, diagnosis, plots)
        plot_update_ratios(ratios, plots)
        plot_first_layer_filters(model.get_layer("backbone"), plots / "first_layer_filters.png")
        (folder / "report.json").write_text(json.dumps(
            {"diagnosis": diagnosis, "update_ratios": ratios, "sanity": sanity, "metrics": metrics},
            indent=2))
        if interrupted:
            shutil.copytree(work / "checkpoints", folder / "checkpoints")

    manifest = {
        "strategy": options.mode,
        "backbone": spec.name,
        "weights": options.weights,
        "freeze": options.freeze if options.mode == "finetune" else "none",
        "image_size": image_size,
        "crop_pct": 1.0,
        "preprocessing": spec.preprocessing,
        "class_names": dataset.class_names,
        "options": asdict(options),
        "metrics": metrics,
        "interrupted": interrupted,
        "epochs_run": len(history.get("loss", [])),
        "data": {"source": str(Path(dataset.source).resolve()),
                 "counts": {k: len(v) for k, v in splits.items()}, "classes": dataset.summary().counts},
    }
    return write_run(out, manifest, write_files, force=replace)

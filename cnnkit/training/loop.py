"""The phase loop: each phase freezes what it must, compiles, and trains epoch by epoch with its callbacks.

Fine-tuning is two phases (the new head with the backbone frozen, then the
stages above ``--freeze`` at a tenth of the rate); training every layer is
one. Epochs are counted across phases, so a checkpoint's ``next_epoch`` says
where to continue whatever phase it falls in.

One loop serves one process and many: instead of ``model.fit`` (which fails
under ``MultiWorkerMirroredStrategy`` in Keras 3, keras-team/keras#20585)
each step is ``strategy.run`` of a ``GradientTape`` step, and the Keras
callbacks are driven through ``keras.callbacks.CallbackList`` at the same
points ``fit`` calls them (train begin/end, epoch begin/end), so
checkpoints, the rate policy, early stopping and the CSV history behave as
they did under ``fit``. On one CPU or GPU the strategy is the default one and
``strategy.run`` is a plain call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cnnkit.options import Mode, Optimizer, Schedule, TrainOptions


@dataclass(frozen=True)
class Phase:
    """One stretch of a run with the same frozen stages and optimizer.

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
    """Give ``model`` a fresh optimizer for its trainable variables (call it in the strategy's scope).

    ``compile`` wraps the optimizer in a loss-scaling one when the model was
    built under mixed precision; callbacks reach it as ``model.optimizer``.
    """
    model.compile(optimizer=make_optimizer(options, rate), jit_compile=False)
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


class Steps:
    """The training and evaluation steps of one phase, run on every replica of ``strategy``.

    A step's loss is the mean over the whole global batch: each replica
    divides its images' summed loss by the number of images in the step over
    all replicas, and the optimizer sums the replicas' gradients. The result
    is the same as one process taking the whole batch.

    Args:
        model: the compiled network (its optimizer built in ``strategy``'s scope).
        strategy: the ``tf.distribute`` strategy the model was built under.
        label_smoothing: of the categorical cross-entropy.
        evaluator: what ``evaluate`` classifies with, when not ``model`` itself:
            the network as its run will predict (``--flip``: averaged with the
            mirror image), so the validation accuracy is the run's.
    """

    def __init__(self, model, strategy, label_smoothing: float = 0.0, evaluator=None):
        import keras
        import tensorflow as tf

        self.model, self.strategy, self.evaluator = model, strategy, evaluator or model
        self.loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=None)
        self._train = tf.function(self._train_step)
        self._test = tf.function(self._test_step)

    def _sums(self, per_image, probabilities, labels):
        """Loss sum, correct answers and images of a replica's batch, summed over replicas."""
        import tensorflow as tf

        correct = tf.equal(tf.argmax(probabilities, -1), tf.argmax(labels, -1))
        return tf.stack([tf.reduce_sum(tf.cast(per_image, tf.float64)),
                         tf.reduce_sum(tf.cast(correct, tf.float64)),
                         tf.cast(tf.size(correct), tf.float64)])

    def _train_replica(self, images, labels):
        import tensorflow as tf

        model, optimizer = self.model, self.model.optimizer
        # Images in this step over all replicas: a short last batch, or files that
        # failed to decode, make it smaller than --batch-size.
        count = tf.distribute.get_replica_context().all_reduce("sum", tf.shape(labels, out_type=tf.int64)[0])
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_image = self.loss(labels, probabilities)
            loss = tf.nn.compute_average_loss(per_image, global_batch_size=tf.maximum(count, 1))
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)  # mixed precision: scaled up against underflow
        gradients = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(gradients, variables))  # all-reduces the gradients across replicas
        return self._sums(per_image, probabilities, labels)

    def _test_replica(self, images, labels):
        probabilities = self.evaluator(images, training=False)
        return self._sums(self.loss(labels, probabilities), probabilities, labels)

    def _train_step(self, iterator):
        images, labels = next(iterator)
        return self.strategy.reduce("sum", self.strategy.run(self._train_replica, args=(images, labels)), axis=None)

    def _test_step(self, iterator):
        images, labels = next(iterator)
        return self.strategy.reduce("sum", self.strategy.run(self._test_replica, args=(images, labels)), axis=None)

    def _epoch(self, step, dataset) -> dict[str, float]:
        import tensorflow as tf

        # The batch is taken inside the step, as Keras' fit does: across workers,
        # "is there a next batch" is agreed on in the same graph as the step.
        iterator, totals = iter(dataset), None
        while True:
            try:
                sums = step(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                break
            totals = sums if totals is None else totals + sums  # stays on the device: no wait per step
        loss, correct, count = totals.numpy() if totals is not None else (0.0, 0.0, 0.0)
        return {"loss": loss / count if count else float("nan"), "accuracy": correct / count if count else 0.0}

    def train_epoch(self, dataset) -> dict[str, float]:
        """One pass over a distributed dataset, updating the weights. Returns mean loss and accuracy."""
        return self._epoch(self._train, dataset)

    def evaluate(self, dataset) -> dict[str, float]:
        """Mean loss and accuracy over a distributed dataset, in inference mode."""
        return self._epoch(self._test, dataset)


@contextlib.contextmanager
def global_batch_norm(model, replicas: int):
    """Across several replicas, BatchNorm layers normalise by the statistics of the whole global batch.

    Keras' ``synchronized`` BatchNormalization all-reduces the batch moments,
    so N workers train exactly as one process with the same global batch
    (and a replica whose part of a short last batch is empty has no
    statistics of its own to break). The saved model keeps the default.
    """
    import keras

    def every_layer(parent):
        for layer in getattr(parent, "layers", []):
            yield layer
            yield from every_layer(layer)  # the backbone is a model inside the model

    layers = [layer for layer in every_layer(model)
              if isinstance(layer, keras.layers.BatchNormalization)] if replicas > 1 else []
    for layer in layers:
        layer.synchronized = True
    try:
        yield
    finally:
        for layer in layers:
            layer.synchronized = False


@dataclass
class LoopContext:
    """What the phases share: the network, its data and where checkpoints go."""

    model: object
    spec: object
    options: TrainOptions
    device: object  # DeviceSetup
    train_ds: object  # distributed datasets (see datasets.py), iterated once per epoch
    val_ds: object
    epoch_var: object
    train_images: int
    work: Path
    sanity: dict | None = None
    ratios: object = None  # the run-wide UpdateRatioMonitor, set by run_phases
    best: object = None  # the run-wide BestWeights, set by run_phases
    steps: Steps | None = None  # the last phase's steps, for evaluating the trained network
    deadline: float | None = None  # time.monotonic() by which training must end (--time-limit)


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
    from cnnkit.training.callbacks import TimeLimit
    from cnnkit.training.callbacks import restore_optimizer
    from cnnkit.training.monitor import UpdateRatioMonitor
    from cnnkit.kinds.network import inference_network
    from cnnkit.training.network import backbone_of, freeze_through, probabilities_of, stage_groups
    from cnnkit.training.schedule import LearningRatePolicy

    say = say or (lambda message: None)
    options, model, strategy = ctx.options, ctx.model, ctx.device.strategy
    evaluator = None
    if options.flip:  # validated as the run will predict
        with strategy.scope():
            evaluator = probabilities_of(inference_network(model, flip=True))
    checkpoints = ctx.work / "checkpoints"
    history = ctx.work / "history.csv"
    steps = max(1, -(-ctx.train_images // options.batch_size))
    ratios = ctx.ratios = UpdateRatioMonitor(stage_groups(ctx.spec, backbone_of(model)), steps)
    best = ctx.best = BestWeights(checkpoints / "best.weights.h5")
    start = 0
    if resume is not None:
        start = resume.next_epoch
        _restore(ratios, resume.callbacks, "update_ratios")
        _restore(best, resume.callbacks, "best")
        truncate_history(history, start)

    first = 0
    for phase in plan_phases(options):
        last = first + phase.epochs
        if start >= last:
            first = last
            continue
        freeze_through(ctx.spec, model, phase.freeze,
                       str(options.batchnorm) if options.mode == Mode.finetune else "train")
        with strategy.scope():
            compile_model(model, options, phase.rate)
        policy = LearningRatePolicy(phase.rate, phase.schedule, phase.epochs, phase.warmup,
                                    patience=options.plateau_patience, first_epoch=first)
        if resume is not None:
            # The weights of the last finished epoch; mid-phase also the optimizer and the rate.
            model.load_weights(resume.weights)
            if resume.phase == phase.name and start > first:
                restore_optimizer(model, resume.optimizer)
                _restore(policy, resume.callbacks, "policy")
            resume = None
        say(f"phase {phase.name}: {'backbone frozen' if phase.freeze == 'all' else 'frozen through ' + phase.freeze}, "
            f"lr {phase.rate:g}, epochs {max(start, first) + 1}-{last}")
        # Order matters: statistics first, the CSV row before the checkpoint (a
        # resume drops an extra row), the report after it (a reported epoch is saved).
        callbacks = [
            EpochSeeding(ctx.epoch_var, options.seed),
            EpochStats(phase.name, ctx.train_images),
            policy,
            *([TimeLimit(ctx.deadline, policy, first, phase.epochs, ctx.device.chief_value, say)]
              if ctx.deadline is not None else []),
            ratios,
            best,
            keras.callbacks.CSVLogger(str(history), append=True),
            EpochCheckpoint(checkpoints, options, phase.name, {"policy": policy, "best": best, "update_ratios": ratios},
                            extra={"sanity": ctx.sanity}),
            EpochReporter(report or (lambda row: None)),
            keras.callbacks.EarlyStopping("val_accuracy", patience=options.patience, mode="max"),
        ]
        if options.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(ctx.work / "tensorboard"), write_graph=False))
        ctx.steps = Steps(model, strategy, options.label_smoothing, evaluator)
        fit_phase(ctx.steps, ctx.train_ds, ctx.val_ds, callbacks, max(start, first), last, ctx.device.replicas)
        # Early stopping ends the head phase (the head has converged), or the whole run.
        if model.stop_training and phase.name != "head":
            break
        first = last
        start = max(start, last)


def _restore(callback, states: dict, name: str) -> None:
    """Put a checkpointed callback state back; a damaged or edited one is a one-line error.

    The states come from the checkpoint's state.json (plain JSON: no code runs); the
    restore methods only convert its values with float/int, so a wrong type or a
    missing key is caught here instead of becoming a traceback mid-training.
    """
    from cnnkit.errors import CnnkitError

    try:
        callback.restore(states[name])
    except (KeyError, TypeError, ValueError) as error:
        raise CnnkitError(f"--resume: damaged checkpoint ({name} state: {error!r}); start a new run") from None


def fit_phase(steps: Steps, train_ds, val_ds, callbacks: list, first: int, last: int, replicas: int = 1) -> None:
    """Epochs ``first`` to ``last - 1`` with ``callbacks`` called where ``model.fit`` calls them.

    Stops early when a callback sets ``model.stop_training``.
    """
    import keras

    model = steps.model
    callback_list = keras.callbacks.CallbackList(callbacks, model=model, epochs=last, verbose=0)
    model.stop_training = False
    with global_batch_norm(model, replicas):
        callback_list.on_train_begin()
        try:
            for epoch in range(first, last):
                callback_list.on_epoch_begin(epoch)
                logs = steps.train_epoch(train_ds)
                logs.update({f"val_{key}": value for key, value in steps.evaluate(val_ds).items()})
                callback_list.on_epoch_end(epoch, logs)
                if model.stop_training:
                    break
        finally:
            callback_list.on_train_end()

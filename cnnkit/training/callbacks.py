"""Keras callbacks with one job each: repeatable epochs, epoch statistics, best weights, checkpoints.

With the learning-rate policy (``schedule.py``), the update-ratio monitor
(``monitor.py``) and Keras' own ``CSVLogger`` and ``EarlyStopping`` they make
a training run that can be stopped at any moment and resumed exactly. A
callback whose state must survive a restart has ``state()`` and
``restore(state)``; ``EpochCheckpoint`` saves those states with the weights.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np

from cnnkit.paths import atomic_write

CHECKPOINT_FORMAT = 3


def seed_generators(model):
    """Every ``keras.random.SeedGenerator`` of the model's layers, nested models included.

    Keras has no public accessor for them, nor for the sub-layers of a layer (``RandomColorJitter``
    holds one per jitter): this is the one place that reads its private ``_flatten_layers`` and
    ``_seed_generators``, and tests/test_training.py fails loudly if a Keras release moves either.
    """
    for layer in model._flatten_layers(include_self=False, recursive=True):
        yield from getattr(layer, "_seed_generators", [])


class EpochSeeding(keras.callbacks.Callback):
    """Makes an epoch's randomness a function of (seed, epoch) alone.

    At each epoch start it sets the variable the data pipeline shuffles by and
    re-seeds every random layer (dropout, augmentation), so a resumed run sees
    exactly the data order and random draws of an uninterrupted one.
    """

    def __init__(self, epoch_var, seed: int):
        super().__init__()
        self.epoch_var, self.seed = epoch_var, seed

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_var.assign(epoch)
        for i, generator in enumerate(seed_generators(self.model)):
            generator.state.assign(np.array([self.seed * 1000 + i, epoch], dtype="int64"))


class EpochStats(keras.callbacks.Callback):
    """Adds the phase, the epoch's seconds and its training images/s to the epoch's logs."""

    def __init__(self, phase: str, images_per_epoch: int):
        super().__init__()
        self.phase, self.images_per_epoch = phase, images_per_epoch
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        if logs is not None:
            logs["seconds"] = seconds
            logs["images_per_s"] = self.images_per_epoch / seconds if seconds else 0.0
            logs["phase"] = self.phase


class BestWeights(keras.callbacks.Callback):
    """Saves the weights whenever the monitored value beats its best so far (written atomically)."""

    def __init__(self, path: Path, monitor: str = "val_accuracy"):
        super().__init__()
        self.path, self.monitor = Path(path), monitor
        self.best, self.best_epoch = -math.inf, 0

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            atomic_write(self.path, self.model.save_weights)

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def restore(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: the weights, the optimizer's variables and every stateful callback's state.

    Each epoch goes into a new folder that ``state.json`` points at only once
    it is complete (``state.json`` itself is replaced atomically), so Ctrl-C or
    SIGKILL at any moment leaves the previous checkpoint intact.
    """

    def __init__(self, folder: Path, options, phase: str, stateful: dict, extra: dict | None = None):
        super().__init__()
        self.folder, self.options, self.phase = Path(folder), options, phase
        self.stateful, self.extra = stateful, extra or {}

    def on_epoch_end(self, epoch, logs=None):
        name = f"epoch-{epoch + 1:04d}"
        target = self.folder / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        self.model.save_weights(target / "model.weights.h5")
        np.savez(target / "optimizer.npz",
                 **{f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(self.model.optimizer.variables)})
        state = {"format": CHECKPOINT_FORMAT, "options": asdict(self.options), "phase": self.phase,
                 "next_epoch": epoch + 1, "checkpoint": name,
                 "callbacks": {key: callback.state() for key, callback in self.stateful.items()}, **self.extra}
        atomic_write(self.folder / "state.json", json.dumps(state, default=str))
        for old in self.folder.glob("epoch-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


class TimeLimit(keras.callbacks.Callback):
    """Ends a phase by a deadline: after each epoch its epochs become what the time left allows.

    An epoch's time is the mean of the phase's epochs after its first (the first
    also builds the graph), or the first alone. The learning-rate policy's span
    is cut with the epochs, so a cosine decay still reaches zero at the end.
    ``share`` gives every worker of a multi-worker run the chief's count, so
    they stop at the same epoch.
    """

    def __init__(self, deadline: float, policy, first_epoch: int, epochs: int,
                 share: Callable[[int], int] = lambda value: value, say: Callable[[str], None] = lambda m: None):
        super().__init__()
        self.deadline, self.policy, self.first, self.cap = deadline, policy, first_epoch, epochs
        self.share, self.say = share, say
        self.started = 0.0
        self.durations: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        self.durations.append(now - self.started)
        done = epoch + 1 - self.first
        typical = float(np.mean(self.durations[1:] or self.durations))
        fits = self.share(int(min(self.cap, done + max(self.deadline - now, 0.0) // max(typical, 1e-3))))
        if fits != self.policy.epochs:
            self.say(f"time limit: {fits} epochs of this phase fit ({typical:.0f} s each)")
        self.policy.epochs = max(fits, done)
        if fits <= done:
            self.model.stop_training = True


class EpochReporter(keras.callbacks.Callback):
    """Passes each finished epoch's numbers to ``report`` (a table row in the CLI)."""

    def __init__(self, report: Callable[[dict], None]):
        super().__init__()
        self.report = report

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.report({"epoch": epoch + 1, "phase": logs.get("phase"),
                     **{k: float(v) for k, v in logs.items() if k != "phase"}})


def restore_optimizer(model, path: Path) -> None:
    """Put saved optimizer variables (momentum, step count) back into a compiled model."""
    from cnnkit.errors import CnnkitError

    with np.load(path, allow_pickle=False) as saved:
        values = [saved[f"v{i}"] for i in range(len(saved.files))]
    variables = model.optimizer.variables
    if len(values) != len(variables):
        raise CnnkitError("the checkpoint's optimizer state does not fit the model; start a new run")
    for variable, value in zip(variables, values):
        variable.assign(value)

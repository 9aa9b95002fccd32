"""Per-epoch bookkeeping that makes training resumable and repeatable."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np

CHECKPOINT_FORMAT = 2


def _seed_generators(model):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        yield from getattr(layer, "_seed_generators", [])


class EpochSync(keras.callbacks.Callback):
    """Makes an epoch's randomness a function of (seed, epoch) alone.

    At each epoch start it sets the data-order variable, re-seeds every random
    layer (dropout, augmentation), and lets the learning-rate policy set the
    rate for the phase's own epoch count. A resumed run therefore sees exactly
    the data order and random draws an uninterrupted run would have.
    """

    def __init__(self, epoch_var, policy, offset: int, seed: int, images_per_epoch: int):
        super().__init__()
        self.epoch_var, self.policy, self.offset, self.seed = epoch_var, policy, offset, seed
        self.images_per_epoch = images_per_epoch
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self.epoch_var.assign(epoch)
        for i, generator in enumerate(_seed_generators(self.model)):
            generator.state.assign(np.array([self.seed * 1000 + i, epoch], dtype="int64"))
        self.policy.set_model(self.model)
        self.policy.on_epoch_begin(epoch - self.offset, logs)

    def on_epoch_end(self, epoch, logs=None):
        # This callback runs first, so every later one (and history.csv) sees these.
        seconds = time.perf_counter() - self._start
        if logs is not None:
            logs["seconds"] = seconds
            logs["images_per_s"] = self.images_per_epoch / seconds if seconds else 0.0
        self.policy.on_epoch_end(epoch - self.offset, logs)


class Checkpointer(keras.callbacks.Callback):
    """After each epoch: last weights, optimizer state, policy and history; best weights on a new best."""

    def __init__(self, folder: Path, options, phase: str, policy, record: dict, ratio_monitor):
        super().__init__()
        self.folder, self.options, self.phase, self.policy = folder, options, phase, policy
        self.record, self.ratio_monitor = record, ratio_monitor

    def on_epoch_end(self, epoch, logs=None):
        record = self.record
        for key, value in (logs or {}).items():
            record["history"].setdefault(key, []).append(float(value))
        record["history"].setdefault("phase", []).append(self.phase)
        if self.ratio_monitor.history:
            record["update_ratios"].append(self.ratio_monitor.history[-1])
        if (logs or {}).get("val_accuracy", -1.0) > record["best"]["val_accuracy"]:
            record["best"] = {"val_accuracy": float(logs["val_accuracy"]), "epoch": epoch + 1}
            tmp = self.folder / "best.tmp.weights.h5"
            self.model.save_weights(tmp)
            os.replace(tmp, self.folder / "best.weights.h5")
        # Each epoch's checkpoint goes into a new folder that state.json points at
        # only once it is complete, so Ctrl-C at any moment leaves a consistent one.
        name = f"epoch-{epoch + 1:04d}"
        target = self.folder / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        self.model.save_weights(target / "model.weights.h5")
        np.savez(target / "optimizer.npz",
                 **{f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(self.model.optimizer.variables)})
        state = {"format": CHECKPOINT_FORMAT, "options": asdict(self.options), "phase": self.phase,
                 "next_epoch": epoch + 1, "checkpoint": name, "policy": self.policy.state(), **record}
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.folder / "state.json")
        for old in self.folder.glob("epoch-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


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

"""Learning-rate policy: warm-up, a decay schedule, and /10 when validation stalls.

Keras' ReduceLROnPlateau and LearningRateScheduler each set the rate on their
own and overwrite each other, so one callback does both: the rate of epoch
``e`` is ``base * warmup(e) * schedule(e) * plateau``, where ``plateau`` drops
tenfold whenever validation accuracy has not improved for ``patience`` epochs.
Its state (the plateau factor, the best score) is saved with checkpoints so a
resumed run continues with the same rate.
"""

from __future__ import annotations

import math

import keras

from cnnkit.options import Schedule


def schedule_factor(name: Schedule | str, epoch: int, epochs: int, warmup: int = 0) -> float:
    """Multiplier of the base rate at ``epoch`` (0-based) of ``epochs``.

    step: /10 at 1/2 and 3/4 of the run; exp: 0.97 per epoch (the notes'
    ``lr *= 0.97``); inv: the 1/t decay ``1 / (1 + 0.5 t)``;
    cosine: half a cosine from 1 to 0 after warm-up.
    """
    name = Schedule.parse(name, "--schedule")
    if warmup and epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    t = epoch - warmup
    span = max(epochs - warmup, 1)
    if name == "step":
        return 0.1 ** sum(t >= span * f for f in (0.5, 0.75))
    if name == "exp":
        return 0.97 ** t
    if name == "inv":
        return 1.0 / (1.0 + 0.5 * t)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / span))
    return 1.0


class LearningRatePolicy(keras.callbacks.Callback):
    """Sets the optimizer's rate at each epoch start; divides it by 10 on a plateau.

    Args:
        first_epoch: the (absolute) epoch its phase starts at; the schedule
            counts from there.
    """

    def __init__(self, base_rate: float, schedule: Schedule | str, epochs: int, warmup: int = 0,
                 patience: int = 3, monitor: str = "val_accuracy", min_delta: float = 1e-4,
                 first_epoch: int = 0):
        super().__init__()
        self.base_rate = base_rate
        self.schedule = Schedule.parse(schedule, "--schedule")
        self.first_epoch = first_epoch
        self.epochs = epochs
        self.warmup = warmup
        self.patience = patience
        self.monitor = monitor
        self.min_delta = min_delta
        self.plateau = 1.0
        self.best = -math.inf
        self.wait = 0

    def rate(self, epoch: int) -> float:
        return self.base_rate * schedule_factor(self.schedule, epoch, self.epochs, self.warmup) * self.plateau

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate.assign(self.rate(epoch - self.first_epoch))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs["learning_rate"] = float(self.model.optimizer.learning_rate.numpy())
        value = logs.get(self.monitor)
        if value is None or self.patience <= 0:
            return
        if value > self.best + self.min_delta:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.plateau /= 10.0
                self.wait = 0

    def state(self) -> dict:
        return {"plateau": self.plateau, "best": self.best, "wait": self.wait, "epochs": self.epochs}

    def restore(self, state: dict) -> None:
        self.plateau, self.best, self.wait = state["plateau"], state["best"], state["wait"]
        self.epochs = int(state.get("epochs", self.epochs))  # a --time-limit run's shortened schedule

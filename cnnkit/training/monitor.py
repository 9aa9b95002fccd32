"""Watching training as the notes ask: per-epoch numbers, update/weight ratios, a diagnosis."""

from __future__ import annotations

import keras
import numpy as np

TARGET_UPDATE_RATIO = 1e-3


class UpdateRatioMonitor(keras.callbacks.Callback):
    """Mean per-step ||update|| / ||weights|| of each stage's trainable weights, per epoch.

    The notes' rule of thumb: about 1e-3. Much higher and the rate is too
    high (weights churn); much lower and the stage barely learns.
    """

    def __init__(self, groups: dict[str, list], steps_per_epoch: int):
        super().__init__()
        self.groups = groups
        self.steps = max(steps_per_epoch, 1)
        self.history: list[dict[str, float]] = []
        self._before: dict[str, list[np.ndarray]] = {}

    def _trainable(self):
        for stage, layers in self.groups.items():
            variables = [v for layer in layers if layer.trainable for v in layer.trainable_weights]
            if variables:
                yield stage, variables

    def on_epoch_begin(self, epoch, logs=None):
        self._before = {stage: [np.array(v.numpy()) for v in variables] for stage, variables in self._trainable()}

    def on_epoch_end(self, epoch, logs=None):
        ratios = {}
        for stage, variables in self._trainable():
            before = self._before.get(stage)
            if before is None:
                continue
            delta = np.sqrt(sum(float(np.sum((v.numpy() - b) ** 2)) for v, b in zip(variables, before)))
            norm = np.sqrt(sum(float(np.sum(b ** 2)) for b in before))
            ratios[stage] = delta / norm / self.steps if norm else 0.0
        self.history.append(ratios)

    def state(self) -> list[dict[str, float]]:
        return self.history

    def restore(self, state: list[dict[str, float]]) -> None:
        self.history = list(state)


def diagnose(history: dict[str, list], update_ratios: list[dict[str, float]] | None = None,
             mode: str = "finetune") -> list[str]:
    """Plain-words reading of the curves, as in the notes, for a ``finetune`` or a ``train`` run."""
    notes = []
    train, val = history.get("accuracy", []), history.get("val_accuracy", [])
    if train and val:
        best = int(np.argmax(val))
        gap = train[best] - val[best]
        if train[best] < 0.6 and len(train) >= 2 and train[-1] > train[0]:
            notes.append(f"train accuracy is still low ({train[best]:.3f}) and rising: train longer (--epochs)")
        elif gap > 0.08:
            notes.append(f"big gap: train accuracy {train[best]:.3f} vs validation {val[best]:.3f} -- "
                         "overfitting; add regularization (--dropout, --weight-decay, --augment strong) or data")
        elif gap < 0.02:
            remedy = ("unfreeze more stages (--freeze), train longer or use a bigger backbone" if mode == "finetune"
                      else "train longer, use a bigger --backbone or less regularization (--dropout, --weight-decay)")
            notes.append(f"no gap: train {train[best]:.3f}, validation {val[best]:.3f} -- the model may be "
                         f"too small or too constrained; {remedy}")
        else:
            notes.append(f"healthy gap: train {train[best]:.3f}, validation {val[best]:.3f}")
    loss = history.get("loss", [])
    if len(loss) >= 2 and loss[-1] > loss[0]:
        notes.append("training loss went up: the learning rate is probably too high (--lr)")
    if update_ratios:
        last = update_ratios[-1]
        high = [s for s, r in last.items() if r > 10 * TARGET_UPDATE_RATIO]
        low = [s for s, r in last.items() if 0 < r < TARGET_UPDATE_RATIO / 100]
        if high:
            notes.append(f"update/weight ratio above 1e-2 in {', '.join(high)}: lower --lr")
        if low:
            notes.append(f"update/weight ratio below 1e-5 in {', '.join(low)}: these stages barely learn; "
                         + ("raise --lr or freeze them" if mode == "finetune" else "raise --lr"))
    return notes

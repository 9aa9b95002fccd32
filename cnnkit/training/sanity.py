"""The notes' first debugging step: overfit a tiny subset before a long run; the loss must fall near zero."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def sanity_check(model_factory: Callable, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 max_steps: int = 150, target: float = 0.05) -> dict:
    """Train a fresh copy of the network on ``images`` alone and report whether the loss fell below ``target``.

    The copy has no augmentation or dropout and trains with Adam for up to
    ``max_steps`` steps.
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

"""Training plots written into the run: loss, accuracy, update ratios, first-layer filters."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: dict[str, list[float]], diagnosis: list[str], folder: Path) -> None:
    """loss.png (train/val loss per epoch) and accuracy.png (with the diagnosis as caption)."""
    plt = _pyplot()
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for name, keys in (("loss", ("loss", "val_loss")), ("accuracy", ("accuracy", "val_accuracy"))):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            if history.get(key):
                ax.plot(epochs[: len(history[key])], history[key], marker="o", label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
        if name == "accuracy" and diagnosis:
            fig.text(0.01, 0.01, "\n".join(diagnosis[:2]), fontsize=7, wrap=True)
            fig.subplots_adjust(bottom=0.25)
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)


def plot_update_ratios(ratios: list[dict[str, float]], folder: Path) -> None:
    """update_ratio.png: per-stage ||dW||/||W|| per step, log scale, with the 1e-3 target."""
    if not ratios or not any(ratios):
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    stages = sorted({s for r in ratios for s in r})
    for stage in stages:
        values = [r.get(stage, np.nan) for r in ratios]
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=stage)
    ax.axhline(1e-3, color="gray", linestyle="--", label="target 1e-3")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("update / weight (per step)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(folder / "update_ratio.png", dpi=100)
    plt.close(fig)


def plot_first_layer_filters(backbone, path: Path) -> bool:
    """A grid of the first convolution's filters as RGB images (noisy = too little regularization)."""
    kernel = next((w.numpy() for layer in backbone.layers for w in layer.weights
                   if len(w.shape) == 4 and w.shape[2] == 3), None)
    if kernel is None:
        return False
    plt = _pyplot()
    count = kernel.shape[3]
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.8, rows * 0.8))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < count:
            f = kernel[:, :, :, i]
            f = (f - f.min()) / (f.max() - f.min() + 1e-12)
            ax.imshow(f, interpolation="nearest")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

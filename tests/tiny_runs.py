"""Small real runs of every kind, made on the fly for the explain, TTA, ensemble and report tests."""

from __future__ import annotations

from pathlib import Path

from cnnkit.extraction import ExtractOptions, run_extract
from cnnkit.options import preset
from cnnkit.training import run_training
from conftest import make_class_tree, write_bad_files

TINY = dict(backbone="tiny_cnn", weights="none", image_size=32)
CLASSES = {"red": 8, "green": 8, "blue": 8}


def make_data(root: Path, bad_files: bool = False) -> Path:
    """train/ and test/ class folders of coloured noise (classes told apart by colour)."""
    make_class_tree(root / "train", CLASSES, size=32)
    make_class_tree(root / "test", {name: 3 for name in CLASSES}, size=32)
    if bad_files:
        write_bad_files(root / "train" / "red")
    return root


def extract_run(data: Path, out: Path, head: str = "logreg", **options) -> Path:
    settings = dict(TINY, layers="conv3,top", head=head, cv=3)
    settings.update(options)
    return run_extract(data, ExtractOptions(**settings), out).run_path


def train_run(data: Path, out: Path, **options) -> Path:
    settings = dict(TINY, epochs=2, batch_size=8, lr=0.05, val_split=0.25, deterministic=True)
    settings.update(options)
    return run_training(data, preset("train", **settings), out).run_path


def finetune_run(data: Path, out: Path) -> Path:
    """Fine-tuning the real EfficientNet-Lite0 weights above conv4 at 32 px: one head epoch, one more."""
    options = preset("finetune", image_size=32, epochs=1, head_epochs=1, batch_size=8, val_split=0.25,
                     deterministic=True)
    return run_training(data, options, out).run_path

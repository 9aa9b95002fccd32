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


_SHARED: dict = {}


def shared_runs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """One data set and one run of each tiny kind per test session, for tests that only read them.

    Returns (data, {"extract", "knn", "train", "ensemble"} -> run folder); the data has unreadable
    files in train/red. Tests that change a run copy it first.
    """
    if not _SHARED:
        from cnnkit.ensemble import make_ensemble

        root = tmp_path_factory.mktemp("shared-runs")
        data = make_data(root / "data", bad_files=True)
        feat, net = extract_run(data, root / "feat"), train_run(data, root / "net")
        _SHARED.update(data=data, runs={"extract": feat, "knn": extract_run(data, root / "knn", head="knn"),
                                        "train": net, "ensemble": make_ensemble([feat, net], root / "ens", data=data)})
    return _SHARED["data"], _SHARED["runs"]

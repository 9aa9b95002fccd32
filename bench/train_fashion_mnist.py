"""Benchmarks for `finetune` and `train` on Fashion-MNIST (wall time on this machine).

finetune: N images per class, `--freeze conv4`, against extract's best linear
head (conv4+top, logistic regression) on the same train/test folders, in the
same run. train: the compact small_resnet from scratch on the full 60k
training images, tested on the official 10k test images.

    python bench/train_fashion_mnist.py finetune --per-class 100 --epochs 5 --out /tmp/fm-ft
    python bench/train_fashion_mnist.py train --epochs 10 --out /tmp/fm-train

Needs: apt-get install dataset-fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import write_image_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("finetune", "train"))
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--test", type=int, default=2000, help="test images (finetune mode)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-train-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CNNKIT_HOME", str(args.out / "cache"))
    from cnnkit.extraction import ExtractOptions, run_extract
    from cnnkit.training import TrainOptions, run_training

    data = args.out / "data"
    if not data.exists():
        if args.mode == "finetune":
            write_image_folder(data / "train", "train", args.per_class, seed=1)
            write_image_folder(data / "test", "test", args.test // 10, seed=0)
        else:
            write_image_folder(data / "train", "train", 6000, seed=0)
            write_image_folder(data / "test", "test", 1000, seed=0)

    def show(row):
        print(f"  {row['phase']:>8} epoch {row['epoch']:>2}  loss {row['loss']:.4f}  acc {row['accuracy']:.3f}  "
              f"val_acc {row['val_accuracy']:.3f}  {row['seconds']:.0f}s  {row['images_per_s']:.0f} img/s", flush=True)

    results = {}
    if args.mode == "finetune":
        started = time.perf_counter()
        baseline = run_extract(data, ExtractOptions(layers="conv4,top", head="logreg", val_split=0.2,
                                                    image_size=args.image_size))
        results["extract_conv4_top_logreg"] = {"test_accuracy": baseline.metrics["test_accuracy"],
                                               "seconds": time.perf_counter() - started}
        print(f"extract conv4+top logreg: test {baseline.metrics['test_accuracy']:.3f}", flush=True)
        options = TrainOptions(mode="finetune", freeze="conv4", epochs=args.epochs, image_size=args.image_size)
    else:
        options = TrainOptions(mode="train", backbone="small_resnet", weights="none", image_size=args.image_size or 28,
                               epochs=args.epochs, head_epochs=0, batch_size=128, lr=0.1, schedule="cosine",
                               warmup=1, weight_decay=5e-4, val_split=0.1, patience=8, plateau_patience=3)
    started = time.perf_counter()
    result = run_training(data, options, args.out / f"run-{time.time_ns()}", report=show)
    seconds = time.perf_counter() - started
    results[args.mode] = {"test_accuracy": result.metrics.get("test_accuracy"), "seconds": seconds,
                          "epochs": len(result.history["loss"]), "options": vars(options) if hasattr(options, "__dict__") else None}
    print(f"{args.mode}: test {result.metrics.get('test_accuracy'):.3f} in {seconds / 60:.1f} min "
          f"({len(result.history['loss'])} epochs)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

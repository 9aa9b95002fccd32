"""Benchmark: pretrained-feature heads on Fashion-MNIST against a raw-pixel SVC.

For each training size (images per class), writes a train/ + test/ folder
(test: ``--test`` images drawn evenly from the official test split), then fits
every (stage, head) pair with ``run_extract`` -- features come from one
forward pass and the cache after that -- and an RBF SVC on the raw 28x28
pixels of the same images, in the same run. Also times a first extract (cold
cache) against a second one with another head (warm cache).

    python bench/extract_fashion_mnist.py --sizes 10,100 --test 2000 --out /tmp/fm-bench

Needs: apt-get install dataset-fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import load_idx, write_image_folder  # noqa: E402


def raw_pixel_svc(train_dir: Path, test_dir: Path) -> float:
    """RBF SVC on raw pixels (C by 3-fold CV), trained and tested on the same files."""
    from PIL import Image
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    def load(folder: Path):
        classes = sorted(p.name for p in folder.iterdir())
        xs, ys = [], []
        for label, name in enumerate(classes):
            for path in sorted((folder / name).glob("*.png")):
                xs.append(np.asarray(Image.open(path), dtype=np.float32).ravel() / 255.0)
                ys.append(label)
        return np.stack(xs), np.array(ys)

    x_train, y_train = load(train_dir)
    x_test, y_test = load(test_dir)
    folds = min(3, int(np.bincount(y_train).min()))
    search = GridSearchCV(SVC(kernel="rbf", gamma="scale"), {"C": [1, 10, 100]}, cv=folds)
    search.fit(x_train, y_train)
    return float(np.mean(search.predict(x_test) == y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100", help="training images per class, comma-separated")
    parser.add_argument("--test", type=int, default=2000, help="test images in all")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--layers", default="conv2,conv3,conv4,top,conv4+top")
    parser.add_argument("--heads", default="logreg,linear-svm,svm,knn")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-fm-bench"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CNNKIT_HOME", str(args.out / "cache"))
    from cnnkit.extraction import ExtractOptions, run_extract

    load_idx("test")  # fail early with the install hint if the data is missing
    test_dir = args.out / "test"
    if not test_dir.exists():
        write_image_folder(test_dir, "test", args.test // 10, seed=0)

    results = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
               "backbone": args.backbone, "test_images": args.test, "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        root = args.out / f"n{size}"
        train_dir = root / "train"
        if not train_dir.exists():
            write_image_folder(train_dir, "train", size, seed=1)
        if not (root / "test").exists():
            (root / "test").symlink_to(test_dir.resolve())

        started = time.perf_counter()
        baseline = raw_pixel_svc(train_dir, test_dir)
        row = {"raw_pixel_svc": baseline, "raw_pixel_seconds": time.perf_counter() - started, "runs": []}
        print(f"n={size}/class  raw-pixel SVC: {baseline:.3f}", flush=True)

        for layer in args.layers.split(","):
            for head in args.heads.split(","):
                if head in ("svm", "linear-svm") and size < 3:
                    continue
                options = ExtractOptions(backbone=args.backbone, layers=layer.replace("+", ","), head=head,
                                         image_size=args.image_size, val_split=0.0)
                started = time.perf_counter()
                result = run_extract(root, options)
                seconds = time.perf_counter() - started
                run = {"layer": layer, "head": head, "test_accuracy": result.metrics["test_accuracy"],
                       "cv_accuracy": result.metrics["cv_accuracy"], "best_params": result.fitted.best_params,
                       "forward_images": result.computed, "seconds": seconds}
                row["runs"].append(run)
                print(f"  {layer:10s} {head:10s} test {run['test_accuracy']:.3f}  cv "
                      f"{run['cv_accuracy'] if run['cv_accuracy'] is None else round(run['cv_accuracy'], 3)}"
                      f"  {seconds:6.1f}s  forward {result.computed}", flush=True)
        results["sizes"][size] = row

    # Cold versus warm cache: the same data, a fresh cache, then another head.
    size = int(args.sizes.split(",")[-1])
    os.environ["CNNKIT_HOME"] = str(args.out / f"cache-cold-{time.time_ns()}")
    timings = {}
    for label, head in (("first", "logreg"), ("second", "knn")):
        started = time.perf_counter()
        run_extract(args.out / f"n{size}", ExtractOptions(backbone=args.backbone, layers="conv4", head=head,
                                                          image_size=args.image_size, val_split=0.0))
        timings[label] = time.perf_counter() - started
    results["cache"] = {**timings, "speedup": timings["first"] / timings["second"], "size": size}
    print(f"cache: first extract {timings['first']:.1f}s, second (other head) {timings['second']:.1f}s, "
          f"speed-up {timings['first'] / timings['second']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

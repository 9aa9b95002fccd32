"""Benchmark: the head search against the features it searches on (issue 11, item 2).

On ``--images`` Fashion-MNIST training images (EfficientNet-Lite0 at 224 px,
pooled top layer: 1,280 dimensions), measures in one run and one process:

1. the feature stage of `extract` with a cold cache (decode + forward pass);
2. ``fit_head`` with ``--pca auto`` for each head (the search `extract --head`
   runs: PCA size x parameter by 5-fold CV, then the final fit);
3. the same search as cnnkit 0.1 ran it (``GridSearchCV`` over a pipeline that
   refits scaling and PCA for every size x parameter x fold), as the baseline;

and prints each head's time as a ratio of the feature time and of the
baseline. It also times the new search on half the images and on half the
dimensions, to show how the cost grows.

    python bench/head_search.py --images 2000 --out /tmp/head-bench

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
from fashion_mnist import write_image_folder  # noqa: E402


def grid_search_01(features: np.ndarray, labels: np.ndarray, head: str, seed: int = 0) -> float:
    """cnnkit 0.1's search: GridSearchCV refitting scaler + PCA for every candidate; returns its CV accuracy."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from cnnkit.heads import _classifier

    folds = 5
    classifier, param, values = _classifier(head, seed, 3)
    max_components = min(features.shape[1], int(len(labels) * (folds - 1) / folds))
    grid = {f"clf__{param}": values,
            "pca__n_components": sorted({n for n in (32, 128) if n < max_components} | {max_components}) + [None]}
    pipeline = Pipeline([("scale", StandardScaler()), ("pca", PCA(random_state=seed)), ("clf", classifier)])
    search = GridSearchCV(pipeline, grid, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                          scoring="accuracy", refit=True)
    search.fit(features, labels)
    return float(search.best_score_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="training images in all (10 classes)")
    parser.add_argument("--heads", default="knn,logreg")
    parser.add_argument("--no-baseline", action="store_true", help="skip cnnkit 0.1's grid search")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-head-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["CNNKIT_HOME"] = str(args.out / f"cache-{time.time_ns()}")  # cold: every image goes through
    from cnnkit.data import load_dataset
    from cnnkit.features import FeatureConfig, compute_features
    from cnnkit.heads import fit_head

    data = args.out / f"train{args.images}"
    if not data.exists():
        write_image_folder(data, "train", args.images // 10, seed=0)
    samples = load_dataset(data).splits["train"]
    labels = np.array([s.label for s in samples])

    started = time.perf_counter()
    table = compute_features([s.path for s in samples], FeatureConfig("efficientnet_lite0"))
    feature_seconds = time.perf_counter() - started
    features = table.features["conv5"]
    print(f"features: {len(samples)} images -> {features.shape}, {feature_seconds:.1f}s "
          f"({len(samples) / feature_seconds:.1f} images/s)", flush=True)

    results = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
               "load_average": os.getloadavg(), "images": len(samples), "dims": features.shape[1],
               "feature_seconds": feature_seconds, "heads": {}}
    half_rows = np.concatenate([np.flatnonzero(labels == c)[: len(samples) // 20] for c in range(10)])
    for head in args.heads.split(","):
        row = {}
        for name, x, y in (("all", features, labels), ("half images", features[half_rows], labels[half_rows]),
                           ("half dims", features[:, ::2], labels)):
            started = time.perf_counter()
            fitted = fit_head(x, y, head, pca="auto")
            row[name] = {"seconds": time.perf_counter() - started, "cv_accuracy": fitted.cv_accuracy,
                         "best_params": fitted.best_params}
        if not args.no_baseline:
            started = time.perf_counter()
            accuracy = grid_search_01(features, labels, head)
            row["cnnkit 0.1"] = {"seconds": time.perf_counter() - started, "cv_accuracy": accuracy}
        new = row["all"]["seconds"]
        print(f"--head {head}: search {new:.1f}s = {new / feature_seconds:.2f}x the feature time "
              f"(cv {row['all']['cv_accuracy']:.3f}, {row['all']['best_params']}); "
              f"half the images {row['half images']['seconds']:.1f}s, half the dims {row['half dims']['seconds']:.1f}s"
              + ("" if args.no_baseline else
                 f"; cnnkit 0.1 grid {row['cnnkit 0.1']['seconds']:.1f}s (cv {row['cnnkit 0.1']['cv_accuracy']:.3f}), "
                 f"{row['cnnkit 0.1']['seconds'] / new:.1f}x slower"), flush=True)
        results["heads"][head] = row
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

"""Benchmark: extract's input size for small images -- speed and accuracy at several sizes (issue 11, item 5).

Speed: the feature stage of `extract` (decode, resize, EfficientNet-Lite0
forward pass, no cache) on the same ``--speed-images`` Fashion-MNIST images
at each size, the sizes interleaved and repeated so that machine load hits
them alike; reported as images/s and as a ratio of the 224 px rate.
Accuracy: `extract --layer conv4,top --head logreg` (the little-data plan's
head, without flip) at each size on the random training subsets of
``bench/quality_fewshot.py`` (same folders, same test images), mean over seeds.

    python bench/image_size.py --sizes 96,128,160,224 --out /tmp/quality

Needs: apt-get install dataset-fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import subset_folder, write_image_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="96,128,160,224")
    parser.add_argument("--per-class", default="10,100", help="training subsets' images per class")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--speed-images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-quality"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CNNKIT_HOME", str(args.out / "cache"))
    from cnnkit.extraction import run_extract
    from cnnkit.features import FeatureConfig, FeatureExtractor, compute_features
    from cnnkit.options import ExtractOptions

    sizes = [int(s) for s in args.sizes.split(",")]
    speed_dir = args.out / "speed"
    if not speed_dir.exists():
        write_image_folder(speed_dir, "test", args.speed_images // 10, seed=5)
    paths = sorted(speed_dir.rglob("*.png"))
    extractors = {size: FeatureExtractor(FeatureConfig("efficientnet_lite0", image_size=size)) for size in sizes}
    for size in sizes:  # build and trace each network before timing
        compute_features(paths[:32], extractors[size].config, use_cache=False, extractor=extractors[size])
    seconds = {size: [] for size in sizes}
    for _ in range(args.repeats):
        for size in sizes:
            started = time.perf_counter()
            compute_features(paths, extractors[size].config, use_cache=False, extractor=extractors[size])
            seconds[size].append(time.perf_counter() - started)
    rate = {size: len(paths) / min(seconds[size]) for size in sizes}
    results = {"load_average": os.getloadavg(), "images_per_s": rate, "accuracy": {}}
    for size in sizes:
        print(f"{size} px: {rate[size]:.1f} images/s, {rate[size] / rate[max(sizes)]:.2f}x the {max(sizes)} px rate",
              flush=True)

    for per_class in [int(n) for n in args.per_class.split(",")]:
        for size in sizes:
            accuracies = []
            for seed in [int(s) for s in args.seeds.split(",")]:
                root = subset_folder(args.out, per_class, seed)
                options = ExtractOptions(layers="conv4,top", head="logreg", image_size=size, val_split=0.0, seed=seed)
                accuracies.append(run_extract(root, options).metrics["test_accuracy"])
            results["accuracy"][f"{per_class}/{size}"] = accuracies
            print(f"{per_class}/class, {size} px: test {statistics.mean(accuracies):.3f} "
                  f"+- {statistics.pstdev(accuracies):.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

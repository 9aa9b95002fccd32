"""Benchmark: the few-shot cells through `cnnkit auto`, mean +- spread over random training subsets.

For each training size (images per class) and each seed, writes a
``train/`` folder of that many random Fashion-MNIST training images per class
(``bench/fashion_mnist.py``, one random subset per seed) beside a ``test/``
folder of official test images (200 per class, the same for every line), runs
``cnnkit auto`` on it with its defaults (in-process: ``cnnkit.auto.run_auto``,
the function the CLI calls) and reads the run's test accuracy. In the same run
and on the same images it measures two anchors: cnnkit 0.1's little-data plan
(``extract --layer auto --head auto --val-split 0``: stage set and head chosen
by cross-validation) and an RBF SVC on the raw pixels. ``--photos`` does the
same on crops of natural photos (``bench/photo_crops.py``), the check that
what helps Fashion-MNIST does not hurt photos.

    python bench/quality_fewshot.py --sizes 10,100 --seeds 1,2,3 --out /tmp/quality
    python bench/quality_fewshot.py --photos --sizes 10,30 --seeds 1,2,3 --out /tmp/quality-photos

Features are cached under ``$CNNKIT_HOME`` (default ``OUT/cache``): a second
run of the script does no forward pass. Needs: apt-get install dataset-fashion-mnist
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
from extract_fashion_mnist import raw_pixel_svc  # noqa: E402
from fashion_mnist import write_image_folder  # noqa: E402
from photo_crops import write_crops  # noqa: E402


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} +- {statistics.pstdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100", help="training images per class, comma-separated")
    parser.add_argument("--seeds", default="1,2,3", help="one random training subset per seed")
    parser.add_argument("--photos", action="store_true", help="crops of natural photos instead of Fashion-MNIST")
    parser.add_argument("--no-anchors", action="store_true", help="only cnnkit auto")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-quality"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CNNKIT_HOME", str(args.out / "cache"))
    from cnnkit.auto import run_auto
    from cnnkit.extraction import run_extract
    from cnnkit.options import ExtractOptions

    test_dir = args.out / "test"
    if not test_dir.exists():
        if args.photos:
            write_crops(test_dir, "test", 30, seed=0)
        else:
            write_image_folder(test_dir, "test", 200, seed=0)
    results = {"data": "photo crops" if args.photos else "Fashion-MNIST", "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        rows = {"auto": [], "cnnkit 0.1 plan": [], "raw-pixel SVC": [], "plans": [], "seconds": []}
        for seed in [int(s) for s in args.seeds.split(",")]:
            root = args.out / f"n{size}-s{seed}"
            if not (root / "train").exists():
                if args.photos:
                    write_crops(root / "train", "train", size, seed=seed)
                else:
                    write_image_folder(root / "train", "train", size, seed=seed)
            if not (root / "test").exists():
                (root / "test").symlink_to(test_dir.resolve())
            started = time.perf_counter()
            result = run_auto(root, args.out / "runs" / f"n{size}-s{seed}", force=True)
            rows["seconds"].append(time.perf_counter() - started)
            rows["auto"].append(result.metrics["test_accuracy"])
            rows["plans"].append(result.plan.command_line)
            line = f"n={size}/class seed {seed}: auto {result.metrics['test_accuracy']:.3f} ({rows['seconds'][-1]:.0f}s)"
            if not args.no_anchors:
                old = run_extract(root, ExtractOptions(layers="auto", head="auto", val_split=0.0, seed=seed))
                rows["cnnkit 0.1 plan"].append(old.metrics["test_accuracy"])
                if not args.photos:
                    rows["raw-pixel SVC"].append(raw_pixel_svc(root / "train", test_dir))
                line += (f", cnnkit 0.1 plan {old.metrics['test_accuracy']:.3f} ({','.join(old.layers)} {old.head})"
                         + (f", raw-pixel SVC {rows['raw-pixel SVC'][-1]:.3f}" if rows["raw-pixel SVC"] else ""))
            print(line + f"\n  {result.plan.command_line}", flush=True)
        print(f"n={size}/class over {len(rows['auto'])} subsets: auto {spread(rows['auto'])}"
              + "".join(f", {k} {spread(rows[k])}" for k in ("cnnkit 0.1 plan", "raw-pixel SVC") if rows[k]),
              flush=True)
        results["sizes"][size] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

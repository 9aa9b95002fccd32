"""Benchmark: fine-tuning's BatchNorm handling and rate on Fashion-MNIST subsets (issue 14, item 2).

The same random training subsets and test images as ``bench/quality_fewshot.py``
(``bench/fewshot_explore/prep.py at 93d781a`` layout: ROOT/s{seed}/n{per_class}/train,
ROOT/test), one `cnnkit finetune` run per variant and subset, test accuracy and
wall time, and the logistic head on conv4+top features (the little-data plan)
on the same images as the baseline.

    python bench/finetune_batchnorm.py --root /tmp/fewshot/fm --per-class 100 --seeds 1 \\
        --variants "train;frozen;frozen-lr" --out /tmp/ft-bn

Variants: ``train`` (the BatchNorm layers of the unfrozen stages use batch
statistics: cnnkit 0.1), ``frozen`` (they stay in inference mode with the
ImageNet statistics), ``frozen-lr`` (frozen, and the unfrozen stages train at
the full rate instead of a tenth: the 0.1 runs' update/weight ratios were
3e-5, far below the notes' 1e-3).

Needs: apt-get install dataset-fashion-mnist; the subsets written by prep.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

VARIANTS = {
    "train": {"batchnorm": "train"},
    "frozen": {"batchnorm": "frozen"},
    "frozen-lr": {"batchnorm": "frozen", "finetune_lr_scale": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/fewshot/fm"))
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--variants", default="train;frozen;frozen-lr")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--freeze", default="conv4")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-ft-bn"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CNNKIT_HOME", str(args.out / "cache"))
    from cnnkit.data import load_dataset
    from cnnkit.extraction import ExtractOptions, run_extract
    from cnnkit.options import preset
    from cnnkit.predict import predict_run
    from cnnkit.training import run_training

    test = load_dataset(args.root / "test")
    test_paths = [s.path for s in test.samples]
    test_labels = [test.class_names[s.label] for s in test.samples]

    def test_accuracy(run_path: Path) -> float:
        predictions = predict_run(test_paths, run_path, k=1).predictions
        return statistics.fmean(p.top[0][0] == label for p, label in zip(predictions, test_labels))

    results: dict[str, list] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        train = args.root / f"s{seed}" / f"n{args.per_class}" / "train"
        started = time.perf_counter()
        baseline = run_extract(train, ExtractOptions(layers="conv4,top", head="logreg", pca=None, val_split=0.0),
                               args.out / "extract", force=True)
        results.setdefault("extract conv4,top logreg", []).append(
            {"seed": seed, "test": test_accuracy(baseline.run_path), "seconds": time.perf_counter() - started})
        print("extract", results["extract conv4,top logreg"][-1], flush=True)
        for name in args.variants.split(";"):
            options = preset("finetune", freeze=args.freeze, epochs=args.epochs, val_split=0.1, **VARIANTS[name])
            started = time.perf_counter()
            out = args.out / f"ft-{name}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            done = run_training(train, options, out)
            results.setdefault(f"finetune --freeze {args.freeze} {name}", []).append(
                {"seed": seed, "test": test_accuracy(done.run_path), "seconds": time.perf_counter() - started,
                 "history_loss": done.history.get("loss"), "val_accuracy": done.history.get("val_accuracy")})
            print(name, results[f"finetune --freeze {args.freeze} {name}"][-1], flush=True)
    for name, rows in results.items():
        tests = [r["test"] for r in rows]
        print(f"{name:40s} test {statistics.fmean(tests):.3f} +- {statistics.pstdev(tests):.3f} "
              f"({', '.join(f'{t:.3f}' for t in tests)}), {statistics.fmean(r['seconds'] for r in rows) / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

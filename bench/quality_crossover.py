"""Benchmark: which strategy wins at a given size, each given `auto`'s budget (issue 14, items 2 and 3).

For each training size and seed (the random subsets of ``bench/quality_fewshot.py``:
same folders, same 2,000 test images), runs ``cnnkit auto`` with its defaults and,
on the same data and with the same budget, each strategy of the notes' table forced
through the thresholds ``auto`` takes (``cnnkit auto --little-data`` and so on, so
every strategy is planned and timed by the same code):

- ``features``: the little-data plan (logistic heads on conv4+top, averaged over
  the backbones the budget has room for);
- ``finetune-few`` / ``finetune-many``: fine-tuning above conv4 / conv2, even where ``auto``
  would not plan it because too few epochs fit the budget (``FINETUNE_MIN_EPOCHS``);
- ``train-scratch``: the compact network from scratch at the images' own size.

    python bench/quality_crossover.py --sizes 1000 --seeds 1 --out /tmp/fewshot/quality
    python bench/quality_crossover.py --sizes 1000 --seeds 1,2,3 --strategies auto,features,train-scratch

Prints one line per run (test accuracy, wall seconds, the command auto ran) and
the mean +- spread per strategy. Needs: apt-get install dataset-fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import subset_folder  # noqa: E402
from quality_fewshot import spread  # noqa: E402

# Thresholds that force each strategy: little_data above the size makes any size "little";
# scratch_data above it rules training from scratch out; the similarity thresholds at their
# extremes make the domain "similar" (fine-tune a few stages) whatever is measured.
NEVER = 10**9
FORCED = {
    "features": {"little_data": NEVER},
    "finetune-few": {"scratch_data": NEVER, "shift": float(NEVER), "confidence": 0.0, "probe_margin": 1.0},
    "finetune-many": {"scratch_data": NEVER, "shift": 0.0, "confidence": 1.0, "probe_margin": -1.0},
    "train-scratch": {"little_data": 1, "scratch_data": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000", help="training images per class, comma-separated")
    parser.add_argument("--seeds", default="1", help="one random training subset per seed")
    parser.add_argument("--strategies", default="auto," + ",".join(FORCED),
                        help="'auto' (its own choice) and any of: " + ", ".join(FORCED))
    parser.add_argument("--budget", type=float, default=10.0, help="minutes, for every strategy (auto's default)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-quality"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CNNKIT_HOME", str(args.out / "cache"))
    import cnnkit.advise as advise_module
    from cnnkit.advise import Thresholds
    from cnnkit.auto import run_auto

    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s != "auto" and s not in FORCED]
    if unknown:
        parser.error(f"--strategies: unknown {', '.join(unknown)}; choose from auto, {', '.join(FORCED)}")
    results: dict = {"budget_minutes": args.budget, "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        rows: dict = {s: {"test": [], "seconds": [], "plans": []} for s in strategies}
        for seed in [int(s) for s in args.seeds.split(",")]:
            root = subset_folder(args.out, size, seed)
            for strategy in strategies:
                thresholds = Thresholds(**FORCED[strategy]) if strategy in FORCED else None
                started = time.perf_counter()
                # auto plans fine-tuning only when its epochs fit the budget (else features): a
                # forced fine-tuning strategy switches that check off, to be measured all the same.
                forced = strategy.startswith("finetune")
                with mock.patch.object(advise_module, "FINETUNE_MIN_EPOCHS", float("-inf") if forced
                                       else advise_module.FINETUNE_MIN_EPOCHS):
                    result = run_auto(root, args.out / "runs" / f"n{size}-s{seed}-{strategy}",
                                      budget_minutes=args.budget, thresholds=thresholds, force=True)
                seconds = time.perf_counter() - started
                row = rows[strategy]
                row["test"].append(result.metrics["test_accuracy"])
                row["seconds"].append(seconds)
                row["plans"].append(result.plan.command_line)
                print(f"n={size}/class seed {seed} {strategy}: test {row['test'][-1]:.4f} ({seconds:.0f} s, "
                      f"{result.advice.strategy})\n  {result.plan.command_line}", flush=True)
        for strategy, row in rows.items():
            print(f"n={size}/class {strategy}: {spread(row['test'])} over {len(row['test'])} subsets, "
                  f"{max(row['seconds']):.0f} s at most", flush=True)
        results["sizes"][size] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

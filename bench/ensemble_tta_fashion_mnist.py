"""What ensembles and test-time augmentation gain on Fashion-MNIST (docs/see.md).

Takes a feature-head run and a fine-tuned run trained on the same folders
(same ``--val-split 0.2`` and seed, so the same validation images) and
measures, on the official test images of DATA:

- each member's test accuracy, the equal-weight ensemble's, and the
  ensemble whose weight is chosen on the runs' own validation images (the
  test images never choose anything);
- the ensemble run itself (``make_ensemble`` + ``evaluate_run``) at the chosen
  weights, to check it equals the weighted mean of the members' probabilities;
- ``--tta`` (12 views) against the plain view for both runs, on the first
  ``--tta-per-class`` test images of each class (12 forward passes per image).

    python bench/ensemble_tta_fashion_mnist.py --feat RUN --finetuned RUN --data DATA --out /tmp/see-bench/x

Needs the runs of docs/see.md (made with `cnnkit extract` and `cnnkit finetune`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np


def copy_samples(samples, class_names, folder: Path) -> Path:
    """A plain folder-per-class tree of ``samples`` (evaluate then uses every image of it)."""
    shutil.rmtree(folder, ignore_errors=True)
    for sample in samples:
        target = folder / class_names[sample.label] / Path(sample.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, target)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feat", type=Path, required=True, help="feature-head run")
    parser.add_argument("--finetuned", type=Path, required=True, help="fine-tuned run")
    parser.add_argument("--data", type=Path, required=True, help="the runs' data folder (train/ and test/)")
    parser.add_argument("--tta-per-class", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-ensemble-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cnnkit.data import load_dataset, split_dataset
    from cnnkit.ensemble import make_ensemble
    from cnnkit.evaluation import evaluate_run
    from cnnkit.runs import load_run
    from cnnkit.tta import TTA

    options = [load_run(r).manifest.options for r in (args.feat, args.finetuned)]
    assert options[0]["val_split"] == options[1]["val_split"] and options[0]["seed"] == options[1]["seed"]
    dataset = load_dataset(args.data)
    splits = split_dataset(dataset, options[0]["val_split"], options[0]["seed"])
    val = copy_samples(splits["val"], dataset.class_names, args.out / "val")
    by_class: dict[int, list] = {}
    for sample in sorted(splits["test"], key=lambda s: Path(s.path).name):
        by_class.setdefault(sample.label, []).append(sample)
    tta_data = copy_samples([s for rows in by_class.values() for s in rows[:args.tta_per_class]],
                            dataset.class_names, args.out / "tta")

    results: dict = {}
    started = time.perf_counter()
    scores = {name: {split: evaluate_run(run, data) for split, data in (("val", val), ("test", args.data))}
              for name, run in (("feat", args.feat), ("finetuned", args.finetuned))}
    labels = {split: scores["feat"][split].labels for split in ("val", "test")}
    for split in ("val", "test"):
        assert np.array_equal(labels[split], scores["finetuned"][split].labels)

    def accuracy(weight: float, split: str) -> float:
        mixed = weight * scores["feat"][split].probabilities + (1 - weight) * scores["finetuned"][split].probabilities
        return float(np.mean(mixed.argmax(axis=1) == labels[split]))

    grid = [round(w, 2) for w in np.arange(0.3, 0.96, 0.05)]
    val_scores = {w: accuracy(w, "val") for w in grid}
    # The best validation accuracy; among ties the weight nearest equal weights.
    chosen = max(grid, key=lambda w: (val_scores[w], -abs(w - 0.5)))
    results["members"] = {name: {split: scores[name][split].accuracy for split in ("val", "test")}
                          for name in scores}
    results["equal_weights"] = {"val": accuracy(0.5, "val"), "test": accuracy(0.5, "test")}
    results["weight_grid_val"] = val_scores
    results["chosen_feat_weight"] = chosen
    results["chosen"] = {"val": val_scores[chosen], "test": accuracy(chosen, "test")}
    results["member_seconds"] = time.perf_counter() - started
    print(json.dumps({k: results[k] for k in ("members", "equal_weights", "chosen_feat_weight", "chosen")}), flush=True)

    started = time.perf_counter()
    ensemble = make_ensemble([args.feat, args.finetuned], args.out / "ensemble", [chosen, 1 - chosen], force=True)
    results["ensemble_run_test"] = evaluate_run(ensemble, args.data).accuracy
    results["ensemble_run_seconds"] = time.perf_counter() - started
    print(f"ensemble run {ensemble}: test {results['ensemble_run_test']:.4f}", flush=True)

    for name, run in (("feat", args.feat), ("finetuned", args.finetuned)):
        started = time.perf_counter()
        evaluation = evaluate_run(run, tta_data, tta=TTA()).to_dict()
        results[f"tta_{name}"] = {"images": evaluation["images"], "views": evaluation["tta_views"],
                                  "without": evaluation["accuracy_without_tta"], "with": evaluation["accuracy"],
                                  "seconds": time.perf_counter() - started}
        print(f"tta {name}: {results[f'tta_{name}']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: what averaging a from-scratch network with a features run is worth, by weight.

`auto`'s from-scratch plan (a lot of small images of a different domain) averages the network
with a logistic head on EfficientNet-Lite0 features of the same images, weighted
``cnnkit.advise.SCRATCH_WEIGHTS``. This scores both runs on DATA's test split (each through its own
classifier, as `cnnkit evaluate` does), then their weighted mean for a range of the features'
share, so the weight can be checked on any pair of runs:

    python bench/scratch_partner.py NETWORK_RUN FEATURES_RUN DATA [--json out.json]

Measured on the full Fashion-MNIST (docs/quality.md): the features' share 0.25-0.35 was best,
0.5 lost to the network alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("network", type=Path)
    parser.add_argument("features", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from cnnkit.advise import SCRATCH_WEIGHTS
    from cnnkit.evaluation import evaluate_run

    network = evaluate_run(args.network, args.data, split="test", batch_size=256)
    features = evaluate_run(args.features, args.data, split="test", batch_size=64)
    if network.paths != features.paths:
        raise SystemExit("the two runs did not score the same test images (unreadable files?)")
    labels = np.asarray(network.labels)
    default_share = SCRATCH_WEIGHTS[1] / sum(SCRATCH_WEIGHTS)
    result = {"images": int(len(labels)), "network": float(network.accuracy), "features": float(features.accuracy),
              "default_share": default_share, "by_share": {}}
    for share in sorted({0.1, 0.2, 0.25, 0.3, round(default_share, 3), 0.4, 0.5, 0.6}):
        mean = (1 - share) * network.probabilities + share * features.probabilities
        result["by_share"][f"{share:g}"] = float((mean.argmax(1) == labels).mean())
    print(f"network alone   {result['network']:.4f}")
    print(f"features alone  {result['features']:.4f}")
    for share, accuracy in result["by_share"].items():
        mark = "  <- SCRATCH_WEIGHTS" if abs(float(share) - default_share) < 1e-3 else ""
        print(f"features share {share:>5}  {accuracy:.4f}{mark}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

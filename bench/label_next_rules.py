"""Benchmark: which rule should `label-next` use with a run? Many seeds of the loop, in seconds each.

``bench/label_next.py`` runs the real loop (`label-next`, then `cnnkit auto` in full) and takes
minutes a round, so it can afford a few seeds of one or two rules. This script replays the same
loop on the features those runs cached, to compare rules over many seeds: round 1 is the
command's typical picks, rounds 2-3 the rule under test, and after each round the model
`auto`'s little-data plan fits on 100-300 labels -- a logistic head (standardised, C 0.1,
classes balanced: ``advise.ENSEMBLE_HEAD_C``) on EfficientNet-Lite0 (flip-averaged),
Lite1 and Lite2 conv4 (3 x 3 regions) + top features, their probabilities averaged -- scored
on the hidden test images. On the pool's picks of ``bench/label_next.py``'s seed 1 it
gives the test accuracies `auto` gave (0.826, 0.863, 0.884: equal to the third decimal).

Rules (rounds 2-3):

- ``doubt-kmeans-P``: what `label-next` ships (``labelling.margin_picks``, power P of doubt
  = 1 - margin as each image's k-means weight, the image nearest each centre); P 0 is
  plain k-means (no doubt at all);
- ``margin-spread``: the rule shipped before: the 10 x n smallest margins, k-means into n
  groups, the smallest margin of each;
- ``oracle-margin``: ``margin-spread`` by a model that has seen every pool label (what
  "the most ambiguous images" are worth as picks);
- ``random``: random picks every round (round 1 too).

    python bench/label_next.py --seeds 1 --arms label-next --out /tmp/lnbench/fm   # caches the features
    CNNKIT_HOME=/tmp/lnbench/cache python bench/label_next_rules.py --pool-dir /tmp/lnbench/fm \\
        --seeds 1,2,3,4,5,6,7,8,9,10 --out docs/label_next_rules.json

Runs single-threaded BLAS (one process per core is the fast way to run several rule sets);
the per-seed figures differ from `auto`'s in the last decimals with the thread count (k-means
and L-BFGS sum in another order), so compare means over seeds, not single seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import CLASS_NAMES, load_idx  # noqa: E402

# auto's little-data plan at these sizes (its command line is in bench/label_next.py's results).
MEMBERS = (("efficientnet_lite0", None, True), ("efficientnet_lite1", 224, False), ("efficientnet_lite2", 224, False))


def load_features(pool_dir: Path) -> dict[str, np.ndarray]:
    """Pool and test features of each member, from the feature cache, and the pool's true labels."""
    from cnnkit.features import FeatureConfig, compute_features

    pool = sorted((pool_dir / "pool").glob("*.png"))
    test = sorted((pool_dir / "test").rglob("*.png"))
    _, train_labels = load_idx("train")
    data = {"pool_y": np.array([train_labels[int(p.stem)] for p in pool]),
            "test_y": np.array([CLASS_NAMES.index(p.parent.name) for p in test])}
    for i, (backbone, size, flip) in enumerate(MEMBERS):
        config = FeatureConfig(backbone, image_size=size, flip=flip, grid=3)
        for name, paths in (("pool", pool), ("test", test)):
            table = compute_features(paths, config, stages=["conv4", "conv5"])
            if len(table.kept) != len(paths):
                raise SystemExit(f"{backbone}: {len(paths) - len(table.kept)} {name} images unreadable")
            data[f"{name}{i}"] = np.concatenate([table.features["conv4"], table.features["conv5"]], axis=1)
            if i == 0:
                data[f"{name}_index"] = table.features["conv5"]  # label-next's index: Lite0 top
    return data


def fit_ensemble(data: dict, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The plan's three heads on the labelled ``rows``; mean probabilities on the pool and the test set.

    Each head is ``cnnkit.heads.fit_head``'s pipeline with the plan's settings (no PCA, C fixed), fitted
    without the cross-validation that only scores the one C (``cv=1``): the pipeline `auto` fits.
    """
    from cnnkit.advise import ENSEMBLE_HEAD_C
    from cnnkit.heads import fit_head

    found = {"pool": 0.0, "test": 0.0}
    labels = data["pool_y"][rows]
    for i in range(len(MEMBERS)):
        head = fit_head(data[f"pool{i}"][rows], labels, "logreg", pca=None, cv=1,
                        param_value=ENSEMBLE_HEAD_C).pipeline
        for name in found:
            probabilities = np.zeros((len(data[f"{name}{i}"]), len(CLASS_NAMES)))
            probabilities[:, head.classes_] = head.predict_proba(data[f"{name}{i}"])
            found[name] = found[name] + probabilities / len(MEMBERS)
    return found


def margin_spread(index, rest: np.ndarray, n: int, probabilities: np.ndarray, seed: int) -> list[int]:
    """The rule shipped before stop 44: 10 x n smallest margins, k-means into n, the least sure of each."""
    from cnnkit.labelling import _kmeans

    top2 = np.sort(probabilities, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    candidates = np.argsort(margin, kind="stable")[:10 * n]
    labels, _ = _kmeans(index.vectors[candidates], n, seed)
    picks = [candidates[labels == c][np.argmin(margin[candidates[labels == c]])] for c in range(labels.max() + 1)
             if np.any(labels == c)]
    picks += [c for c in candidates if c not in picks][:n - len(picks)]
    return [int(rest[i]) for i in picks]


def pick(rule: str, data: dict, labelled: list[int], n: int, seed: int, probabilities, oracle) -> list[int]:
    from cnnkit import labelling
    from cnnkit.neighbours import NeighbourIndex

    rest = np.setdiff1d(np.arange(len(data["pool_y"])), labelled)
    if rule == "random":
        return [int(i) for i in np.random.default_rng(seed).choice(rest, n, replace=False)]
    index = NeighbourIndex.build(data["pool_index"][rest], seed=seed)
    if probabilities is None:  # round 1: the command's typical picks
        vectors = data["pool_index"][labelled] if labelled else None
        return [int(p.path) for p in labelling.typical_picks(index, list(rest), n, vectors, seed)]
    if rule == "margin-spread":
        return margin_spread(index, rest, n, probabilities[rest], seed)
    if rule == "oracle-margin":
        return margin_spread(index, rest, n, oracle[rest], seed)
    found = labelling.margin_picks(index, list(rest), n, probabilities[rest], CLASS_NAMES, seed,
                                   power=float(rule.rsplit("-", 1)[1]))
    return [int(p.path) for p in found]


def simulate(rule: str, data: dict, seed: int, rounds: int, n: int, oracle) -> list[float]:
    labelled, probabilities, scores = [], None, []
    for _ in range(rounds):
        labelled += pick(rule, data, labelled, n, seed, probabilities, oracle)
        found = fit_ensemble(data, np.array(labelled))
        probabilities = found["pool"]
        scores.append(float(np.mean(found["test"].argmax(axis=1) == data["test_y"])))
    return scores


def replay(pool_dir: Path, data: dict) -> None:
    """The replica's test accuracy on each round's labelled images, beside what `auto` scored on them."""
    row_of = {int(p.stem): i for i, p in enumerate(sorted((pool_dir / "pool").glob("*.png")))}
    runs = json.loads((pool_dir / "results.json").read_text())["runs"]
    for key, rounds in sorted(runs.items()):
        arm, seed = key.split("/")
        for number, found in enumerate(rounds, start=1):
            train = pool_dir / "rounds" / arm / f"{seed}-r{number}" / "train"
            rows = np.array([row_of[int(p.stem)] for p in train.rglob("*.png")])
            replica = float(np.mean(fit_ensemble(data, rows)["test"].argmax(axis=1) == data["test_y"]))
            print(f"{key} round {number}: auto {found['test_accuracy']:.4f}, replica {replica:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-dir", type=Path, default=Path("/tmp/lnbench/fm"),
                        help="bench/label_next.py's --out (its pool/ and test/)")
    parser.add_argument("--rules", default="random,margin-spread,doubt-kmeans-0,doubt-kmeans-1,doubt-kmeans-2,"
                                           "doubt-kmeans-3,oracle-margin")
    parser.add_argument("--seeds", default="1,2,3,4,5,6,7,8,9,10")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="write the per-seed figures and means here (JSON)")
    parser.add_argument("--replay", action="store_true",
                        help="only check the replica: score each round bench/label_next.py ran against `auto`'s")
    args = parser.parse_args()

    data = load_features(args.pool_dir)
    if args.replay:
        replay(args.pool_dir, data)
        return
    rules = args.rules.split(",")
    oracle = fit_ensemble(data, np.arange(len(data["pool_y"])))["pool"] if "oracle-margin" in rules else None
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"command": " ".join(["python"] + sys.argv), "pool": len(data["pool_y"]), "test": len(data["test_y"]),
               "per_round": args.per_round, "rules": {}}
    for rule in rules:
        started = time.perf_counter()
        per_seed = {str(seed): simulate(rule, data, seed, args.rounds, args.per_round, oracle) for seed in seeds}
        means = [round(statistics.mean(s[r] for s in per_seed.values()), 4) for r in range(args.rounds)]
        results["rules"][rule] = {"seeds": per_seed, "mean": means}
        print(f"{rule}: mean {means}, at {args.per_round * args.rounds} labels per seed "
              f"{[s[-1] for s in per_seed.values()]} ({time.perf_counter() - started:.0f} s)", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark: does `cnnkit label-next` make labels go further than random picks?

Simulates the labelling loop of the README. A pool of unlabelled images (Fashion-MNIST:
5,000 random training images written once as PNGs in one flat folder; ``--photos``: crops
of the left 60 % of ten natural photos, ``bench/photo_crops.py``) and a hidden test set
(Fashion-MNIST: 100 official test images per class; photos: crops of the right 40 %).
For each seed and each arm, round after round: `label-next` picks ``--per-round``
images (``cnnkit.labelling.label_next``, what the command calls), their labels are
revealed (the picked files are copied into ``train/<class>/`` beside ``test/``), and
``cnnkit auto`` runs on them with its defaults (``cnnkit.auto.run_auto``, in-process:
what the command calls) and reports the test accuracy. The arms:

- ``label-next``: what the command does by default (round 1 without a run, then with
  ``--model`` of the previous round's run);
- ``typical``: the cold-start rule every round (``--rule typical --labeled`` the data so far);
- ``margin``: the run's margin from round 2 on (``--rule margin``; round 1 is typical);
- ``random``: random picks of the same number from the same pool (``--rule random``).

Every arm starts from the same pool; labelled images are never picked twice. Features
are cached under ``$CNNKIT_HOME`` (default ``OUT/cache``), so the pool goes through each
backbone once for every seed and arm. Results are saved after every run, and a rerun
continues where it stopped.

    python bench/label_next.py --seeds 1,2,3 --arms label-next,random,typical --out /tmp/lnbench/fm
    python bench/label_next.py --seeds 4,5 --arms label-next,random --out /tmp/lnbench/fm
    python bench/label_next.py --photos --seeds 1,2,3 --arms label-next,random --per-round 20 \
        --out /tmp/lnbench/photos
    python bench/label_next.py --timing-only --out /tmp/lnbench/fm     # label-next's own speed

Each writes OUT/results.json (``--json FILE``: a copy); docs/label_next.json holds the two
results files as ``{"fashion_mnist": ..., "photo_crops": ..., "timing": ...}``.

Needs: apt-get install dataset-fashion-mnist (Fashion-MNIST); scikit-image (photos).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import CLASS_NAMES, load_idx  # noqa: E402
from photo_crops import write_crops  # noqa: E402

ARMS = {"label-next": "auto", "typical": "typical", "margin": "margin", "random": "random"}


def write_fashion_pool(out: Path, size: int, test_per_class: int) -> dict[str, str]:
    """``out/pool/NNNNN.png`` (random training images, unlabelled) and ``out/test/<class>/``; file -> class."""
    images, labels = load_idx("train")
    chosen = np.random.default_rng(0).choice(len(images), size, replace=False)
    truth = {}
    (out / "pool").mkdir(parents=True, exist_ok=True)
    for index in chosen:
        name = f"{index:05d}.png"
        truth[name] = CLASS_NAMES[labels[index]]
        if not (out / "pool" / name).exists():
            Image.fromarray(images[index]).save(out / "pool" / name)
    if not (out / "test").exists():
        test_images, test_labels = load_idx("test")
        for label, name in enumerate(CLASS_NAMES):
            folder = out / "test" / name
            folder.mkdir(parents=True)
            for index in np.flatnonzero(test_labels == label)[:test_per_class]:
                Image.fromarray(test_images[index]).save(folder / f"t{index:05d}.png")
    return truth


def write_photo_pool(out: Path, per_class: int, test_per_class: int) -> dict[str, str]:
    """Crops of ten photos: ``out/pool/<photo>-NNN.png`` (train region, unlabelled), ``out/test/<photo>/``."""
    staging = out / "pool-labelled"
    if not staging.exists():
        write_crops(staging, "train", per_class, seed=0)
    if not (out / "test").exists():
        write_crops(out / "test", "test", test_per_class, seed=0)
    truth = {}
    (out / "pool").mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
        for image in sorted(folder.glob("*.png")):
            name = f"{folder.name}-{image.name}"
            truth[name] = folder.name
            if not (out / "pool" / name).exists():
                shutil.copyfile(image, out / "pool" / name)
    return truth


def reveal(picks, truth: dict[str, str], root: Path, previous: Path | None, test: Path) -> Path:
    """``root/train/<class>/``: the previous round's labelled images plus the new picks; ``root/test``."""
    if root.exists():
        shutil.rmtree(root)
    if previous is not None:
        shutil.copytree(previous / "train", root / "train")
    for pick in picks:
        name = Path(pick.path).name
        (root / "train" / truth[name]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pick.path, root / "train" / truth[name] / name)
    # A class no pick has yet cannot be trained (auto refuses a test class missing from train): its test
    # images are left out of the folder and counted as wrong (``test_share``).
    present = {p.name for p in (root / "train").iterdir() if p.is_dir()}
    (root / "test").mkdir()
    for folder in sorted(p for p in test.iterdir() if p.is_dir() and p.name in present):
        (root / "test" / folder.name).symlink_to(folder.resolve())
    return root


def test_share(root: Path, test: Path) -> float:
    """The share of the hidden test images whose class has training images (1.0: every class)."""
    def count(folder: Path) -> int:  # class folders may be links, which rglob does not follow
        return sum(len(list(c.glob("*.png"))) for c in folder.iterdir() if c.is_dir())

    return count(root / "test") / count(test)


def class_counts(picks, truth: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pick in picks:
        counts[truth[Path(pick.path).name]] = counts.get(truth[Path(pick.path).name], 0) + 1
    return dict(sorted(counts.items()))


def simulate(out: Path, arm: str, seed: int, rounds: int, per_round: int, truth: dict[str, str],
             results: dict, save) -> None:
    from cnnkit.auto import run_auto
    from cnnkit.labelling import label_next

    key = f"{arm}/s{seed}"
    done = results["runs"].setdefault(key, [])
    previous_data, previous_run = None, None
    for round_number in range(1, rounds + 1):
        root = out / "rounds" / arm / f"s{seed}-r{round_number}"
        run = out / "runs" / arm / f"s{seed}-r{round_number}"
        if len(done) >= round_number and (done[round_number - 1].get("shared_with") or (run / "manifest.json").exists()):
            if done[round_number - 1].get("shared_with"):
                root = out / "rounds" / "label-next" / f"s{seed}-r{round_number}"
                run = out / "runs" / "label-next" / f"s{seed}-r{round_number}"
            previous_data, previous_run = root, run
            continue
        del done[round_number - 1:]
        shared = results["runs"].get(f"label-next/s{seed}", [])
        if arm == "typical" and round_number == 1 and shared:
            # Round 1 has no run: the default arm's picks are the typical rule's, same seed, same pool.
            done.append(dict(shared[0], shared_with="label-next"))
            previous_data = out / "rounds" / "label-next" / f"s{seed}-r1"
            previous_run = out / "runs" / "label-next" / f"s{seed}-r1"
            save()
            continue
        rule = ARMS[arm]
        if arm == "margin" and previous_run is None:
            rule = "typical"
        started = time.perf_counter()
        found = label_next(out / "pool", per_round, model=previous_run if rule in ("auto", "margin") else None,
                           labeled=previous_data / "train" if previous_data else None, rule=rule, seed=seed)
        pick_seconds = time.perf_counter() - started
        reveal(found.picks, truth, root, previous_data, out / "test")
        started = time.perf_counter()
        result = run_auto(root, run, seed=seed, force=True)
        share = test_share(root, out / "test")
        row = {"labels": per_round * round_number, "rule": found.rule,
               "test_accuracy": result.metrics.get("test_accuracy") * share, "test_share": share, "picked_classes": class_counts(found.picks, truth),
               "pick_seconds": round(pick_seconds, 1), "auto_seconds": round(time.perf_counter() - started, 1),
               "plan": result.plan.command_line}
        done.append(row)
        print(f"{key} round {round_number}: {row['labels']} labels, {found.rule}, test {row['test_accuracy']:.4f}, "
              f"min class {min(row['picked_classes'].values()) if len(row['picked_classes']) == len(set(truth.values())) else 0}"
              f" ({row['pick_seconds']} s pick, {row['auto_seconds']} s auto)", flush=True)
        save()
        previous_data, previous_run = root, run


def summarise(results: dict, rounds: int, per_round: int) -> dict:
    """Mean test accuracy per arm and number of labels, the gain over random, and the labels random needs."""
    table = {}
    for arm in ARMS:
        rows = {key: value for key, value in results["runs"].items() if key.startswith(arm + "/")}
        if not rows:
            continue
        per_labels = {}
        for r in range(rounds):
            scores = [v[r]["test_accuracy"] for v in rows.values() if len(v) > r]
            if scores:
                per_labels[str(per_round * (r + 1))] = {"mean": statistics.mean(scores),
                                                        "sd": statistics.pstdev(scores), "seeds": scores}
        table[arm] = per_labels
    if "random" in table:
        curve = [(int(k), v["mean"]) for k, v in table["random"].items()]
        for arm, per_labels in table.items():
            for labels, cell in per_labels.items():
                cell["vs_random"] = cell["mean"] - table["random"].get(labels, {}).get("mean", float("nan"))
                cell["random_labels_for_same"] = labels_needed(curve, cell["mean"])
    return table


def labels_needed(curve: list[tuple[int, float]], accuracy: float) -> float | None:
    """Labels random picks need for ``accuracy``, linear between measured points (None: beyond the last)."""
    points = [(0, 0.0)] + sorted(curve)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 <= accuracy <= y1 and y1 > y0:
            return round(x0 + (accuracy - y0) / (y1 - y0) * (x1 - x0), 1)
    return None


def timing(out: Path, repeats: int = 3) -> dict:
    """Wall seconds of the command on the pool, features cached: without a run, and with round 1's run."""
    command = [sys.executable, "-m", "cnnkit", "label-next", str(out / "pool"), "-n", "100", "--json"]
    run = next(iter(sorted((out / "runs" / "label-next").glob("s*-r1"))), None)
    found = {}
    for name, extra in (("no_run", []), ("with_run", ["--model", str(run)] if run else None)):
        if extra is None:
            continue
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(command + extra, check=True, stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - started)
        found[name] = {"seconds": [round(s, 2) for s in seconds], "command": " ".join(command[1:] + extra)}
        print(f"label-next {name}: {seconds}", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--arms", default="label-next,random", help=f"comma-separated: {', '.join(ARMS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--pool", type=int, default=5000, help="Fashion-MNIST pool size")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--photos", action="store_true", help="crops of natural photos instead of Fashion-MNIST")
    parser.add_argument("--photo-pool-per-class", type=int, default=60)
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-label-next"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CNNKIT_HOME", str(args.out / "cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.photos:
        truth = write_photo_pool(args.out, args.photo_pool_per_class, 30)
    else:
        truth = write_fashion_pool(args.out, args.pool, args.test_per_class)
    state = args.out / "results.json"
    results = json.loads(state.read_text()) if state.exists() else {"runs": {}}
    results.update(data="photo crops" if args.photos else "Fashion-MNIST", pool=len(truth),
                   test=sum(1 for _ in (args.out / "test").rglob("*.png")), per_round=args.per_round,
                   rounds=args.rounds, command=" ".join(["python"] + sys.argv))

    def save() -> None:
        results["summary"] = summarise(results, args.rounds, args.per_round)
        state.write_text(json.dumps(results, indent=2))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    if not args.timing_only:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for arm in args.arms.split(","):
                simulate(args.out, arm, seed, args.rounds, args.per_round, truth, results, save)
    else:
        results["timing"] = timing(args.out)
    save()
    for arm, per_labels in results["summary"].items():
        print(arm, {k: f"{v['mean']:.4f} ({v.get('vs_random', 0):+.4f})" for k, v in per_labels.items()})


if __name__ == "__main__":
    main()

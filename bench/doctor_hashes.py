"""Perceptual hashes against `doctor`'s copy test for leaks: do hashes find the planted copies?

Issue 25 asks to pick a permissively licensed perceptual-hash library (``imagehash``, BSD-2) if
hashes beat features for near-duplicates. This bench measures it on the sets `bench/doctor.py`
makes (``noisy_fashion.make_noisy``: 20 test images copied into train as a re-encoded JPEG, a
resized, a shifted, a cropped or a brightened copy, amid Fashion-MNIST's own look-alike products).

Each training image's nearest test image by the Hamming distance of its hash is reported as a leak
when that distance is at most ``t``; for every ``t`` it prints the planted copies found (recall) and
the share of the reported test images that are planted copies' originals, the two figures
`bench/doctor.py` reports for `doctor` (``leak_recall``, ``leaked_tests_planted``). Needs
``pip install imagehash`` (not a cnnkit dependency)::

    python bench/doctor_hashes.py /tmp/lab/bench/noisy0 /tmp/lab/bench/noisy1 --doctor docs/doctor.json \
        --out docs/doctor_hashes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

HASHES = {"phash": "phash", "dhash": "dhash", "average": "average_hash", "wavelet": "whash"}


def hash_bits(paths: list[Path], method: str) -> np.ndarray:
    """(n, 64) bool: each image's 64-bit ``imagehash`` of kind ``method`` (on its grey pixels)."""
    import imagehash

    function = getattr(imagehash, HASHES[method])
    bits = []
    for path in paths:
        with Image.open(path) as image:
            bits.append(np.asarray(function(image.convert("L")).hash, bool).ravel())
    return np.stack(bits)


def leak_figures(root: Path, method: str) -> dict:
    truth = json.loads((root / "truth.json").read_text())
    train = sorted(p for p in (root / "train").rglob("*") if p.is_file())
    test = sorted(p for p in (root / "test").rglob("*") if p.is_file())
    a, b = hash_bits(train, method), hash_bits(test, method)
    # Hamming distances of every training hash to every test hash: 64 - agreements.
    distance = 64 - (a.astype(np.int32) @ b.T.astype(np.int32) + (~a).astype(np.int32) @ (~b).T.astype(np.int32))
    nearest = distance.argmin(axis=1)
    closest = distance[np.arange(len(train)), nearest]
    names = [p.relative_to(root).as_posix() for p in train]
    test_names = [p.relative_to(root).as_posix() for p in test]
    planted = {name: entry["test"] for name, entry in truth["leaks"].items()}
    kinds = {name: entry["kind"] for name, entry in truth["leaks"].items()}
    rows = []
    for t in range(0, 33):
        reported = np.flatnonzero(closest <= t)
        pairs = {(names[i], test_names[nearest[i]]) for i in reported}
        found = [name for name, original in planted.items() if (name, original) in pairs]
        tests = {test_names[nearest[i]] for i in reported}
        rows.append({"t": t, "leak_recall": len(found) / len(planted),
                     "leaked_tests_reported": len(tests),
                     "leaked_tests_planted": len(tests & set(planted.values())) / len(tests) if tests else None,
                     "missed_kinds": sorted(kinds[name] for name in planted if name not in found)})
        if len(found) == len(planted):
            break  # every planted copy found: larger thresholds only report more look-alikes
    # The planted copies' own distances, by kind: how far a hash moves under each change.
    own = {}
    for name, original in planted.items():
        own.setdefault(kinds[name], []).append(int(distance[names.index(name), test_names.index(original)]))
    return {"by_threshold": rows, "planted_distance_by_kind": own,
            "look_alike_distance_percentiles": np.percentile(closest, [1, 5, 25, 50]).tolist()}


def best_at_share(rows: list[dict], share: float = 0.8) -> dict | None:
    """The threshold with the highest recall among those whose reported leaks are at least ``share`` planted."""
    good = [r for r in rows if r["leaked_tests_planted"] is not None and r["leaked_tests_planted"] >= share]
    return max(good, key=lambda r: (r["leak_recall"], r["t"])) if good else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+", help="sets made by bench/doctor.py (with truth.json)")
    parser.add_argument("--methods", default="phash,dhash,average,wavelet")
    parser.add_argument("--doctor", type=Path, help="bench/doctor.py's JSON, for doctor's figures side by side")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    doctor = json.loads(args.doctor.read_text()) if args.doctor else {}
    report = {}
    for root in args.roots:
        seed = str(json.loads((root / "truth.json").read_text())["seed"])
        report[seed] = {}
        for method in args.methods.split(","):
            figures = leak_figures(root, method)
            best = best_at_share(figures["by_threshold"])
            figures["best_with_80_percent_planted"] = best
            report[seed][method] = figures
            mine = doctor.get(seed, {})
            print(f"set {seed} {method:8s}: best recall with >= 0.8 of reported leaks planted: "
                  + (f"{best['leak_recall']:.2f} at t={best['t']} ({best['leaked_tests_reported']} reported, "
                     f"{best['leaked_tests_planted']:.2f} planted; missed {best['missed_kinds']})" if best else "none")
                  + (f" | doctor: {mine['leak_recall']:.2f}, {mine['leaked_tests_planted']:.2f} planted" if mine else ""),
                  flush=True)
            print(f"    planted copies' distances by kind: {figures['planted_distance_by_kind']}; nearest test image of"
                  f" every training image, percentiles 1/5/25/50: {figures['look_alike_distance_percentiles']}")
    if args.out:
        args.out.write_text(json.dumps(report, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()

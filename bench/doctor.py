"""`cnnkit doctor` against planted faults: label errors, leaks, duplicates, foreign photos.

Builds noisy Fashion-MNIST sets (``bench/noisy_fashion.py``: 100 training images per class with
10 % of the labels flipped, 20 test images copied into train re-encoded, resized, shifted,
brightened or cropped, 10 exact duplicates, 10 foreign photos; 100 clean test images per class),
runs ``diagnose`` with its defaults on each, and scores the findings against the truth:

    python bench/doctor.py --seeds 0,1 --out /tmp/doctor-bench

With ``--cleanlab PYTHON`` (a Python that has cleanlab installed: it is AGPL-3.0, so it is never
a cnnkit dependency; e.g. ``python -m venv /tmp/cl && /tmp/cl/bin/pip install cleanlab``) the same
out-of-fold probabilities are also given to ``cleanlab.filter.find_label_issues`` and its
label-error precision and recall are reported beside cnnkit's.

Figures go to stdout and to OUT/doctor.json (docs/doctor.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noisy_fashion import make_noisy  # noqa: E402

CLEANLAB = """
import json, sys, numpy as np
from cleanlab.filter import find_label_issues
data = np.load(sys.argv[1])
judged = data["judged"]
flags = find_label_issues(data["labels"][judged], data["probabilities"][judged],
                          filter_by="prune_by_noise_rate", return_indices_ranked_by="normalized_margin")
print(json.dumps(np.flatnonzero(judged)[flags].tolist()))
"""


def relative(path: str, root: Path) -> str:
    return str(Path(path).relative_to(root)) if path else ""


def score(diagnosis, root: Path) -> dict:
    """Figures of one diagnosis against ``root/truth.json``."""
    truth = json.loads((root / "truth.json").read_text())
    found: dict[str, list] = {}
    for finding in diagnosis.findings:
        found.setdefault(finding.kind, []).append(finding)
    flagged = {relative(f.path, root) for f in found.get("label-error", [])}
    flips = set(truth["flipped"])
    planted_leaks = {(train, leak["test"]) for train, leak in truth["leaks"].items()}
    leak_pairs = {(relative(f.path, root), relative(f.other, root)) for f in found.get("leak", [])}
    leaked_tests = {test for _, test in leak_pairs}
    planted_tests = {test for _, test in planted_leaks}
    exact = {frozenset((relative(f.path, root), relative(f.other, root))) for f in found.get("exact-duplicate", [])}
    suspicious = {relative(f.path, root) for kind in ("outlier", "label-error") for f in found.get(kind, [])}
    return {
        "label_error_precision": len(flagged & flips) / max(1, len(flagged)),
        "label_error_recall": len(flagged & flips) / len(flips),
        "label_errors_flagged": len(flagged),
        "leak_recall": len(planted_leaks & leak_pairs) / len(planted_leaks),
        "leak_recall_without_crops": len({p for p in planted_leaks & leak_pairs if truth["leaks"][p[0]]["kind"] != "crop"})
        / max(1, sum(leak["kind"] != "crop" for leak in truth["leaks"].values())),
        "leaked_tests_planted": len(leaked_tests & planted_tests) / max(1, len(leaked_tests)),
        "leaked_tests_reported": len(leaked_tests),
        "exact_duplicates_found": len(exact & {frozenset(p) for p in truth["duplicates"].items()}),
        "foreign_flagged": len(suspicious & set(truth["foreign"])),
        "kinds": diagnosis.kind_counts,
        "seconds": {k: round(v, 1) for k, v in diagnosis.seconds.items()},
    }


def cleanlab_figures(python: str, diagnosis_probabilities: np.ndarray, labels: np.ndarray, judged: np.ndarray,
                     paths: list[str], root: Path, work: Path) -> dict:
    """cleanlab's label issues on the same out-of-fold probabilities, scored like cnnkit's."""
    arrays = work / "probabilities.npz"
    np.savez(arrays, probabilities=diagnosis_probabilities, labels=labels, judged=judged)
    script = work / "cleanlab_issues.py"
    script.write_text(CLEANLAB)
    rows = json.loads(subprocess.run([python, str(script), str(arrays)], check=True, capture_output=True,
                                     text=True).stdout)
    truth = json.loads((root / "truth.json").read_text())
    flagged = {relative(paths[r], root) for r in rows}
    flips = set(truth["flipped"])
    return {"label_error_precision": len(flagged & flips) / max(1, len(flagged)),
            "label_error_recall": len(flagged & flips) / len(flips), "label_errors_flagged": len(flagged)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=Path("/tmp/doctor-bench"))
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--cleanlab", metavar="PYTHON", help="a Python with cleanlab installed")
    args = parser.parse_args()

    from cnnkit.doctor import DoctorOptions, diagnose
    from cnnkit.options import Engine

    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        root = args.out / f"noisy{seed}"
        if not (root / "truth.json").exists():
            make_noisy(root, seed=seed)
        started = time.perf_counter()
        diagnosis = diagnose(root, DoctorOptions(engine=Engine(args.engine)))
        figures = score(diagnosis, root)
        figures["total_seconds"] = round(time.perf_counter() - started, 1)
        if args.cleanlab and diagnosis.probabilities is not None and diagnosis.probabilities.size:
            judged = ~np.isin(diagnosis.checked_splits, ("test", "val"))
            figures["cleanlab"] = cleanlab_figures(args.cleanlab, diagnosis.probabilities, diagnosis.checked_labels,
                                                   judged, diagnosis.checked, root, args.out)
        results[seed] = figures
        print(f"seed {seed}: {json.dumps(figures)}", flush=True)
    (args.out / "doctor.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

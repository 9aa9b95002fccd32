"""`cnnkit doctor` at scale: 60,000 noisy Fashion-MNIST images, seconds per stage against the issue's 60 s.

Builds (once) the set docs/doctor.md measures: ``noisy_fashion.make_noisy(ROOT, seed=2,
per_class=5000, test_per_class=1000)`` (50,040 training images with flipped labels, planted
leaks, duplicates and foreign photos; 10,000 test images), runs the command a user runs,
``cnnkit doctor ROOT --json --engine onnx``, in a new process (features cached after the first
run), and prints its wall time (start-up and exit included), each stage's seconds, the findings
per kind and the planted leaks found. The command, not the library's ``diagnose``: the command's
process once set glibc's allocator to unmap every freed block of 1 MiB or more, which made doctor
70 s where ``diagnose`` in a plain process took 43 s (docs/doctor.md, stop 43).

    python bench/doctor_scale.py --root /tmp/doctor-60k --runs 2
    python bench/doctor_scale.py --root /tmp/doctor-60k --runs 2 --first-run

The first run ever extracts the features (15-20 minutes on two cores) and fills the pixel cache.
``--first-run`` removes doctor's pixel cache (``$CNNKIT_HOME/doctor/pixels.npz``) before every
other run: the run after it is a first `doctor` after `extract` (features cached, every image
decoded), the one after that a repeat run, and each pair's ratio is measured on the same machine
state.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noisy_fashion import make_noisy  # noqa: E402

from cnnkit.doctor.pixels import cache_path  # noqa: E402

TARGET_SECONDS = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/doctor-60k"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--first-run", action="store_true",
                        help="remove doctor's pixel cache before every other run (a first doctor after extract)")
    args = parser.parse_args()
    if not (args.root / "truth.json").exists():
        make_noisy(args.root, seed=2, per_class=5000, test_per_class=1000)
    truth = json.loads((args.root / "truth.json").read_text())
    planted = {(train, entry["test"]) for train, entry in truth["leaks"].items()}

    def relative(path: str) -> str:
        return str(Path(path).relative_to(args.root)) if path else ""

    first_seconds = None
    for run in range(args.runs * (2 if args.first_run else 1)):
        first = args.first_run and run % 2 == 0
        if first:
            cache_path().unlink(missing_ok=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cnnkit", "doctor", str(args.root), "--json", "--engine", "onnx"],
                              capture_output=True, text=True)
        total = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"cnnkit doctor failed ({done.returncode}):\n{done.stderr[-3000:]}")
        found = json.loads(done.stdout)
        extra = {}
        if args.first_run:
            extra = {"pixel_cache": "none (first run)" if first else "warm"}
            if first:
                first_seconds = total
            else:
                extra["first_over_repeat"] = round(first_seconds / total, 2)
        leaks = {(relative(f["path"]), relative(f["other"])) for f in found["findings"] if f["kind"] == "leak"}
        print(json.dumps({"run": run + 1, "total_seconds": round(total, 1),
                          "against_target": round(total / TARGET_SECONDS, 2),
                          "seconds": {k: round(v, 1) for k, v in found["seconds"].items()},
                          "findings": found["kinds"], "planted_leaks_found": len(leaks & planted),
                          "planted_leaks": len(planted), **extra}), flush=True)


if __name__ == "__main__":
    main()

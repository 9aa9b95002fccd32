"""End-to-end check of `cnnkit export RUN --format tflite --quantize int8` as bench/run.py measures it.

Usage (from /work/wt-int8):
  PYTHONPATH=$PWD CNNKIT_HOME=/tmp/bench-main/home nice -n 15 /work/main/.venv/bin/python bench/int8_explore/verify.py RUN OUT
Exports with export_run (its own 200-image check on the test folder), then measures top-1 agreement on
all the test images outside cnnkit (bench/run.py's _OUTSIDE script, PIL resize, ai-edge-litert) against
`cnnkit predict --model RUN`.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run import _OUTSIDE, PYTHON  # noqa: E402 - bench/run.py

from cnnkit.data import load_dataset
from cnnkit.export import export_run
from cnnkit.predict import predict_run

run, out = sys.argv[1], Path(sys.argv[2])
test = load_dataset("/tmp/bench-main/test")
paths = [str(s.path) for s in test.samples]
reference_file = out.parent / (out.name + "-reference.json")
if reference_file.exists():
    ref_top = np.array(json.loads(reference_file.read_text()))
else:
    reference = predict_run(paths, run, k=1, batch_size=32)
    ref_top = np.array([test.class_names.index(p.top[0][0]) for p in reference.predictions])
    reference_file.write_text(json.dumps(ref_top.tolist()))
started = time.perf_counter()
result = export_run(run, "tflite", out, "int8", check="/tmp/bench-main/test", check_images_count=200, force=True)
seconds = time.perf_counter() - started
listing = out.parent / (out.name + "-test.json")
listing.write_text(json.dumps(paths))
done = subprocess.run([PYTHON, "-c", _OUTSIDE, "tflite", str(out / "model.tflite"), "224", str(listing)],
                      capture_output=True, text=True, check=True)
top = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
labels = np.array([s.label for s in test.samples])
print(json.dumps({"run": run, "export_seconds": round(seconds, 1), "phases": {k: round(v, 1) for k, v in result.seconds.items()},
                  "size_mb": round(result.size_bytes / 1e6, 2), "own_check_200": result.check.agreement,
                  f"agreement_{len(paths)}": float(np.mean(top == ref_top)),
                  "accuracy_int8": float(np.mean(top == labels)), "accuracy_run": float(np.mean(ref_top == labels))}))

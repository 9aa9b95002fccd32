"""Issue 10 exploration: selective int8 quantization driven by the QuantizationDebugger's per-layer rmse/scale.

Usage (from /work/wt-int8):
  PYTHONPATH=$PWD CNNKIT_HOME=/tmp/bench-main/home nice -n 15 /work/main/.venv/bin/python bench/int8_explore/explore.py RUN NAME [variants...]

Caches (in /tmp/int8x/NAME): decoded test images, the run's reference probabilities, the debugger's
layer statistics (stats.csv). Each variant is quantized from the one calibrated model (no re-calibration),
then measured on the 1000 test images and on 200 held-out training images (not the calibration ones).
"""
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import os

run_path, name = sys.argv[1], sys.argv[2]
STATS_N = int(os.environ.get("STATS_N", "50"))  # images for debugger.run()
variants = sys.argv[3:] or ["base", "top5", "top10", "top20", "thr0.7", "thr0.5"]
cache = Path("/tmp/int8x") / name
cache.mkdir(parents=True, exist_ok=True)
stats_csv = cache / ("stats.csv" if STATS_N == 50 else f"stats{STATS_N}.csv")

import tensorflow as tf
from tensorflow.lite.python import convert

from cnnkit.convert import FLOAT_OPS_IN_INT8, INPUT_NAME, write_savedmodel
from cnnkit.data.dataset import load_dataset, sample_per_class
from cnnkit.data.images import load_image
from cnnkit.export import in_batches, inference_model
from cnnkit.runs import load_run

run = load_run(run_path)
log = open(cache / "log.txt", "a")


def say(*parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


def decode(paths):
    return np.stack([load_image(p, run.image_size, run.crop_pct) for p in paths])


t0 = time.perf_counter()
if not (cache / "test.npy").exists():
    test = load_dataset("/tmp/bench-main/test")
    np.save(cache / "test.npy", decode([s.path for s in test.samples]))
    train = load_dataset(run.manifest.data.source)
    samples = train.splits.get("train") or train.samples
    calib = sample_per_class(samples, 20, 0)[:200]  # what representative_images(run) picks
    used = {str(s.path) for s in calib}
    rest = [s for s in samples if str(s.path) not in used]
    held = sample_per_class(rest, 20, 1)[:200]
    np.save(cache / "calib.npy", decode([s.path for s in calib]))
    np.save(cache / "held.npy", decode([s.path for s in held]))
test, calib, held = (np.load(cache / f"{k}.npy") for k in ("test", "calib", "held"))
if not (cache / "ref_test.npy").exists():
    classify = run.classifier()
    np.save(cache / "ref_test.npy", in_batches(classify, test))
    np.save(cache / "ref_held.npy", in_batches(classify, held))
ref_test, ref_held = np.load(cache / "ref_test.npy"), np.load(cache / "ref_held.npy")
say(f"[{name}] data+reference {time.perf_counter() - t0:.0f}s test={len(test)} held={len(held)} calib={len(calib)}")

model = inference_model(run)


def calibration():
    for image in calib:
        yield {INPUT_NAME: image[None]}


def stats_data(n):
    def gen():
        for image in calib[:n]:
            yield [image[None]]  # debugger.run() wants a list of arrays in input order
    return gen


t0 = time.perf_counter()
folder = tempfile.mkdtemp(prefix="int8x-")
write_savedmodel(model, Path(folder) / "sm", run.image_size)
converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(folder) / "sm"))
converter.optimizations = [tf.lite.Optimize.DEFAULT]
converter.representative_dataset = calibration
converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS_IN_INT8))
debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=stats_data(STATS_N),
                                                     debug_options=options)
say(f"[{name}] calibrate+debug model {time.perf_counter() - t0:.0f}s")
t0 = time.perf_counter()
if not stats_csv.exists():
    debugger.run()
    with open(stats_csv, "w") as f:
        debugger.layer_statistics_dump(f)
    say(f"[{name}] debugger.run on {STATS_N} images {time.perf_counter() - t0:.0f}s")
rows = list(csv.DictReader(open(stats_csv)))
for r in rows:
    r["rs"] = np.sqrt(float(r["mean_squared_error"])) / float(r["scale"])
order = sorted(rows, key=lambda r: -r["rs"])
say(f"[{name}] {len(rows)} verified tensors; worst rmse/scale:",
    [(r["op_name"], r["tensor_name"][-40:], round(r["rs"], 3)) for r in order[:12]])


def quantize(nodes):
    return convert.mlir_quantize(debugger.calibrated_model,
                                 disable_per_channel=converter._experimental_disable_per_channel,
                                 fully_quantize=False, enable_numeric_verify=False,
                                 denylisted_ops=list(FLOAT_OPS_IN_INT8), denylisted_nodes=list(nodes))


def top1(flat, images):
    interp = tf.lite.Interpreter(model_content=flat, num_threads=1)
    runner = interp.get_signature_runner("serving_default")
    return np.concatenate([runner(image=im[None])["probabilities"] for im in images]).argmax(1)


def evaluate(label, nodes, test_too=True):
    t = time.perf_counter()
    flat = quantize(nodes)
    tq = time.perf_counter() - t
    h = float(np.mean(top1(flat, held) == ref_held.argmax(1)))
    a = float(np.mean(top1(flat, test) == ref_test.argmax(1))) if test_too else float("nan")
    say(f"[{name}] {label}: float nodes={len(nodes)} size={len(flat) / 1e6:.2f}MB held={h:.3f} "
        f"test1000={a:.3f} quantize={tq:.0f}s total={time.perf_counter() - t:.0f}s")
    return h, a, flat


for v in variants:
    if v == "base":
        evaluate("base (ops denylist only)", [])
    elif v.startswith("top"):
        k = int(v[3:])
        evaluate(f"top{k} rmse/scale", [r["tensor_name"] for r in order[:k]])
    elif v.startswith("thr"):
        thr = float(v[3:])
        evaluate(f"rmse/scale>{thr}", [r["tensor_name"] for r in order if r["rs"] > thr])
    elif v.startswith("loop"):  # greedy: add worst nodes in steps until held-out agreement >= target
        target, step = 0.99, int(v[4:] or 5)
        k = 0
        while k <= len(order):
            h, a, _ = evaluate(f"loop k={k}", [r["tensor_name"] for r in order[:k]], test_too=False)
            if h >= target:
                evaluate(f"loop final k={k}", [r["tensor_name"] for r in order[:k]])
                break
            k += step

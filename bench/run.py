"""The one speed benchmark: every figure against a baseline measured in the same run; rewrites docs/benchmarks.md.

    python bench/run.py                       # everything (about 15-20 min on 2 cores)
    python bench/run.py --only engines,cached # some sections
    python bench/run.py --no-write            # print, leave docs/benchmarks.md alone

Sections (each a function ``bench_<name>(ctx) -> list[Row]``; add one to
``SECTIONS`` to publish a new figure -- head-search cost, advise on 60k
images and image sizes belong here too):

- engines: `extract`'s feature stage (decode included) with each engine,
  against a minimal hand-written Keras loop (Pillow decode + resize +
  ``model.predict``) and ONNX Runtime model-only on pre-decoded images, same
  network (EfficientNet-Lite0 pooled stages) and size (224); plus a linear
  probe's test accuracy on each engine's features.
- cached: `cnnkit extract` twice on the same 1,000 images (cold cache, then
  cached), whole command wall time, and whether the rerun imported TensorFlow.
- predict: `cnnkit predict IMAGE` from a cold start (new process), TensorFlow
  against the auto engine.
- rss: peak RSS of `cnnkit extract` on 2,000 and on 8,000 images.
- heads: the head search (logreg, k-NN) on 2,000 x 1,280 top features against
  the time it took to extract them.
- advise: `cnnkit advise` on the 60,000 Fashion-MNIST training images.
- help: `cnnkit --help` from a new process.
- finetune: one `cnnkit finetune` epoch against a minimal ``model.fit`` on the
  same images (decoded up front) and network.
- export: issue 10's check -- a finetune run and an extract run (logreg on
  conv4,top), each exported to every format, run on 1,000 held-out test
  images in a process that does not import cnnkit, against `cnnkit predict
  --model`; int8 size and accuracy against float.

Needs: apt-get install dataset-fashion-mnist; pip install -e ".[export]".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from fashion_mnist import write_image_folder  # noqa: E402

BEGIN, END = "<!-- bench/run.py: begin -->", "<!-- bench/run.py: end -->"
PYTHON = sys.executable
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass
class Row:
    what: str
    figure: str
    baseline: str
    ratio: str
    command: str


@dataclass
class Context:
    work: Path
    train: Path  # 100 per class
    test: Path  # 100 per class, official test split
    big: Path  # 800 per class (rss)
    home: Path


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


# A wrapper that runs the CLI through its console-script entry point (what `cnnkit` runs, fast
# exit included) and reports, on stderr's last line, its wall time, peak RSS and whether
# TensorFlow was imported; from an atexit handler, which runs on either way out of main().
# Peak RSS is the process's own high-water mark (VmHWM), not ru_maxrss: Linux carries the
# parent's resident size at fork into a child's ru_maxrss, so after this script had run a
# section in-process (2 GiB with TensorFlow), every later child reported at least that.
_CLI = """
import atexit, resource, sys, time
started = time.perf_counter()
def peak_kib():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def report():
    print("BENCH", time.perf_counter() - started, peak_kib(), "tensorflow" in sys.modules,
          file=sys.stderr, flush=True)
atexit.register(report)
from cnnkit.cli import main
main()
"""


def cli(ctx: Context, *args: str) -> dict:
    started = time.perf_counter()
    done = subprocess.run([PYTHON, "-c", _CLI, *args], capture_output=True, text=True,
                          env={**os.environ, "CNNKIT_HOME": str(ctx.home)})
    wall = time.perf_counter() - started
    last = [line for line in done.stderr.splitlines() if line.startswith("BENCH")]
    if not last or done.returncode != 0:
        raise RuntimeError(f"cnnkit {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    _, inner, rss_kb, tf = last[-1].split()
    return {"wall": wall, "inner": float(inner), "rss_mb": int(rss_kb) / 1024, "tensorflow": tf == "True",
            "stdout": done.stdout}


def cold_cache(ctx: Context, name: str, engines: bool = True) -> Context:
    """``ctx`` with an empty ``$CNNKIT_HOME`` at ``work/name``; ``engines``: keep the converted engines."""
    home = ctx.work / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    if engines and (ctx.home / "engines").exists():
        os.symlink(ctx.home / "engines", home / "engines")
    return Context(ctx.work, ctx.train, ctx.test, ctx.big, home)


def decoded(folder: Path, size: int = 224) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    from cnnkit.data import load_dataset, load_image

    dataset = load_dataset(folder)
    paths = [s.path for s in dataset.samples]
    return (np.stack([load_image(p, size) for p in paths]), np.array([s.label for s in dataset.samples]), paths)


def bench_engines(ctx: Context) -> list[Row]:
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cnnkit.data import load_dataset, load_image
    from cnnkit.engines import OnnxRunner, available_engines, onnx_file
    from cnnkit.features import FeatureConfig, FeatureExtractor, compute_features

    os.environ["CNNKIT_HOME"] = str(ctx.home)
    config = FeatureConfig("efficientnet_lite0", image_size=224).resolved()
    train = load_dataset(ctx.train)
    paths = [s.path for s in train.samples]
    n = len(paths)
    rows, rates = [], {}

    # Baseline 1: the minimal Keras loop a user would write.
    base = FeatureExtractor(config, "tf").spec.build(weights="imagenet", include_top=False)
    pooled = keras.Model(base.input, keras.layers.GlobalAveragePooling2D()(base.output))
    pooled.predict(np.zeros((32, 224, 224, 3), np.uint8), verbose=0)
    started = time.perf_counter()
    for i in range(0, n, 32):
        pooled.predict(np.stack([load_image(p, 224) for p in paths[i:i + 32]]), batch_size=32, verbose=0)
    rates["keras loop"] = n / (time.perf_counter() - started)

    # Baseline 2: ONNX Runtime, model only, on images decoded beforehand.
    extractor = FeatureExtractor(config, "onnx")
    converted = time.perf_counter()
    onnx_path = onnx_file(config.backbone, f"{config.network_key}-stages", lambda: extractor.model, 224)
    conversion = time.perf_counter() - converted
    images = np.stack([load_image(p, 224) for p in paths])
    session = OnnxRunner(onnx_path)
    session(images[:32])
    started = time.perf_counter()
    for i in range(0, n, 32):
        session(images[i:i + 32])
    rates["onnxruntime model only"] = n / (time.perf_counter() - started)
    del images

    test_paths = [s.path for s in load_dataset(ctx.test).samples]
    y_train = np.array([s.label for s in train.samples])
    y_test = np.array([s.label for s in load_dataset(ctx.test).samples])
    probes = {}
    # Every usable engine at float32 (their default), and OpenVINO's bfloat16 where the CPU has it: the
    # precision is part of the name, so no figure is bought by halving it unseen.
    variants = [(engine, "float32") for engine in available_engines()]
    if "openvino" in available_engines("bfloat16") and _has_bf16():
        variants.append(("openvino", "bfloat16"))
    for engine, precision in variants:
        extractor = FeatureExtractor(replace(config, precision=precision), engine)
        extractor(np.zeros((32, 224, 224, 3), np.uint8))  # built (and converted) outside the timing
        started = time.perf_counter()
        table = compute_features(paths, extractor.config, use_cache=False, extractor=extractor)
        name = f"{engine} {precision}"
        rates[f"extract --engine {engine} --precision {precision}"] = n / (time.perf_counter() - started)
        test = compute_features(test_paths, extractor.config, use_cache=False, extractor=extractor)
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        probe.fit(table.select(["top"]), y_train)
        probes[name] = float(np.mean(probe.predict(test.select(["top"])) == y_test))
    best = max((k for k in rates if k.startswith("extract")), key=rates.get)
    ort = rates["onnxruntime model only"]
    command = "python bench/run.py --only engines"
    for name, rate in rates.items():
        rows.append(Row(f"{name}: {n} Fashion-MNIST PNGs, EfficientNet-Lite0 stages, 224 px, batch 32",
                        f"{rate:.1f} img/s", f"ONNX Runtime model only {ort:.1f} img/s", ratio(rate, ort), command))
    rows.append(Row(f"fastest extract ({best}) vs hand-written Keras loop", f"{rates[best]:.1f} img/s",
                    f"{rates['keras loop']:.1f} img/s", ratio(rates[best], rates["keras loop"]), command))
    rows.append(Row("one-off ONNX conversion of the stage network (cached in $CNNKIT_HOME/engines)",
                    f"{conversion:.1f} s", "-", "-", command))
    for engine, accuracy in probes.items():
        reference = probes["tf float32"]
        rows.append(Row(f"linear probe (top, logreg C=0.1) on {engine} features, {len(y_test)} test images",
                        f"{accuracy:.3f}", f"tf float32 {reference:.3f}", f"{(accuracy - reference) * 100:+.1f} pt",
                        command))
    return rows


def _has_bf16() -> bool:
    from cnnkit.engines import openvino_has_bf16

    return openvino_has_bf16()


def bench_cached(ctx: Context) -> list[Row]:
    fresh = cold_cache(ctx, "home-cached")
    # A head whose search costs little (k-NN, no PCA), so the figure is the feature stage's saving;
    # the default logreg + PCA search costs minutes on its own on a loaded machine (issue 11, item 2).
    args = ["extract", str(ctx.train), "--head", "knn", "--pca", "none", "--out", str(ctx.work / "cached-run"),
            "--force", "--quiet"]
    first = cli(fresh, *args)
    second = cli(fresh, *args)
    # The same first run on TensorFlow (cnnkit 0.1's only engine), on its own cold cache.
    first_tf = cli(cold_cache(ctx, "home-cached-tf", engines=False), *args, "--engine", "tf")
    command = f"cnnkit extract {ctx.train.name} --head knn --pca none --out RUN --force (twice, cold feature cache)"
    return [Row("extract on 1,000 images: first run, whole command, --engine auto", f"{first['wall']:.1f} s", "-",
                "-", command),
            Row(f"extract rerun, every feature cached (TensorFlow imported: {second['tensorflow']})",
                f"{second['wall']:.1f} s", f"first run {first['wall']:.1f} s",
                f"{first['wall'] / second['wall']:.1f}x faster", command),
            Row("the same rerun against a first run with --engine tf (cold cache of its own)",
                f"{second['wall']:.1f} s", f"first run --engine tf {first_tf['wall']:.1f} s",
                f"{first_tf['wall'] / second['wall']:.1f}x faster", command + " --engine tf")]


def bench_predict(ctx: Context) -> list[Row]:
    image = next(ctx.test.rglob("*.png"))
    runs = {engine: cli(ctx, "predict", str(image), "--engine", engine, "--quiet") for engine in ("tf", "auto")}
    runs = {engine: cli(ctx, "predict", str(image), "--engine", engine, "--quiet") for engine in ("tf", "auto")}
    command = "cnnkit predict IMAGE --engine tf, then auto (new process each, second call of each)"
    return [Row(f"predict one image from a cold start, --engine auto (TensorFlow imported: "
                f"{runs['auto']['tensorflow']})", f"{runs['auto']['wall']:.1f} s",
                f"--engine tf {runs['tf']['wall']:.1f} s", f"{runs['tf']['wall'] / runs['auto']['wall']:.1f}x faster",
                command)]


def bench_rss(ctx: Context) -> list[Row]:
    from cnnkit.data import load_dataset

    samples = load_dataset(ctx.big).samples
    small = ctx.work / "rss2000.csv"
    small.write_text("path,label\n" + "".join(f"{s.path},{s.path.parent.name}\n"
                                              for s in samples if int(s.path.stem) < 200))
    args = ["--layer", "top", "--head", "knn", "--pca", "none", "--cv", "2", "--no-cache", "--quiet", "--force"]
    a = cli(ctx, "extract", str(small), "--out", str(ctx.work / "rss-a"), *args)
    b = cli(ctx, "extract", str(ctx.big), "--out", str(ctx.work / "rss-b"), *args)
    command = "cnnkit extract DATA --layer top --head knn --pca none --cv 2 --no-cache (2,000 vs 8,000 images)"
    return [Row(f"peak RSS of extract, 8,000 images (TensorFlow imported: {a['tensorflow'] or b['tensorflow']})",
                f"{b['rss_mb']:.0f} MiB", f"2,000 images {a['rss_mb']:.0f} MiB",
                f"+{(b['rss_mb'] / a['rss_mb'] - 1) * 100:.0f} %", command)]


def bench_heads(ctx: Context) -> list[Row]:
    """The head search on 2,000 x 1,280 features (top stage) against extracting those 2,000 images."""
    from cnnkit.data import load_dataset

    samples = [s for s in load_dataset(ctx.big).samples if int(s.path.stem) < 200]
    listing = ctx.work / "heads2000.csv"
    listing.write_text("path,label\n" + "".join(f"{s.path},{s.path.parent.name}\n" for s in samples))
    fresh = cold_cache(ctx, "home-heads")
    rows, features = [], None
    for head in ("logreg", "knn"):
        done = cli(fresh, "extract", str(listing), "--layer", "top", "--head", head, "--val-split", "0", "--json",
                   "--out", str(ctx.work / f"heads-{head}"), "--force")
        seconds = json.loads(done["stdout"])["seconds"]
        features = features or seconds["features"]  # the first run computes them, the second reads the cache
        rows.append(Row(f"head search, --head {head} (default grid, PCA auto, 5-fold CV) on {len(samples):,} x "
                        "1,280 top features", f"{seconds['head']:.1f} s",
                        f"extracting those {len(samples):,} images {features:.1f} s",
                        f"{seconds['head'] / features:.2f}x",
                        f"cnnkit extract 2000.csv --layer top --head {head} --val-split 0 --json"))
    return rows


def bench_advise(ctx: Context) -> list[Row]:
    """`cnnkit advise` on the whole Fashion-MNIST training set (60,000 PNGs), new process, wall time."""
    full = ctx.work / "full"
    if not full.exists():
        write_image_folder(full, "train", 6000, seed=0)
    done = cli(ctx, "advise", str(full), "--json")
    choice = json.loads(done["stdout"]).get("strategy")
    return [Row(f"advise on 60,000 training images (chose {choice}), whole command", f"{done['wall']:.1f} s",
                "target 15 s", f"{done['wall'] / 15:.2f}x of target", "cnnkit advise FULL --json")]


def bench_help(ctx: Context) -> list[Row]:
    """`cnnkit --help` wall time (new process, median of 7), and whether it imported TensorFlow."""
    import statistics

    walls, tf = [], False
    for _ in range(7):
        done = cli(ctx, "--help")
        walls.append(done["wall"])
        tf = tf or done["tensorflow"]
    return [Row(f"cnnkit --help, new process, median of 7 (TensorFlow imported: {tf})",
                f"{statistics.median(walls):.2f} s", "target 0.3 s", f"{statistics.median(walls) / 0.3:.2f}x of target",
                "cnnkit --help")]


def bench_finetune(ctx: Context) -> list[Row]:
    import csv

    import keras

    from cnnkit.backbones import get_backbone
    from cnnkit.options import preset
    from cnnkit.training import run_training

    subset = ctx.work / "ft.csv"
    from cnnkit.data import load_dataset

    samples = [s for s in load_dataset(ctx.train).samples if int(s.path.stem) < 36]
    subset.write_text("path,label\n" + "".join(f"{s.path},{s.path.parent.name}\n" for s in samples))
    # Training needs validation images; both sides validate on as many images after the epoch.
    # Two epochs, the second timed: the first also traces the step, which the baseline does outside its timing.
    options = preset("finetune", epochs=2, head_epochs=0, val_split=0.1, augment="none", seed=0)
    result = run_training(subset, options, ctx.work / "ft-run", force=True)
    with open(result.run_path / "history.csv") as handle:
        seconds = float(list(csv.DictReader(handle))[-1]["seconds"])
    from cnnkit.runs import load_run

    splits = load_run(result.run_path).manifest.data.splits
    n, n_val = splits["train"], splits["val"]

    images, labels, _ = decoded(ctx.train)
    keep = [i for i, s in enumerate(load_dataset(ctx.train).samples) if int(s.path.stem) < 36]
    images, labels = images[keep], labels[keep]
    order = np.random.default_rng(0).permutation(len(images))
    train, val = order[:n], order[n:n + n_val]
    spec = get_backbone("efficientnet_lite0")
    base = spec.build(weights="imagenet")
    cut = base.layers.index(spec.stage_layer(base, "conv4"))
    for i, layer in enumerate(base.layers):
        layer.trainable = i > cut
    model = keras.Sequential([base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.001, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images[:32], labels[:32], batch_size=32, epochs=1, verbose=0,
              validation_data=(images[val], labels[val]))  # trace outside the timing
    started = time.perf_counter()
    model.fit(images[train], labels[train], batch_size=32, epochs=1, verbose=0,
              validation_data=(images[val], labels[val]))
    minimal = time.perf_counter() - started
    command = "python bench/run.py --only finetune"
    return [Row(f"finetune --freeze conv4, second epoch of {n} images + validation on {n_val}, 224 px (decode "
                "included)",
                f"{n / seconds:.1f} img/s", f"minimal model.fit on decoded arrays, same counts {n / minimal:.1f} img/s",
                ratio(n / seconds, n / minimal), command)]


_OUTSIDE = """
import json, sys
import numpy as np
from PIL import Image
fmt, model_path, size, listing = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
paths = json.load(open(listing))
def pixels(path):
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC), np.uint8)
if fmt == "onnx":
    import onnxruntime as ort
    session = ort.InferenceSession(model_path)
    classify = lambda batch: session.run(None, {"image": batch})[0]
elif fmt == "tflite":
    from ai_edge_litert.interpreter import Interpreter
    runner = Interpreter(model_path).get_signature_runner()
    classify = lambda batch: np.concatenate([runner(image=im[None])["probabilities"] for im in batch])
else:
    import tensorflow as tf
    serve = tf.saved_model.load(model_path).signatures["serving_default"]
    classify = lambda batch: serve(image=tf.constant(batch))["probabilities"].numpy()
top = []
for i in range(0, len(paths), 32):
    top += classify(np.stack([pixels(p) for p in paths[i:i + 32]])).argmax(1).tolist()
assert not any(name.startswith("cnnkit") for name in sys.modules)
print(json.dumps(top))
"""


def bench_export(ctx: Context) -> list[Row]:
    from cnnkit.data import load_dataset
    from cnnkit.export import MODEL_FILES, ExportCheckError, export_run
    from cnnkit.extraction import run_extract
    from cnnkit.options import ExportFormat, ExtractOptions, preset
    from cnnkit.predict import predict_run
    from cnnkit.training import run_training

    os.environ["CNNKIT_HOME"] = str(ctx.home)
    runs = {
        "extract conv4,top logreg": run_extract(ctx.train, ExtractOptions(layers="conv4,top", head="logreg",
                                                                          val_split=0.0),
                                                ctx.work / "ex-run", force=True).run_path,
        # The finetune preset as `cnnkit finetune` runs it (2 head + 5 epochs), a tenth held out.
        "finetune --freeze conv4": run_training(ctx.train, preset("finetune", val_split=0.1),
                                                ctx.work / "ft-export-run", force=True).run_path,
    }
    test = load_dataset(ctx.test)
    paths = [str(s.path) for s in test.samples]
    labels = np.array([s.label for s in test.samples])
    listing = ctx.work / "test.json"
    listing.write_text(json.dumps(paths))
    rows = []
    for name, run in runs.items():
        reference = predict_run(paths, run, k=1, batch_size=32)
        names = [p.top[0][0] for p in reference.predictions]
        ref_top = np.array([test.class_names.index(n) for n in names])
        accuracy = {}
        sizes = {}
        for fmt, quantize in (("savedmodel", "none"), ("onnx", "none"), ("tflite", "none"), ("tflite", "int8")):
            out = ctx.work / f"export-{name.split()[0]}-{fmt}-{quantize}"
            # The 1,000-image agreement is measured outside cnnkit below; the export's own check takes 200.
            try:
                result = export_run(run, fmt, out, quantize, check=ctx.test, check_images_count=200, force=True)
            except ExportCheckError as refused:  # the export's own check failed: nothing was written
                rows.append(Row(f"{name} -> {fmt}{'' if quantize == 'none' else ' ' + quantize}: REFUSED by "
                                f"the export's own check ({str(refused).split(': ', 1)[-1][:120]})", "-",
                                "cnnkit predict --model", "-",
                                f"cnnkit export RUN --format {fmt} --quantize {quantize} --check TEST"))
                continue
            model_path = out / MODEL_FILES[ExportFormat(fmt)]
            done = subprocess.run([PYTHON, "-c", _OUTSIDE, fmt, str(model_path), str(224), str(listing)],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            top = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
            agreement = float(np.mean(top == ref_top))
            accuracy[(fmt, quantize)] = float(np.mean(top == labels))
            sizes[(fmt, quantize)] = result.size_bytes
            rows.append(Row(f"{name} -> {fmt}{'' if quantize == 'none' else ' ' + quantize}: top-1 agreement "
                            f"outside cnnkit, {len(paths)} test images (max prob diff in export's check "
                            f"{result.check.max_probability_difference:.1e})", f"{agreement:.1%}",
                            "cnnkit predict --model", f"accuracy {accuracy[(fmt, quantize)]:.3f}",
                            f"cnnkit export RUN --format {fmt} --quantize {quantize} --check TEST"))
        f, q = ("tflite", "none"), ("tflite", "int8")
        if q not in sizes or f not in sizes:
            continue
        rows.append(Row(f"{name}: int8 TFLite size", f"{sizes[q] / 1e6:.2f} MB", f"float {sizes[f] / 1e6:.2f} MB",
                        f"{sizes[q] / sizes[f]:.2f}x", "python bench/run.py --only export"))
        rows.append(Row(f"{name}: int8 TFLite accuracy", f"{accuracy[q]:.3f}", f"float {accuracy[f]:.3f}",
                        f"{(accuracy[q] - accuracy[f]) * 100:+.1f} pt", "python bench/run.py --only export"))
    return rows


SECTIONS = {"engines": bench_engines, "cached": bench_cached, "predict": bench_predict, "rss": bench_rss,
            "finetune": bench_finetune, "export": bench_export, "heads": bench_heads, "advise": bench_advise,
            "help": bench_help}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    from importlib.metadata import version

    def installed(package: str) -> str | None:
        try:
            return f"{package} {version(package)}"
        except Exception:  # noqa: BLE001 - not installed
            return None

    versions = ", ".join(filter(None, map(installed, ("tensorflow", "tensorflow-cpu", "keras", "onnxruntime",
                                                      "openvino"))))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB; Python {platform.python_version()}; {versions}"


def render(results: dict[str, list[Row]], seconds: float, argv: list[str]) -> str:
    lines = [BEGIN, "## Speed: `python bench/run.py`", "",
             f"Machine: {machine()}. Sections: {', '.join(results)}, each measured by `python bench/run.py "
             "--only SECTION` (one --work folder; every row names its command); each baseline was measured in "
             "the same run as its figure (these machines are shared and noisy: compare ratios, not absolute "
             "figures, across runs).", ""]
    for section, rows in results.items():
        lines += [f"### {section}", "", "| what | figure | baseline | ratio | command |", "|---|---|---|---|---|"]
        lines += [f"| {r.what} | {r.figure} | {r.baseline} | {r.ratio} | `{r.command}` |" for r in rows]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_docs(block: str, path: Path = REPO / "docs" / "benchmarks.md") -> None:
    text = path.read_text()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections; 'none' publishes what --work already holds")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="cnnkit-bench-"))
    ctx = Context(work, work / "train", work / "test", work / "big", work / "home")
    if not ctx.train.exists():
        write_image_folder(ctx.train, "train", 100, seed=0)
        write_image_folder(ctx.test, "test", 100, seed=0)
        write_image_folder(ctx.big, "train", 800, seed=0, offset=100)
    started = time.perf_counter()
    # Sections already measured in this --work folder are kept, so a long run can be resumed
    # section by section (`--only export`) and still publish every figure.
    saved = work / "results.json"
    results: dict[str, list[Row]] = {name: [Row(**row) for row in rows]
               for name, rows in (json.loads(saved.read_text()) if saved.exists() else {}).items()}
    for name in [n for n in args.only.split(",") if n != "none"]:
        section_started = time.perf_counter()
        try:
            results[name] = SECTIONS[name](ctx)
        except Exception as error:  # noqa: BLE001 - one broken section must not lose the others' figures
            import traceback

            traceback.print_exc()
            results[name] = [Row(f"FAILED: {type(error).__name__}: {str(error)[:200]}", "-", "-", "-", "")]
        for row in results[name]:
            print(f"{name}: {row.what}: {row.figure} vs {row.baseline} = {row.ratio}", flush=True)
        saved.write_text(json.dumps({k: [r.__dict__ for r in rows] for k, rows in results.items()}, indent=1))
        print(f"{name}: {time.perf_counter() - section_started:.0f} s", flush=True)
    block = render(results, time.perf_counter() - started, argv)
    if not args.no_write:
        write_docs(block)
    print(block)


if __name__ == "__main__":
    main()

"""One answer per image: does `cnnkit predict --model RUN` give the same top-1 on every engine and in every export?

On held-out Fashion-MNIST test images, for a feature-head run (`extract --layer conv4 --head logreg`), a
fine-tuned network (`finetune --freeze conv4`) and `auto`'s 10-per-class ensemble (three backbones):

- `cnnkit predict --model RUN --json` with the default engine (``auto``), and with every engine by
  name (``tf``, ``onnx``, ``openvino``), each in its own process with its own ``$CNNKIT_HOME`` (a
  shared feature cache would hand every engine the first one's features);
- the run's exports (`cnnkit export`: ONNX, TFLite, TFLite int8, SavedModel), each run by its own
  runtime in a process that never imports cnnkit, preprocessing from ``model.json`` alone.

It prints the top-1 agreement of each with the default engine's, and each one's accuracy, as a
Markdown table and as JSON (``--json-out``).

    python bench/agreement.py --work /tmp/agreement --test-per-class 100 --json-out docs/agreement.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fashion_mnist import write_image_folder  # noqa: E402

ENGINES = ("tf", "onnx", "openvino")
EXPORTS = {"onnx": ("onnx", "none"), "tflite": ("tflite", "none"), "tflite-int8": ("tflite", "int8"),
           "savedmodel": ("savedmodel", "none")}

# Runs an export with its own runtime, preprocessing from model.json only (no cnnkit import): prints
# {"path": top-1 class name} as JSON.
STANDALONE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from PIL import Image

    folder, listing = Path(sys.argv[1]), Path(sys.argv[2])
    info = json.loads((folder / "model.json").read_text())
    size, crop = info["image_size"], info["crop_pct"]

    def pixels(path):
        image = Image.open(path).convert("RGB")
        side = min(image.size) * crop
        left, top = (image.width - side) / 2, (image.height - side) / 2
        box = (round(left), round(top), round(left + side), round(top + side))
        return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box), np.uint8)

    if info["format"] == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(str(folder / info["file"]))
        run = lambda x: session.run(None, {"image": x})[0]
    elif info["format"] == "tflite":
        from ai_edge_litert.interpreter import Interpreter
        runner = Interpreter(str(folder / info["file"])).get_signature_runner()
        run = lambda x: np.concatenate([runner(image=i[None])["probabilities"] for i in x])
    else:
        import tensorflow as tf
        serve = tf.saved_model.load(str(folder / info["file"])).signatures["serving_default"]
        run = lambda x: serve(image=tf.constant(x))["probabilities"].numpy()
    paths = listing.read_text().splitlines()
    top = {}
    for start in range(0, len(paths), 32):
        batch = paths[start:start + 32]
        for path, row in zip(batch, run(np.stack([pixels(p) for p in batch]))):
            top[path] = info["class_names"][int(np.argmax(row))]
    assert not any(name.startswith("cnnkit") for name in sys.modules)
    print(json.dumps(top))
""")


def cnnkit(*args: str, home: Path, env_extra: dict | None = None) -> str:
    env = {**os.environ, "CNNKIT_HOME": str(home), **(env_extra or {})}
    env.pop("CNNKIT_ENGINE", None)
    done = subprocess.run([sys.executable, "-m", "cnnkit", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"cnnkit {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def predictions(run: Path, test: Path, home: Path, engine: str | None = None) -> dict[str, str]:
    args = ["predict", str(test), "--model", str(run), "--top-k", "1", "--json", "--quiet"]
    out = cnnkit(*args, *(["--engine", engine] if engine else []), home=home)
    return {row["path"]: row["top"][0]["label"] for row in json.loads(out)}


def exported(run: Path, name: str, work: Path, home: Path, listing: Path) -> dict[str, str]:
    fmt, quantize = EXPORTS[name]
    folder = work / "exports" / f"{run.name}-{name}"
    cnnkit("export", str(run), "--format", fmt, "--quantize", quantize, "--out", str(folder), "--force",
           home=home)
    done = subprocess.run([sys.executable, "-c", STANDALONE, str(folder), str(listing)], capture_output=True,
                          text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        raise SystemExit(f"running the {name} export failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnkit-agreement"))
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    work = args.work
    test = work / "test"
    if not test.exists():
        write_image_folder(test, "test", args.test_per_class, seed=args.seed)
    train = work / "train"
    if not train.exists():
        write_image_folder(train / "train", "train", args.train_per_class, seed=args.seed)
    few = work / "few"
    if not few.exists():
        write_image_folder(few / "train", "train", 10, seed=args.seed)
    listing = work / "test.txt"
    paths = sorted(str(p) for p in test.rglob("*.png"))
    listing.write_text("\n".join(paths) + "\n")
    truth = {p: Path(p).parent.name for p in paths}

    home = work / "home"
    runs = work / "runs"
    made = {
        "extract conv4 logreg": (runs / "feat", ["extract", str(train), "--layer", "conv4", "--head", "logreg",
                                                 "--out", str(runs / "feat"), "--force", "--quiet"]),
        "finetune --freeze conv4": (runs / "ft", ["finetune", str(train), "--freeze", "conv4", "--epochs", "3",
                                                  "--head-epochs", "1", "--out", str(runs / "ft"), "--force"]),
        "auto, 10 per class": (runs / "auto", ["auto", str(few), "--out", str(runs / "auto"), "--force", "--quiet"]),
    }
    results = {}
    for name, (run, command) in made.items():
        if not (run / "manifest.json").exists():
            started = time.perf_counter()
            cnnkit(*command, home=home)
            print(f"{name}: trained in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        reference = predictions(run, test, work / f"home-predict-{run.name}-default")
        rows = {"default engine": reference}
        for engine in ENGINES:
            rows[f"--engine {engine}"] = predictions(run, test, work / f"home-predict-{run.name}-{engine}", engine)
        for export in EXPORTS:
            rows[f"export {export}"] = exported(run, export, work, home, listing)
        results[name] = {
            what: {"agreement": sum(top[p] == reference[p] for p in paths) / len(paths),
                   "accuracy": sum(top[p] == truth[p] for p in paths) / len(paths)}
            for what, top in rows.items()}
    print(f"| run | predictions | top-1 agreement with `cnnkit predict --model RUN` | accuracy |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        for what, scores in rows.items():
            print(f"| {name} | {what} | {scores['agreement']:.4f} | {scores['accuracy']:.3f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"images": len(paths), "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Images/s of `cnnkit predict --model RUN` in one process against `--cluster local` with 1 and 2 workers.

    python bench/cluster.py --run /tmp/scale-run --images sample_data/fashion --variants 4 --json docs/cluster.json

The images are the folder's files and, with ``--variants``, mirrored and rotated copies of them
(distinct contents, so the one-process baseline's feature cache cannot answer any from memory);
each measurement starts from an empty feature cache. For every setting: wall time from the call
to the written table, the steady rate (rows after the first block over the time after it), and
the overhead (wall time less the images at the steady rate: starting Ray and the workers,
loading the run, building the engine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps


def make_images(folder: Path, out: Path, variants: int) -> list[Path]:
    """The folder's images and up to 3 transformed copies of each, as PNG files under ``out``."""
    from cnnkit.data import find_images

    paths, _ = find_images([folder])
    made = []
    transforms = [lambda i: i, ImageOps.mirror, lambda i: i.rotate(90), lambda i: i.rotate(180)][:variants]
    for n, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        for v, transform in enumerate(transforms):
            target = out / f"{n:05d}-{v}.png"
            transform(image).save(target)
            made.append(target)
    return made


def timed(fn) -> dict:
    """Run ``fn(progress)``; the wall time and the steady rate after the first progress report."""
    marks: list[tuple[float, int]] = []
    started = time.perf_counter()
    fn(lambda done, total: marks.append((time.perf_counter(), done)))
    wall = time.perf_counter() - started
    marks = [m for m in marks if m[1] > 0]
    first, last = marks[0], marks[-1]
    steady = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")
    images = last[1]
    return {"images": images, "wall_s": round(wall, 2), "images_per_s": round(images / wall, 1),
            "steady_images_per_s": round(steady, 1), "overhead_s": round(wall - images / steady, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--images", default="sample_data/fashion")
    parser.add_argument("--variants", type=int, default=4, choices=range(1, 5))
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--engine", default="onnx")
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ["CNNKIT_ENGINE"] = args.engine  # what `auto` means, in this process and on the workers

    from cnnkit.cluster import predict_on_cluster
    from cnnkit.paths import cache_dir
    from cnnkit.predict import predict_run

    scratch = Path(tempfile.mkdtemp(prefix="cnnkit-bench-cluster-"))
    (scratch / "images").mkdir()
    images = make_images(Path(args.images), scratch / "images", args.variants)
    features = cache_dir() / "features"
    predict_run(images[:8], args.run)  # the engine's conversion, cached once for every setting below
    results = {"images": len(images), "engine": args.engine, "cpus": os.cpu_count(),
               "load_average_before": os.getloadavg()}

    shutil.rmtree(features, ignore_errors=True)
    results["one_process"] = timed(lambda progress: predict_run(images, args.run, progress=progress))
    print("one process", results["one_process"], flush=True)
    for workers in (int(w) for w in args.workers.split(",")):
        shutil.rmtree(features, ignore_errors=True)
        results[f"cluster_{workers}"] = timed(lambda progress: predict_on_cluster(
            images, args.run, scratch / f"out-{workers}", workers=workers, progress=progress))
        print(f"--cluster local --workers {workers}", results[f"cluster_{workers}"], flush=True)
    results["load_average_after"] = os.getloadavg()
    shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Experiments behind `cnnkit advise`'s thresholds: the signals on data far from and close to ImageNet.

Far: Fashion-MNIST at several sizes, and scikit-learn's 8x8 digits. Close:
crops of natural photos (scikit-image's and scikit-learn's sample photos),
one class per photo. Prints each dataset's measurements and chosen cell.

    python bench/advise_thresholds.py --out /tmp/advise-bench --json docs/advise_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import write_image_folder  # noqa: E402


def photo_crops(out: Path, per_class: int = 20) -> Path:
    """Random square crops of natural photos, a class per photo."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(skimage.data, name)() for name in ("chelsea", "coffee", "rocket", "astronaut")}
    photos["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    for name, array in zip(("china", "flower"), load_sample_images().images):
        photos[name] = array
    rng = np.random.default_rng(0)
    for name, array in photos.items():
        image = Image.fromarray(array).convert("RGB")
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        w, h = image.size
        for i in range(per_class):
            side = int(min(w, h) * rng.uniform(0.4, 0.9))
            left, top = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
            image.crop((left, top, left + side, top + side)).save(folder / f"{i:03d}.png")
    return out


def digits(out: Path) -> Path:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for k, (image, label) in enumerate(zip(bunch.images, bunch.target)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((32, 32), Image.NEAREST).save(folder / f"{k:04d}.png")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-advise-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CNNKIT_HOME", str(args.out / "cache"))
    from cnnkit.advise import advise

    datasets = {}
    for size in (10, 100, 1000):
        folder = args.out / f"fashion-{size}"
        if not folder.exists():
            write_image_folder(folder, "train", size, seed=2)
        datasets[f"Fashion-MNIST {size}/class"] = folder
    if not (args.out / "digits").exists():
        digits(args.out / "digits")
    datasets["sklearn digits (~180/class)"] = args.out / "digits"
    if not (args.out / "photos").exists():
        photo_crops(args.out / "photos")
    datasets["natural photo crops 20/class"] = args.out / "photos"

    results = {}
    for name, folder in datasets.items():
        advice = advise(folder, per_class=20)
        row = {"shift": advice.similarity["shift"]["mean"],
               "imagenet_top1": advice.similarity.get("imagenet_classifier", {}).get("top1"),
               "probes": advice.probes, "cell": advice.cell, "strategy": advice.strategy,
               "layer": advice.layer, "freeze": advice.freeze, "seconds": advice.seconds}
        results[name] = row
        probes = ", ".join(f"{k} {v:.3f}" for k, v in advice.probes.items())
        print(f"{name:32s} shift {row['shift']:.3f}  top1 {row['imagenet_top1']:.3f}  probes {probes}  "
              f"-> {advice.cell['data']}/{advice.cell['domain']} {advice.strategy} "
              f"{advice.layer or advice.freeze or ''}  ({advice.seconds:.0f}s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""A small natural-photo task without a download: which photo is this crop from?

Ten photos shipped by scikit-image and scikit-learn, one class each. Training
crops come from the left 60 % of each photo and test crops from the right
40 %, so no test pixel was seen in training; crop sides are 25-45 % of the
photo's shorter side, so a crop shows a part of the scene, not all of it.
The check that a change for Fashion-MNIST does not make natural photos worse.

    python bench/photo_crops.py OUT --per-class 10 --seed 1 --split train
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    found = {name: getattr(skimage.data, name)() for name in
             ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera", "coins")}
    found.update(motorcycle=skimage.data.stereo_motorcycle()[0], china=china, flower=flower)
    return found


def write_crops(out: Path, split: str, per_class: int, seed: int = 0) -> Path:
    """``per_class`` crops of every photo into ``out/<photo>/``; ``split`` picks the photo's region."""
    rng = np.random.default_rng(seed)
    for name, array in sorted(photos().items()):
        image = Image.fromarray(array).convert("RGB")
        w, h = image.size
        x0, x1 = (0, int(w * 0.6)) if split == "train" else (int(w * 0.6), w)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = min(int(min(w, h) * rng.uniform(0.25, 0.45)), x1 - x0)
            left, top = rng.integers(x0, x1 - side + 1), rng.integers(0, h - side + 1)
            image.crop((left, top, left + side, top + side)).save(folder / f"{i:03d}.png")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_crops(args.out, args.split, args.per_class, args.seed)
    print(f"wrote {args.per_class} crops of 10 photos to {args.out}")


if __name__ == "__main__":
    main()

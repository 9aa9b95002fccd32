"""Grad-CAM on a 2x2 collage of the sample photos: each class's heat-map mass per quadrant (docs/see.md).

The four sample photos (cat, rocket, motorcycle, espresso), each centre-cropped
to a square and resized to 300 px, one per quadrant; `cnnkit explain` without
--model (EfficientNet-Lite0's ImageNet classifier) and --class set to each
photo's ImageNet class index; the share of the heat map's mass (the .npy, in
the collage's 600 x 600 grid) in each quadrant.

    python bench/explain_collage.py --out /tmp/collage
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = Path(__file__).resolve().parents[1] / "sample_data" / "photos"
# (file, ImageNet class index, its name): each photo's top-1 class alone.
CLASSES = [("cat.png", 282, "tiger cat"), ("rocket.jpg", 657, "missile"), ("motorcycle.png", 665, "moped"),
           ("coffee.png", 967, "espresso")]
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-collage"))
    parser.add_argument("--side", type=int, default=300)
    args = parser.parse_args()
    side = args.side
    args.out.mkdir(parents=True, exist_ok=True)
    collage = Image.new("RGB", (2 * side, 2 * side))
    for quadrant, (name, _, _) in enumerate(CLASSES):
        image = Image.open(PHOTOS / name).convert("RGB")
        short = min(image.size)
        left, top = (image.width - short) // 2, (image.height - short) // 2
        image = image.crop((left, top, left + short, top + short)).resize((side, side))
        collage.paste(image, ((quadrant % 2) * side, (quadrant // 2) * side))
    collage.save(args.out / "collage.png")
    cnnkit = Path(sys.executable).with_name("cnnkit")
    print("| photo (quadrant) | --class | " + " | ".join(QUADRANTS) + " |")
    print("|---|---|" + "---|" * len(QUADRANTS))
    for quadrant, (name, index, label) in enumerate(CLASSES):
        done = subprocess.run([str(cnnkit), "explain", str(args.out / "collage.png"), "--class", str(index),
                               "--out", str(args.out / Path(name).stem), "--json"],
                              capture_output=True, text=True, check=True)
        heat = np.load(json.loads(done.stdout)[0]["heatmap"])
        mass = np.array([heat[:side, :side].sum(), heat[:side, side:].sum(), heat[side:, :side].sum(),
                         heat[side:, side:].sum()])
        shares = mass / mass.sum()
        cells = [f"**{s:.3f}**" if i == int(np.argmax(shares)) else f"{s:.3f}" for i, s in enumerate(shares)]
        verdict = "" if int(np.argmax(shares)) == quadrant else " (WRONG)"
        print(f"| {Path(name).stem} ({QUADRANTS[quadrant]}){verdict} | {index} {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

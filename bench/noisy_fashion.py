"""A dirty Fashion-MNIST dataset with known faults: what `cnnkit doctor` is measured on.

``make_noisy(out, seed)`` writes ``out/train`` and ``out/test`` (folder per class, PNG) and
``out/truth.json`` listing every planted fault:

- ``flipped``: 10 % of the training images moved to another class (uniformly random);
- ``leaks``: 20 test images copied into train, each re-encoded as JPEG, resized,
  shifted by a few pixels, slightly cropped or brightened (``leak_kinds``);
- ``duplicates``: 10 training images copied byte for byte under another name in train;
- ``foreign``: 10 photos of scikit-image (no garment) dropped into random classes.

Example::

    python bench/noisy_fashion.py /tmp/noisy --seed 0 --per-class 100
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import CLASS_NAMES, load_idx  # noqa: E402

LEAK_KINDS = ("jpeg", "resize", "shift", "crop", "brighten")
FOREIGN = ("astronaut", "camera", "coffee", "chelsea", "rocket", "horse", "moon", "page", "clock", "coins",
           "immunohistochemistry", "hubble_deep_field", "retina", "logo", "text", "brick", "grass", "gravel")


def leaked_copy(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """A test image as it might reach the training folder again: (file bytes, suffix)."""
    picture = Image.fromarray(image)
    if kind == "jpeg":
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=int(rng.integers(70, 95)))
        return buffer.getvalue(), ".jpg"
    if kind == "resize":
        side = int(rng.choice([20, 24, 36, 42, 56, 84]))
        picture = picture.resize((side, side), Image.Resampling.BILINEAR)
    elif kind == "shift":
        dy, dx = (int(v) for v in rng.integers(-3, 4, size=2))
        if dy == dx == 0:
            dx = 2
        shifted = np.zeros_like(image)
        src = image[max(0, -dy):28 - max(0, dy), max(0, -dx):28 - max(0, dx)]
        shifted[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
        picture = Image.fromarray(shifted)
    elif kind == "crop":
        margin = int(rng.integers(1, 4))
        picture = picture.crop((margin, margin, 28 - margin, 28 - margin)).resize((28, 28), Image.Resampling.BICUBIC)
    elif kind == "brighten":
        picture = ImageEnhance.Brightness(picture).enhance(float(rng.uniform(1.15, 1.4)))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue(), ".png"


def make_noisy(out: Path, seed: int = 0, per_class: int = 100, test_per_class: int = 100,
               flip: float = 0.1, leaks: int = 20, duplicates: int = 10, foreign: int = 10) -> dict:
    import skimage.data

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(seed)
    train_images, train_labels = load_idx("train")
    test_images, test_labels = load_idx("test")
    truth = {"flipped": {}, "leaks": {}, "duplicates": {}, "foreign": [], "seed": seed}

    def write(path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path.relative_to(out))

    def png(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        return buffer.getvalue()

    test_rows = [i for c in range(10) for i in rng.permutation(np.flatnonzero(test_labels == c))[:test_per_class]]
    test_names = []
    for n, i in enumerate(test_rows):
        test_names.append(write(out / "test" / CLASS_NAMES[test_labels[i]] / f"t{n:05d}.png", png(test_images[i])))
    train_rows = [i for c in range(10) for i in rng.permutation(np.flatnonzero(train_labels == c))[:per_class]]
    flipped = set(rng.choice(len(train_rows), int(round(flip * len(train_rows))), replace=False).tolist())
    train_names = []
    for n, i in enumerate(train_rows):
        label = int(train_labels[i])
        given = int((label + rng.integers(1, 10)) % 10) if n in flipped else label
        name = write(out / "train" / CLASS_NAMES[given] / f"{n:05d}.png", png(train_images[i]))
        train_names.append(name)
        if n in flipped:
            truth["flipped"][name] = {"given": CLASS_NAMES[given], "true": CLASS_NAMES[label]}
    for n, t in enumerate(rng.choice(len(test_rows), leaks, replace=False)):
        kind = LEAK_KINDS[n % len(LEAK_KINDS)]
        data, suffix = leaked_copy(test_images[test_rows[t]], kind, rng)
        name = write(out / "train" / CLASS_NAMES[test_labels[test_rows[t]]] / f"leak{n:03d}{suffix}", data)
        truth["leaks"][name] = {"test": test_names[t], "kind": kind}
    clean = [k for k in range(len(train_names)) if k not in flipped]
    for n, k in enumerate(rng.choice(clean, duplicates, replace=False)):
        source = out / train_names[k]
        name = write(source.parent / f"copy{n:03d}.png", source.read_bytes())
        truth["duplicates"][name] = train_names[k]
    for n, photo in enumerate(rng.choice(FOREIGN, foreign, replace=False)):
        image = np.asarray(getattr(skimage.data, str(photo))())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        picture = Image.fromarray(image[..., :3].astype(np.uint8))
        picture.thumbnail((int(rng.choice([28, 64, 128])),) * 2)
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        truth["foreign"].append(write(out / "train" / str(rng.choice(CLASS_NAMES)) / f"photo_{photo}.png",
                                      buffer.getvalue()))
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()
    truth = make_noisy(args.out, args.seed, args.per_class)
    print({k: len(v) for k, v in truth.items() if k != "seed"})


if __name__ == "__main__":
    main()

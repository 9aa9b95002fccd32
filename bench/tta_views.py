"""Which test-time views help a feature head, and whether fitting it on those views helps (docs/see.md).

Computes the features (Lite0, every stage, 3 x 3 grid below the last, mirror-averaged: auto's
little-data features) of 20 views of a Fashion-MNIST subset's training images and of the shared test
images (bench/fashion_mnist.py subset_folder): the whole image; the centre and four corners cropped
to 95 %, 90 % and 85 %; and four shifts by 1/14 of the side. Then, on conv4 + top:

- a logistic head fitted on whole images (``fit_head``, as `extract` fits it), tested on each view
  set's mean probabilities;
- the same head fitted on every view of every training image (the views as extra rows), tested
  plain and on the mean of the same views;
- a head fitted on each image's views' mean features, tested the same way.

    python bench/tta_views.py --per-class 100 --seed 0 --out /tmp/tta

Slow: 20 forward passes of every image (about 14 s per view per 1,000 images on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

PLACES = ((0.5, 0.5), (0, 0), (0, 1), (1, 0), (1, 1))


def view_boxes() -> tuple[list[tuple], list[str]]:
    boxes, names = [(0.0, 0.0, 1.0, 1.0)], ["whole"]
    for scale in (0.95, 0.9, 0.85):
        for top, left in PLACES:
            y1, x1 = top * (1 - scale), left * (1 - scale)
            boxes.append((y1, x1, y1 + scale, x1 + scale))
            names.append(f"zoom{scale}@{top},{left}")
    shift = 1 / 14
    for dy, dx in ((shift, 0), (-shift, 0), (0, shift), (0, -shift)):
        boxes.append((dy, dx, 1 + dy, 1 + dx))  # outside the image: black, as Fashion-MNIST's background
        names.append(f"shift{dy:+.2f},{dx:+.2f}")
    return boxes, names


def view_features(samples, extractor, size: int, boxes, keys) -> np.ndarray:
    """(views, images, dims) features of ``keys`` of every view of ``samples``."""
    import tensorflow as tf

    from cnnkit.data.images import load_image

    images = np.stack([load_image(s.path, size) for s in samples])
    found = []
    for box in boxes:
        rows = []
        for start in range(0, len(images), 64):
            batch = images[start:start + 64]
            if box != (0.0, 0.0, 1.0, 1.0):
                tiled = tf.tile(tf.constant([box], tf.float32), [len(batch), 1])
                batch = tf.image.crop_and_resize(tf.convert_to_tensor(batch, tf.float32), tiled,
                                                 tf.range(len(batch)), (size, size))
                batch = np.clip(np.rint(batch.numpy()), 0, 255).astype(np.uint8)
            out = extractor(batch)
            rows.append(np.concatenate([out[k] for k in keys], axis=1))
        found.append(np.concatenate(rows))
    return np.stack(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/tta-views"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from fashion_mnist import subset_folder

    from cnnkit.data import load_dataset
    from cnnkit.features import FeatureConfig, FeatureExtractor
    from cnnkit.heads import fit_head

    root = subset_folder(args.out / "fm", args.per_class, args.seed)
    dataset = load_dataset(root)
    config = FeatureConfig("efficientnet_lite0", "imagenet", None, "avg", True, 3, "float32").resolved()
    extractor = FeatureExtractor(config, "onnx")
    keys = [extractor.spec.stage_key("conv4"), extractor.spec.stage_key("top")]
    boxes, names = view_boxes()
    started = time.perf_counter()
    x = {split: view_features(dataset.splits[split], extractor, config.image_size, boxes, keys)
         for split in ("train", "test")}
    y = {split: np.array([s.label for s in dataset.splits[split]]) for split in ("train", "test")}
    print(f"features of {len(boxes)} views: {time.perf_counter() - started:.0f} s")

    def accuracy(probabilities) -> float:
        return float(np.mean(probabilities.argmax(axis=1) == y["test"]))

    sets = {"none": [0], "zoom95": list(range(0, 6)), "zoom90": [0, *range(6, 11)], "zoom85": [0, *range(11, 16)],
            "centre95": [0, 1], "centre90": [0, 6], "shift": [0, *range(16, 20)],
            "zoom95+shift": [*range(0, 6), *range(16, 20)], "all": list(range(20))}
    head = fit_head(x["train"][0], y["train"], "logreg", cv=5).pipeline
    per_view = np.stack([head.predict_proba(x["test"][v]) for v in range(len(boxes))])
    print("head fitted on whole images, each view alone:",
          " ".join(f"{n} {accuracy(per_view[i]):.3f}" for i, n in enumerate(names)))
    for name, chosen in sets.items():
        print(f"  mean of {name:13s} {accuracy(per_view[chosen].mean(axis=0)):.4f}")
    for name in ("zoom95", "zoom90", "shift", "zoom95+shift"):
        chosen = sets[name]
        rows = x["train"][chosen].reshape(-1, x["train"].shape[2])
        augmented = fit_head(rows, np.tile(y["train"], len(chosen)), "logreg", cv=5).pipeline
        views = np.stack([augmented.predict_proba(x["test"][v]) for v in chosen])
        averaged = fit_head(x["train"][chosen].mean(axis=0), y["train"], "logreg", cv=5).pipeline
        print(f"fitted on the {name} views: plain {accuracy(views[0]):.4f}, their mean {accuracy(views.mean(axis=0)):.4f};"
              f" on their mean features: {accuracy(averaged.predict_proba(x['test'][chosen].mean(axis=0))):.4f}")


if __name__ == "__main__":
    main()

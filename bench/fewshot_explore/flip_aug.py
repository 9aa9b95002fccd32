"""Flipped images as extra training rows instead of flip-averaged features (issue 14, item 1).

For each backbone, the head is trained on the original and the mirrored images' features (twice
the rows) and predicts the mean of both views' probabilities; against the head on flip-averaged
features. Mirrored features are recovered from the cache: flip-averaged = (original + mirrored) / 2.
Same subsets, test images and heads (standardised, logistic, C = 0.1) as ``members.py``.

    python bench/fewshot_explore/flip_aug.py /tmp/fewshot/quality

Measured (means over subsets 1-3; avg = flip-averaged features, rows = mirrored images as rows):

    n=10   L0 avg 0.787 rows 0.792   L0+L2 0.802 / 0.807   L0+L1 0.796 / 0.803   L0+L1+L2 0.810 / 0.811
    n=100  L0 avg 0.865 rows 0.866   L0+L2 0.873 / 0.875   L0+L1 0.876 / 0.876   L0+L1+L2 0.877 / 0.878
"""
import itertools
import os
import sys
from pathlib import Path

import numpy as np

root = Path(sys.argv[1])
os.environ.setdefault("CNNKIT_HOME", str(root / "cache"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from cnnkit.data import load_dataset  # noqa: E402
from cnnkit.features import FeatureConfig, compute_features  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

SIZES = [int(v) for v in os.environ.get("SIZES", "10,100").split(",")]
SEEDS = (1, 2, 3)
C = float(os.environ.get("C", "0.1"))
LAYERS = os.environ.get("LAYERS", "conv4,conv5").split(",")
BACKBONES = {"L0": ("efficientnet_lite0", None), "L1": ("efficientnet_lite1", 224), "L2": ("efficientnet_lite2", 224)}


def views(folder: Path, backbone: str, size):
    """(original, mirrored) features and labels."""
    samples = load_dataset(folder).splits["train"]
    out = []
    for flip in (False, True):
        table = compute_features([s.path for s in samples], FeatureConfig(backbone, image_size=size, flip=flip),
                                 engine="auto")
        out.append(np.concatenate([table.features[layer] for layer in LAYERS], axis=1))
    original, averaged = out
    return original, 2 * averaged - original, np.array([s.label for s in samples])[table.kept]


def head():
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))


test = {name: views(root / "test", *spec) for name, spec in BACKBONES.items()}
labels = test["L0"][2]
results = {}
for n, seed in itertools.product(SIZES, SEEDS):
    for name, spec in BACKBONES.items():
        o, m, y = views(root / f"n{n}-s{seed}" / "train", *spec)
        to, tm, _ = test[name]
        averaged = head().fit((o + m) / 2, y)
        results[n, seed, name, "avg"] = averaged.predict_proba((to + tm) / 2)
        both = head().fit(np.concatenate([o, m]), np.concatenate([y, y]))
        results[n, seed, name, "rows"] = (both.predict_proba(to) + both.predict_proba(tm)) / 2
for n in SIZES:
    for combo in (["L0"], ["L0", "L2"], ["L0", "L1"], ["L0", "L1", "L2"]):
        for kind in ("avg", "rows"):
            accs = [float(np.mean(sum(results[n, s, b, kind] for b in combo).argmax(1) == labels)) for s in SEEDS]
            print(f"n={n} {'+'.join(combo):10s} {kind:4s} {' '.join(f'{a:.3f}' for a in accs)} -> "
                  f"{np.mean(accs):.3f}", flush=True)

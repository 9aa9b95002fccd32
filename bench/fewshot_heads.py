"""Exploration: can another head, feature transform or training-view set lift `auto`'s few-shot ensemble? (issue 27)

On the subsets and test images of ``bench/quality_fewshot.py`` (its ``--out`` folder: ``test/``
and ``n{size}-s{seed}/train/``, written here if missing), with the features ``auto``'s
little-data plan computes (EfficientNet-Lite0 flip-averaged, Lite1 and Lite2 at 224 px, conv4
over 3 x 3 regions + top), scores variants of its ensemble of logistic heads (standardised
features, C = 0.1, probabilities averaged over the three backbones):

- ``base``: what ``auto`` runs; ``sqrt``: signed square root of every feature first (the power
  transform of few-shot papers); ``l2``: each stage's block L2-normalised first; ``conv3``:
  conv3 (3 x 3 regions) added; ``lda``: shrinkage LDA instead of the logistic head; ``svc``: an RBF
  SVC; ``concat``: one logistic head on the three backbones' features side by side;
- ``views``: Lite0 alone, its head fitted on the image plus four corner and centre crops at 90 % of
  the side (``cnnkit.extraction.view_features``, cached under ``$CNNKIT_HOME/views``), scored
  without and with those views averaged at test time, against the plain Lite0 head;
- ``pixels``: the ensemble plus an RBF SVC on the raw 28 px pixels at weight 0.5 and 1;
- ``--scratch RUN:KEY``: the ensemble averaged with a trained run's probabilities (e.g. ``cnnkit
  train DATA/n100-s1 --image-size 28 --time-limit 5``, KEY ``n100-s1``).

    CNNKIT_HOME=/tmp/fs/home python bench/fewshot_heads.py --out /tmp/fs/fm --variants base,sqrt,l2,conv3,lda,svc,concat,pixels,views

Features come from (and go to) the feature cache: the first run on new folders makes the forward
passes (about 10 minutes on two cores with the views), later runs only fit heads.
Needs: apt-get install dataset-fashion-mnist
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import write_image_folder  # noqa: E402

MEMBERS = ("L0fg", "L1g", "L2g")
VIEW_SCALE = 0.9


def configs():
    from cnnkit.features import FeatureConfig

    return {"L0fg": FeatureConfig("efficientnet_lite0", flip=True, grid=3),
            "L1g": FeatureConfig("efficientnet_lite1", image_size=224, grid=3),
            "L2g": FeatureConfig("efficientnet_lite2", image_size=224, grid=3)}


def folder_features(folder: Path, config) -> tuple[dict, np.ndarray, list[Path]]:
    from cnnkit.data import load_dataset
    from cnnkit.features import compute_features

    samples = load_dataset(folder).splits["train"]
    table = compute_features([s.path for s in samples], config, engine="auto")
    return table.features, np.array([s.label for s in samples])[table.kept], [samples[i].path for i in table.kept]


def stacked(features: dict, layers=("conv4", "conv5"), transform: str = "") -> np.ndarray:
    blocks = [np.asarray(features[layer], np.float64) for layer in layers]
    if transform == "sqrt":
        blocks = [np.sign(b) * np.sqrt(np.abs(b)) for b in blocks]
    if transform == "l2":
        blocks = [b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-8) * np.sqrt(b.shape[1]) for b in blocks]
    return np.concatenate(blocks, axis=1)


def head_probabilities(kind: str, x: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
    from scipy.special import softmax
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if kind == "lda":
        return make_pipeline(StandardScaler(), LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
                             ).fit(x, y).predict_proba(test)
    if kind == "svc":
        head = make_pipeline(StandardScaler(), SVC(C=10, gamma="scale")).fit(x, y)
        return softmax(head.decision_function(test), axis=1)
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000)).fit(x, y).predict_proba(test)


def pixels(paths) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("L"), np.float32).ravel() / 255 for p in paths])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fs/fm"), help="quality_fewshot.py's folder")
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variants", default="base,sqrt,l2,conv3,lda,svc,concat,pixels,views")
    parser.add_argument("--scratch", action="append", default=[], help="RUN:KEY, e.g. runs/scr1:n100-s1")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", category=FutureWarning)
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    if not (args.out / "test").exists():
        write_image_folder(args.out / "test", "test", 200, seed=0)
    keys = [f"n{n}-s{s}" for n, s in itertools.product(sizes, seeds)]
    for key in keys:
        n, s = key[1:].split("-s")
        if not (args.out / key / "train").exists():
            write_image_folder(args.out / key / "train", "train", int(n), seed=int(s))
    cfg = configs()
    feats = {(m, key): folder_features(args.out / key / "train", cfg[m]) for m in MEMBERS for key in keys}
    tests = {m: folder_features(args.out / "test", cfg[m]) for m in MEMBERS}
    labels = tests[MEMBERS[0]][1]

    def ensemble(key: str, kind: str = "logreg", transform: str = "", layers=("conv4", "conv5")) -> np.ndarray:
        return sum(head_probabilities(kind, stacked(feats[m, key][0], layers, transform), feats[m, key][1],
                                      stacked(tests[m][0], layers, transform)) for m in MEMBERS) / len(MEMBERS)

    def accuracy(p: np.ndarray) -> float:
        return float(np.mean(p.argmax(1) == labels))

    if "pixels" in variants:
        test_pixels = pixels(tests[MEMBERS[0]][2])
    if "views" in variants:
        from cnnkit.extraction import view_features
        from cnnkit.tta import TTA

        boxes = TTA((1.0, VIEW_SCALE), False).boxes()[1:]
        lite0 = cfg["L0fg"].resolved()
        # The test images plain, then each view: one head scores them all in one call.
        test_sets = [stacked(tests["L0fg"][0])] + [stacked(v) for v in view_features(
            tests["L0fg"][2], boxes, lite0, "auto").values()]

    scores: dict = {}
    for key in keys:
        n = key.split("-")[0]
        base = ensemble(key)
        add = lambda name, value: scores.setdefault((n, name), []).append(value)  # noqa: E731
        add("base", accuracy(base))
        if "sqrt" in variants:
            add("sqrt", accuracy(ensemble(key, transform="sqrt")))
        if "l2" in variants:
            add("l2", accuracy(ensemble(key, transform="l2")))
        if "conv3" in variants:
            add("conv3", accuracy(ensemble(key, layers=("conv3", "conv4", "conv5"))))
        for kind in ("lda", "svc"):
            if kind in variants:
                add(kind, accuracy(ensemble(key, kind)))
        if "concat" in variants:
            side = lambda fs: np.concatenate([stacked(f) for f in fs], axis=1)  # noqa: E731
            add("concat", accuracy(head_probabilities("logreg", side([feats[m, key][0] for m in MEMBERS]),
                                                      feats[MEMBERS[0], key][1], side([tests[m][0] for m in MEMBERS]))))
        if "pixels" in variants:
            from sklearn.svm import SVC

            train_paths = feats[MEMBERS[0], key][2]
            svc = SVC(C=10, gamma="scale", probability=True, random_state=0).fit(pixels(train_paths), feats[MEMBERS[0], key][1])
            p = svc.predict_proba(test_pixels)
            add("pixel SVC alone", accuracy(p))
            for w in (0.5, 1.0):
                add(f"base + pixels x{w}", accuracy(base + w * p))
        if "views" in variants:
            x, y, paths = feats["L0fg", key]
            rows = np.concatenate([stacked(x)] + [stacked(v) for v in view_features(paths, boxes, lite0, "auto").values()])
            for name, (fit_x, fit_y) in {"Lite0 plain head": (stacked(x), y),
                                         "Lite0 head on views": (rows, np.tile(y, 1 + len(boxes)))}.items():
                plain, *viewed = np.split(head_probabilities("logreg", fit_x, fit_y, np.concatenate(test_sets)),
                                          len(test_sets))
                add(name, accuracy(plain))
                add(name + ", views averaged at test", accuracy(plain + sum(viewed)))
        for spec in args.scratch:
            run, run_key = spec.rsplit(":", 1)
            if run_key != key:
                continue
            from cnnkit.evaluation import evaluate_run

            evaluation = evaluate_run(run, args.out / "test")
            assert (evaluation.labels == labels).all()
            add(f"network {Path(run).name} alone", accuracy(evaluation.probabilities))
            for w in (0.25, 0.33, 0.5):
                add(f"base + network at {w}", accuracy((1 - w) * base + w * evaluation.probabilities))
        print(key, {name: round(v[-1], 4) for (size, name), v in scores.items() if size == n}, flush=True)
    for (n, name), values in scores.items():
        print(f"{n:5s} {name:42s} {' '.join(f'{v:.4f}' for v in values)} -> {np.mean(values):.4f}")


if __name__ == "__main__":
    main()

"""A second backbone's features beside EfficientNet-Lite0's (issue 14, item 1): concatenated, or two heads averaged.

Features must be in the cache first (``feats.py efficientnet_lite0 0 1`` and
``feats.py efficientnet_lite2 0 0``). Logistic regression, C=0.1, standardised
features, the three random subsets of ``prep.py``, their test images.

    FS_ROOT=/tmp/fewshot/fm CNNKIT_HOME=/tmp/fewshot/home N=100 python bench/fewshot_explore/partner.py

Measured (2,000 test images; per subset, then the mean):

    N=10   Lite0 c4+top (flip) 0.773 0.783 0.804 -> 0.787   Lite2 c4+top 0.770 0.782 0.782 -> 0.778
           concatenated 0.788 0.792 0.818 -> 0.800          averaged heads 0.788 0.796 0.809 -> 0.798
    N=100  Lite0 0.860 0.866 0.864 -> 0.863                 Lite2 0.854 0.850 0.852 -> 0.852
           concatenated 0.872 0.872 0.868 -> 0.871          averaged heads 0.875 0.870 0.866 -> 0.870
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from explore import ROOT, FeatureConfig, feats, np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

N = int(os.environ.get("N", "100"))
configs = {"l0": FeatureConfig("efficientnet_lite0", flip=True), "l2": FeatureConfig("efficientnet_lite2")}
data = {}
for name, config in configs.items():
    data[name] = {"test": feats(ROOT / "test", config)}
    for seed in (1, 2, 3):
        data[name][seed] = feats(ROOT / f"s{seed}" / f"n{N}" / "train", config)


def stack(parts, key):
    return np.concatenate([data[name][key][0]["conv5" if layer == "top" else layer]
                           for name, layers in parts for layer in layers], axis=1)


def head():
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))


labels = data["l0"]["test"][1]
variants = {"Lite0 c4+top": [("l0", ["conv4", "top"])], "Lite2 c4+top": [("l2", ["conv4", "top"])],
            "concatenated": [("l0", ["conv4", "top"]), ("l2", ["conv4", "top"])]}
for label, parts in variants.items():
    accs = [float(np.mean(head().fit(stack(parts, s), data["l0"][s][1]).predict(stack(parts, "test")) == labels))
            for s in (1, 2, 3)]
    print(f"N={N} {label}: {' '.join(f'{a:.3f}' for a in accs)} -> {np.mean(accs):.3f}", flush=True)
members = variants["concatenated"]
accs = []
for s in (1, 2, 3):
    probabilities = sum(head().fit(stack([m], s), data["l0"][s][1]).predict_proba(stack([m], "test")) for m in members)
    accs.append(float(np.mean(probabilities.argmax(1) == labels)))
print(f"N={N} averaged heads: {' '.join(f'{a:.3f}' for a in accs)} -> {np.mean(accs):.3f}", flush=True)

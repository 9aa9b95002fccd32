"""Which members should `auto`'s little-data ensemble average? (issue 14, item 1)

Scores, on the subsets and test images of ``bench/quality_fewshot.py`` (its ``--out`` folder),
averages of logistic heads (standardised features, C = 0.1, as `auto`'s ensemble members) over
several backbones' conv4+top features, flip-averaged or not. Features come from (and go to)
the feature cache of that folder, so a second run does no forward pass.

    python bench/fewshot_explore/members.py /tmp/fewshot/quality

Measured (2,000 test images, subsets 1 / 2 / 3, then the mean; f = flip-averaged; partners at 224 px):

    n=10   L0f 0.787   L0f+L1 0.791   L0f+L2 0.802   L0f+L1+L2 0.801 0.797 0.820 -> 0.806
           L0f+L1f+L2f 0.800 0.803 0.826 -> 0.810
    n=100  L0f 0.865   L0f+L1 0.875   L0f+L2 0.871   L0f+L1+L2 0.876 0.877 0.874 -> 0.876
           L0f+L1f+L2f 0.877 0.877 0.877 -> 0.877
    C=0.05 / 0.2 or LAYERS=conv3,conv4,conv5 at n=100: every three-member form within 0.875-0.878
    conv4 over 3 x 3 regions (g: --grid 3; CONFIGS=L0f,L1,L2,L0fg,L1g,L2g):
    n=10   L0fg 0.807 0.801 0.827 -> 0.812   L0fg+L1g+L2g 0.820 0.803 0.828 -> 0.817
    n=100  L0fg 0.882 0.883 0.873 -> 0.880   L0fg+L1g+L2g 0.891 0.890 0.887 -> 0.889
"""
import itertools
import os
import sys
import time
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
CONFIGS = {"L0f": FeatureConfig("efficientnet_lite0", flip=True),
           "L1": FeatureConfig("efficientnet_lite1", image_size=224),
           "L1f": FeatureConfig("efficientnet_lite1", image_size=224, flip=True),
           "L2": FeatureConfig("efficientnet_lite2", image_size=224),
           "L2f": FeatureConfig("efficientnet_lite2", image_size=224, flip=True),
           # conv4 over 3 x 3 regions (--grid 3)
           "L0fg": FeatureConfig("efficientnet_lite0", flip=True, grid=3),
           "L1g": FeatureConfig("efficientnet_lite1", image_size=224, grid=3),
           "L2g": FeatureConfig("efficientnet_lite2", image_size=224, grid=3)}
CONFIGS = {k: v for k, v in CONFIGS.items() if k in os.environ.get("CONFIGS", ",".join(CONFIGS)).split(",")}


def features(folder: Path, config: FeatureConfig):
    samples = load_dataset(folder).splits["train"]
    started = time.perf_counter()
    table = compute_features([s.path for s in samples], config, engine="auto")
    if table.computed:
        print(f"  computed {table.computed} {config.backbone} flip={config.flip} in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    x = np.concatenate([table.features[layer] for layer in LAYERS], axis=1)
    return x, np.array([s.label for s in samples])[table.kept]


test = {name: features(root / "test", config) for name, config in CONFIGS.items()}
probabilities = {}
for n, seed in itertools.product(SIZES, SEEDS):
    for name, config in CONFIGS.items():
        x, y = features(root / f"n{n}-s{seed}" / "train", config)
        head = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000)).fit(x, y)
        probabilities[n, seed, name] = head.predict_proba(test[name][0])
labels = next(iter(test.values()))[1]
names = list(CONFIGS)
combos = [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)
          if len({m[:2] for m in c}) == len(c)]  # one form of each backbone
for n in SIZES:
    rows = []
    for combo in combos:
        accs = [float(np.mean(sum(probabilities[n, s, m] for m in combo).argmax(1) == labels)) for s in SEEDS]
        rows.append((np.mean(accs), combo, accs))
    for mean, combo, accs in sorted(rows, reverse=True):
        print(f"n={n} {'+'.join(combo):16s} {' '.join(f'{a:.3f}' for a in accs)} -> {mean:.3f}", flush=True)

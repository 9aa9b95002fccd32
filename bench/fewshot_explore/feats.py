"""Compute (cache) features for every image under /tmp/fewshot/fm for one config."""
import os, sys, time
os.environ.setdefault("CNNKIT_HOME", "/tmp/fewshot/home")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from pathlib import Path
from cnnkit.features import FeatureConfig, compute_features
backbone, size, flip = sys.argv[1], int(sys.argv[2]) if sys.argv[2] != "0" else None, sys.argv[3] == "1"
root = Path(os.environ.get("FS_ROOT", "/tmp/fewshot/fm"))
paths = sorted(p for p in root.rglob("*.png") if "/n10/" not in str(p) and "/test/" not in str(p)) + sorted((root/"test").rglob("*.png"))
if len(sys.argv) > 4: paths = paths[: int(sys.argv[4])]
t = time.perf_counter()
table = compute_features(paths, FeatureConfig(backbone, image_size=size, flip=flip), 32)
dt = time.perf_counter() - t
print(f"{backbone} {size} flip={flip}: {len(paths)} images, computed {table.computed}, {dt:.1f}s, {table.computed/dt:.1f} img/s", flush=True)

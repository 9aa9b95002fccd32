import os
import sys, numpy as np
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fashion_mnist import load_idx, write_image_folder, CLASS_NAMES
from PIL import Image
root = Path(os.environ.get("FS_ROOT", "/tmp/fewshot/fm"))
if not (root/"test").exists():
    write_image_folder(root/"test", "test", 200, seed=0)
used = {c: set() for c in range(10)}
images, labels = load_idx("train")
for s in (1, 2, 3):
    rng = np.random.default_rng(s)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))[:100]
        used[c] |= set(idx.tolist())
    for n in (10, 100):
        d = root/f"s{s}"/f"n{n}"/"train"
        if not d.exists():
            write_image_folder(d, "train", n, seed=s)
        t = root/f"s{s}"/f"n{n}"/"test"
        if not t.exists():
            t.symlink_to(root/"test")
dev = root/"dev"
if not dev.exists():
    rng = np.random.default_rng(1234)
    for c, name in enumerate(CLASS_NAMES):
        pool = np.array([i for i in np.flatnonzero(labels == c) if i not in used[c]])
        (dev/name).mkdir(parents=True)
        for k, i in enumerate(rng.permutation(pool)[:100]):
            Image.fromarray(images[i]).save(dev/name/f"{k:03d}.png")
print("ok")

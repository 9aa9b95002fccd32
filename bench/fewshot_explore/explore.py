"""Head experiments on cached features: dev + test accuracy per subset."""
import os, sys, time, json, warnings
os.environ.setdefault("CNNKIT_HOME", "/tmp/fewshot/home")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore")
import numpy as np
from pathlib import Path
from cnnkit.features import FeatureConfig, compute_features
from cnnkit.data import load_dataset

ROOT = Path(os.environ.get("FS_ROOT", "/tmp/fewshot/fm"))
SIZES = tuple(int(v) for v in os.environ.get("FS_SIZES", "10,100").split(","))

def feats(folder, config):
    ds = load_dataset(folder)
    s = ds.splits["train"]
    t = compute_features([x.path for x in s], config, use_cache=True)
    assert t.computed == 0, t.computed
    y = np.array([x.label for x in s])[t.kept]
    return t.features, y

def load_all(config):
    out = {"test": feats(ROOT / "test", config)}
    out["dev"] = feats(ROOT / "dev", config) if (ROOT / "dev").exists() else out["test"]
    for s in (1, 2, 3):
        for n in SIZES:
            out[(s, n)] = feats(ROOT / f"s{s}" / f"n{n}" / "train", config)
    return out

def stack(f, layers):
    return np.concatenate([f["conv5" if l == "top" else l] for l in layers], axis=1)

def run(configs, heads, sizes=SIZES):
    data = {name: load_all(cfg) for name, cfg in configs.items()}
    rows = []
    for cname, d in data.items():
        for hname, fn in heads.items():
            for n in sizes:
                res = []
                for s in (1, 2, 3):
                    ftr, ytr = d[(s, n)]
                    t0 = time.perf_counter()
                    predict = fn(ftr, ytr)
                    dt = time.perf_counter() - t0
                    accs = [float(np.mean(predict(d[k][0]) == d[k][1])) for k in ("dev", "test")]
                    res.append(accs + [dt])
                r = np.array(res)
                print(f"{cname:14s} {hname:28s} n={n:3d} dev {r[:,0].mean():.3f}±{r[:,0].std():.3f} "
                      f"test {r[:,1].mean():.3f}±{r[:,1].std():.3f} [{' '.join(f'{v:.3f}' for v in r[:,1])}] {r[:,2].mean():.1f}s",
                      flush=True)
                rows.append({"config": cname, "head": hname, "n": n, "dev": r[:,0].tolist(), "test": r[:,1].tolist()})
    return rows

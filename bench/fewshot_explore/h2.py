import sys; sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from explore import *
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, Normalizer
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis as LDA
from sklearn.neighbors import NearestCentroid
from cnnkit.heads import fit_head

def cv(layers, head="logreg", pca=None, l2=False):
    def fit(f, y):
        fh = fit_head(stack(f, layers), y, head, pca, l2_normalize=l2, n_jobs=1)
        fit.params = fh.best_params
        return lambda f2: fh.pipeline.predict(stack(f2, layers))
    return fit

def fixed(layers, make, l2=False, rot=True):
    def fit(f, y):
        x = stack(f, layers)
        steps = ([Normalizer()] if l2 else []) + [StandardScaler()] + ([PCA(svd_solver="full")] if rot else []) + [make()]
        p = make_pipeline(*steps).fit(x, y)
        fit.p = p
        return lambda f2: p.predict(stack(f2, layers))
    return fit

def avg(*members):
    def fit(f, y):
        ps = []
        for layers, make in members:
            ps.append((layers, make_pipeline(StandardScaler(), PCA(svd_solver="full"), make()).fit(stack(f, layers), y)))
        return lambda f2: np.argmax(sum(p.predict_proba(stack(f2, l)) for l, p in ps), axis=1)
    return fit

LR = lambda C: (lambda: LogisticRegression(C=C, max_iter=3000, class_weight="balanced"))
LDAs = lambda: LDA(solver="lsqr", shrinkage="auto")
heads = {
  "top lr cv": cv(["top"]),
  "c4 lr cv": cv(["conv4"]),
  "c4+top lr cv": cv(["conv4", "top"]),
  "c3+c4+top lr cv": cv(["conv3", "conv4", "top"]),
  "c4+top lr C=.1": fixed(["conv4", "top"], LR(0.1)),
  "c4+top lr C=.01": fixed(["conv4", "top"], LR(0.01)),
  "c4+top lr C=1": fixed(["conv4", "top"], LR(1.0)),
  "top lr C=.1": fixed(["top"], LR(0.1)),
  "c3+c4+top lr C=.1": fixed(["conv3", "conv4", "top"], LR(0.1)),
  "c4+top l2 lr C=.1": fixed(["conv4", "top"], LR(0.1), l2=True),
  "c4+top lda": fixed(["conv4", "top"], LDAs, rot=False),
  "top lda": fixed(["top"], LDAs, rot=False),
  "c4+top ncm": fixed(["conv4", "top"], NearestCentroid),
  "avg(top,c4,c4top) C=.1": avg((["top"], LR(0.1)), (["conv4"], LR(0.1)), (["conv4", "top"], LR(0.1))),
}
if __name__ == "__main__":
    which = sys.argv[1].split(";") if len(sys.argv) > 1 and sys.argv[1] else list(heads)
    cfgs = {"lite0-224": FeatureConfig("efficientnet_lite0")}
    if len(sys.argv) > 2:
        cfgs = {}
        for c in sys.argv[2].split(","):
            b, size, flip = c.split(":")
            cfgs[c] = FeatureConfig(b, image_size=int(size) or None, flip=flip == "1")
    rows = run(cfgs, {k: heads[k] for k in which})

"""Likely label errors: confident learning (Northcutt, Jiang and Chuang, JAIR 2021) on out-of-fold probabilities.

1. Out-of-fold probabilities of every labelled image: a logistic head on its standardised
   features, fitted on the other folds (``folds``-fold stratified CV).
2. A second round refits each fold without the images the first round doubted (normalised
   margin above ``DOUBT``), so wrong labels teach the head less; the two rounds are averaged.
   Each refit starts from its fold's first-round head (the same convex problem on fewer images:
   the same optimum, found in fewer steps).
3. Per class ``j`` the threshold ``t_j`` is the mean probability of ``j`` over the images
   labelled ``j``. An image labelled ``i`` is confidently another class when some ``j != i``
   has ``p_j >= t_j`` (the off-diagonal of the *confident joint*); their count estimates how
   many labels are wrong.
4. That many images, and ``MORE`` (4 %) beyond, are flagged, ranked by the normalised margin ``max_{j != i} p_j - p_i``
   (cleanlab's ``prune_by_noise_rate`` ranking), each with the class of that max as the suggestion.

cleanlab implements the same method but is AGPL-3.0, which cnnkit's users would inherit;
``bench/doctor.py`` compares the two on the same probabilities (docs/doctor.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A first-round normalised margin above this keeps an image out of the second round's fits.
DOUBT = 0.3
# Flag this many times the confident joint's count: the issue asks for recall >= 0.90 at precision >= 0.70, and on
# the five bench sets (bench/doctor.py, docs/doctor.md) the count alone gave recall 0.87-0.93 (mean 0.892) at
# precision 0.710-0.752; 4 % more gave recall 0.90-0.95 (mean 0.916) at precision 0.705-0.738. The next images
# by margin are mostly wrong labels too: the count misses flips whose other class is below its threshold.
MORE = 1.04
# The logistic head's C: strong regularisation keeps it from fitting the wrong labels (docs/doctor.md).
C = 0.01
# Past this many images, the head is fitted on this many principal components of the standardised features,
# their axes (and the standardisation) found on ``LARGE`` of the images picked at random: at 60,000 images of
# 2,288 features the covariance of every row cost 3.6 s and the standard deviations 1.5 s, 0.8 s in all so
# (docs/doctor.md).
LARGE = 10_000
LARGE_DIMS = 256


def folds_for(images: int) -> int:
    """Folds of the out-of-fold probabilities: 10, so each head learns from 90 % of the images (bench/doctor.py,
    five noisy sets: mean precision 0.721 -> 0.733, recall 0.884 -> 0.892 against 5 folds, for 2.3 times the
    seconds: 19 -> 45 s on 2,040 images); 5 past ``LARGE`` images, where each fold costs seconds. lbfgs
    stopped at tol 1e-3 instead (half the seconds) lost the recall again (0.884)."""
    return 10 if images <= LARGE else 5


@dataclass
class LabelIssues:
    """Flagged rows, each with its suggested class and normalised margin, worst first."""

    rows: np.ndarray
    suggested: np.ndarray
    margins: np.ndarray
    probabilities: np.ndarray


def out_of_fold(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0,
                leave_out: np.ndarray | None = None, heads: list | None = None) -> tuple[np.ndarray, list]:
    """(n, classes) probabilities of each image from a head fitted on the other folds, and the heads.

    ``leave_out`` (a boolean mask) keeps images out of every fit (they are still predicted).
    ``heads``: an earlier call's heads (same data, folds and seed), refitted from where they ended
    (``warm_start``) instead of from zero.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = int(labels.max()) + 1
    probabilities = np.zeros((len(labels), classes), np.float32)
    smallest = int(np.bincount(labels).min())
    splitter = StratifiedKFold(min(folds, max(smallest, 2)), shuffle=True, random_state=seed)
    fitted = []
    for fold, (train, test) in enumerate(splitter.split(features, labels)):
        if leave_out is not None:
            train = train[~leave_out[train]]
        head = heads[fold] if heads else make_pipeline(
            StandardScaler(), LogisticRegression(C=C, max_iter=1000, warm_start=True))
        head.fit(features[train], labels[train])
        probabilities[np.ix_(test, head.classes_)] = head.predict_proba(features[test])
        fitted.append(head)
    return probabilities, fitted


def reduced(features: np.ndarray, dims: int = LARGE_DIMS, sample: int = LARGE, seed: int = 0) -> np.ndarray:
    """(n, dims): ``features`` standardised and projected on their top ``dims`` principal axes, both
    measured on ``sample`` rows picked at random (all of them when there are no more)."""
    from sklearn.decomposition import PCA

    picked = features if len(features) <= sample else \
        features[np.sort(np.random.default_rng(seed).choice(len(features), sample, replace=False))]
    mean = picked.mean(axis=0)
    scale = picked.std(axis=0) + 1e-6
    pca = PCA(dims, svd_solver="covariance_eigh", random_state=seed).fit((picked - mean) / scale)
    # ((x - mean) / scale - pca.mean_) @ components.T for every row, as one product (no scaled copy).
    projection = (pca.components_ / scale).T.astype(np.float32)
    return features @ projection - (mean @ projection + pca.mean_ @ pca.components_.T).astype(np.float32)


def normalised_margin(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``max_{j != label} p_j - p_label``, that ``j``) per image."""
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    suggested = others.argmax(axis=1)
    return others.max(axis=1) - probabilities[np.arange(len(labels)), labels], suggested


def find_label_issues(features: np.ndarray, labels: np.ndarray, folds: int | None = None, seed: int = 0,
                      judged: np.ndarray | None = None) -> LabelIssues:
    """Confident learning's label issues (module docstring) for ``features`` labelled ``labels``.

    Every labelled image helps fit the heads; only the ``judged`` rows (a boolean mask, default
    all) set the per-class thresholds, are counted and can be flagged. ``diagnose`` judges the
    training images and the held-out ones separately: on Fashion-MNIST with 10 % flipped training
    labels, fitting on train and test together and judging train gave precision 0.73 / 0.71 at
    recall 0.95 / 0.88 (two noisy sets), judging everything together 0.62 / 0.59 (docs/doctor.md).
    """
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int64)
    folds = folds or folds_for(len(labels))
    judged = np.ones(len(labels), bool) if judged is None else np.asarray(judged, bool)
    empty = LabelIssues(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
                        np.zeros((len(labels), 0), np.float32))
    if len(np.unique(labels)) < 2 or np.bincount(labels)[np.unique(labels)].min() < 2 or not judged.any():
        return empty
    if len(features) > LARGE and features.shape[1] > LARGE_DIMS:
        features = reduced(features, seed=seed)
    first, heads = out_of_fold(features, labels, folds, seed)
    doubted = normalised_margin(first, labels)[0] > DOUBT
    second = out_of_fold(features, labels, folds, seed, leave_out=doubted, heads=heads)[0] if doubted.any() else first
    return confident_issues((first + second) / 2, labels, judged)


def confident_issues(probabilities: np.ndarray, labels: np.ndarray, judged: np.ndarray) -> LabelIssues:
    """Steps 3-4 of the module docstring on out-of-fold ``probabilities``, over the ``judged`` rows."""
    classes = probabilities.shape[1]
    thresholds = np.array([probabilities[judged & (labels == j), j].mean() if np.any(judged & (labels == j))
                           else 1.0 for j in range(classes)])
    confident = probabilities >= thresholds
    confident[np.arange(len(labels)), labels] = False
    estimated = int(round((confident.any(axis=1) & judged).sum() * MORE))
    margins, suggested = normalised_margin(probabilities, labels)
    margins = np.where(judged, margins, -np.inf)
    order = np.argsort(-margins, kind="stable")
    rows = np.array([r for r in order[:estimated] if margins[r] > 0], np.int64)
    return LabelIssues(rows, suggested[rows], margins[rows].astype(np.float32), probabilities)

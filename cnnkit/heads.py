"""Classical heads on CNN features: scikit-learn pipelines tuned by cross-validation.

scaling -> PCA (optionally whitened) -> SVM / linear SVM / logistic regression
/ k-NN, with the hyper-parameters (C, k, PCA size) picked by stratified k-fold
cross-validation, classes weighted against imbalance, and probabilities from
every head. Saved with skops, loaded with an explicit list of trusted types,
so a head file cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError
from cnnkit.options import Head

# The heads a pipeline can be built with (``auto`` picks one of them).
HEADS = tuple(h.value for h in Head if h != Head.auto)


@dataclass
class FittedHead:
    """A fitted pipeline and what cross-validation found."""

    pipeline: object
    best_params: dict
    cv_accuracy: float | None
    cv_folds: int


def _classifier(head: Head, seed: int, calibration_folds: int):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC, LinearSVC

    if head == "logreg":
        return LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced"), "C", [0.01, 0.1, 1.0, 10.0]
    if head == "svm":
        svm = SVC(C=10.0, kernel="rbf", gamma="scale", class_weight="balanced", random_state=seed)
        return (CalibratedClassifierCV(svm, cv=calibration_folds, method="sigmoid", ensemble=False),
                "estimator__C", [1.0, 10.0, 100.0])
    if head == "linear-svm":
        svm = LinearSVC(C=0.1, class_weight="balanced", max_iter=5000, random_state=seed)
        return (CalibratedClassifierCV(svm, cv=calibration_folds, method="sigmoid"),
                "estimator__C", [0.001, 0.01, 0.1, 1.0])
    # Brute force: exact, what `cnnkit export` rebuilds as a matrix product, and nothing but the
    # training vectors is saved (a KD/ball tree's node arrays would be types skops cannot vouch for,
    # and the saved head could not be loaded again).
    return (KNeighborsClassifier(n_neighbors=5, weights="distance", algorithm="brute"), "n_neighbors",
            [1, 3, 5, 10, 20])


def fit_head(features: np.ndarray, labels: np.ndarray, head: str = "logreg", pca: str | int | None = "auto",
             whiten: bool = False, l2_normalize: bool = False, cv: int = 5, seed: int = 0,
             n_jobs: int | None = None) -> FittedHead:
    """Fit a head, choosing its hyper-parameters by stratified cross-validation.

    Args:
        features: (n, d) training features.
        labels: (n,) integer labels.
        head: one of ``HEADS``.
        pca: number of components, "auto" (chosen by CV among a few sizes) or
            ``None`` for no PCA.
        whiten: whiten the PCA components.
        l2_normalize: scale every feature vector to unit length first.
        cv: folds, reduced to the smallest class's size; with fewer than two
            images in some class the defaults are used without CV.
    """
    from sklearn.decomposition import PCA
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    head = Head.parse(head, "--head")
    if head == Head.auto:
        raise CnnkitError("--head auto is a search over heads; fit_head needs one head (see run_extract)")
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if len(counts) < 2:
        raise CnnkitError("a classifier needs at least two classes with images")
    folds = int(min(cv, counts.min()))
    classifier, param, values = _classifier(head, seed, calibration_folds=max(2, min(3, folds - 1)))
    if head in ("svm", "linear-svm") and counts.min() < 3:
        raise CnnkitError(f"--head {head} needs at least 3 images per class to calibrate its "
                          "probabilities; use --head logreg or knn")

    max_components = min(features.shape[1], int(len(labels) * (folds - 1) / max(folds, 2)) if folds >= 2
                         else len(labels))
    steps = []
    if l2_normalize:
        steps.append(("l2", Normalizer()))
    steps.append(("scale", StandardScaler()))
    grid: dict[str, list] = {f"clf__{param}": values}
    if pca == "auto":
        choices = sorted({n for n in (32, 128) if n < max_components} | {max_components})
        steps.append(("pca", PCA(whiten=whiten, random_state=seed)))
        grid["pca__n_components"] = choices + [None]
    elif pca is not None:
        steps.append(("pca", PCA(n_components=min(int(pca), max_components), whiten=whiten,
                                 random_state=seed)))
    steps.append(("clf", classifier))
    pipeline = Pipeline(steps)

    if head == "knn":  # k cannot exceed the training fold size
        grid["clf__n_neighbors"] = [k for k in values if k < len(labels) * (folds - 1) / max(folds, 2)] or [1]
    if folds < 2:
        pipeline.fit(features, labels)
        return FittedHead(pipeline, {}, None, 0)
    search = GridSearchCV(pipeline, grid, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                          scoring="accuracy", n_jobs=n_jobs, refit=True, error_score="raise")
    search.fit(features, labels)
    best = {k.rsplit("__", 1)[1]: v for k, v in search.best_params_.items()}
    return FittedHead(search.best_estimator_, best, float(search.best_score_), folds)


# skops trusts scikit-learn estimators, numpy arrays and plain Python values on
# its own; these are the only other types a cnnkit head file holds.
_EXTRA_TRUSTED = frozenset({
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
})


def save_head(pipeline, path: Path) -> None:
    """Write a fitted pipeline with skops (no pickle)."""
    import skops.io as sio

    sio.dump(pipeline, path)


def load_head(path: Path):
    """Load a head written by ``save_head``, refusing any type cnnkit did not write.

    Raises:
        CnnkitError: the file is missing, damaged, or holds untrusted types.
    """
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as error:  # noqa: BLE001 - skops raises many kinds on a damaged zip
        raise CnnkitError(f"{path}: damaged or not a cnnkit head file ({error})") from None
    refused = [t for t in untrusted if t not in _EXTRA_TRUSTED]
    if refused:
        raise CnnkitError(
            f"{path}: refusing to load; it holds types cnnkit never writes ({', '.join(refused[:3])}). "
            "The run was modified; re-create it"
        )
    try:
        return sio.load(path, trusted=untrusted)
    except Exception as error:  # noqa: BLE001
        raise CnnkitError(f"{path}: damaged head file ({error})") from None

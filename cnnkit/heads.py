"""Classical heads on CNN features: scikit-learn pipelines tuned by cross-validation.

scaling -> PCA (optionally whitened) -> SVM / linear SVM / logistic regression
/ k-NN, with the hyper-parameters (C, k, PCA size) picked by stratified k-fold
cross-validation, classes weighted against imbalance, and probabilities from
every head. Saved with skops, loaded with an explicit list of trusted types,
so a head file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
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


def _preprocess(l2_normalize: bool) -> list:
    """The steps every head starts with: optional L2 normalisation, then standardisation."""
    from sklearn.preprocessing import Normalizer, StandardScaler

    return ([("l2", Normalizer())] if l2_normalize else []) + [("scale", StandardScaler())]


def _pca(n_components: int | None, whiten: bool, samples: int, dims: int, seed: int):
    from sklearn.decomposition import PCA

    # Exact solvers only, so that the first k components of one fit are exactly
    # PCA(k) (the search slices one fit instead of refitting per size);
    # covariance_eigh is the fast exact one when samples outnumber dimensions.
    solver = "covariance_eigh" if samples > dims else "full"
    return PCA(n_components=n_components, whiten=whiten, svd_solver=solver, random_state=seed)


# The search's logistic fits stop at a 10x looser gradient tolerance than the final fit (1e-4):
# they only rank (PCA size, C) pairs. On 2,000 x 1,280 top features, 5 folds: 4.0-4.9 s against
# 7.6-9.1 s, every CV score within 0.35 point, the same choice (C 0.01, no PCA).
LOGREG_SEARCH_TOL = 1e-3


def _fold_scores(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, head: Head,
                 sizes: list[int] | None, param: str, values: list, whiten: bool, l2_normalize: bool,
                 calibration_folds: int, seed: int) -> np.ndarray:
    """Accuracy on one fold's held-out rows of every (PCA size, parameter value): (len(sizes), len(values)).

    Scaling and PCA are fitted once, at the largest size; each smaller size is
    a slice of it (exact: PCA's components are ordered). Without PCA the rows
    are still projected on the training rows' principal axes when there are
    fewer rows than dimensions: every head here (L2-penalised linear models,
    RBF SVM, Euclidean k-NN) is unchanged by that rotation, and it is much
    cheaper to fit. Logistic regression warm-starts along increasing C, stops
    once its score has fallen twice in a row, and converges to a looser
    tolerance than the final fit (``LOGREG_SEARCH_TOL``).
    """
    from sklearn.pipeline import Pipeline

    prefix = Pipeline(_preprocess(l2_normalize))
    for _, step in prefix.steps:  # in place: indexing by rows below already made the fold's own copies
        step.set_params(copy=False)
    x_train = prefix.fit_transform(features[train])
    x_test = prefix.transform(features[test])
    n, dims = x_train.shape
    if sizes is not None or n < dims:
        top = max(sizes) if sizes is not None else None
        pca = _pca(top, whiten and sizes is not None, n, dims, seed).fit(x_train)
        x_train, x_test = pca.transform(x_train), pca.transform(x_test)
    scores = np.zeros((len(sizes or [None]), len(values)))
    for i, size in enumerate(sizes or [None]):
        a, b = x_train[:, :size], x_test[:, :size]
        classifier, _, _ = _classifier(head, seed, calibration_folds)
        if head == Head.logreg:
            classifier.set_params(warm_start=True, tol=LOGREG_SEARCH_TOL)
        falls = 0
        for j, value in enumerate(values):
            if falls >= 2:
                # Early exit: the score fell twice in a row along C, and the weaker regularisation
                # still to come is also the slowest to fit. The rest count as this fold's last score.
                scores[i, j:] = scores[i, j - 1]
                break
            classifier.set_params(**{param: value}).fit(a, labels[train])
            scores[i, j] = np.mean(classifier.predict(b) == labels[test])
            falls = falls + 1 if head == Head.logreg and j and scores[i, j] < scores[i, j - 1] else 0
    return scores


def cv_folds(folds: int, seed: int):
    """The stratified folds every head's cross-validation uses (the search and its evidence alike)."""
    from sklearn.model_selection import StratifiedKFold

    return StratifiedKFold(folds, shuffle=True, random_state=seed)


def cross_validated_probabilities(fitted: FittedHead, features: np.ndarray, labels: np.ndarray,
                                  seed: int) -> np.ndarray:
    """Each training image's class probabilities from the fitted head's pipeline refitted without its fold.

    The folds are the search's (``cv_folds`` with the same seed), so the accuracy of these
    predictions is the CV score the head was chosen by, up to fold sizes.
    """
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_predict
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):  # small matrices: see fit_head
        return cross_val_predict(clone(fitted.pipeline), features, labels, cv=cv_folds(fitted.cv_folds, seed),
                                 method="predict_proba").astype(np.float32)


# Bump when the grid, the folds or the scoring change: older cached scores no longer apply.
_SEARCH_FORMAT = 2
_SEARCH_CACHE_LIMIT = 1 << 20  # bytes; a score table is a few hundred


def _search_cache_file(features: np.ndarray, labels: np.ndarray, setup: list) -> Path:
    """Where the CV score table of this exact search is kept: a digest of the data and every setting."""
    import sklearn

    from cnnkit.paths import cache_dir

    digest = hashlib.sha256(json.dumps([_SEARCH_FORMAT, sklearn.__version__, features.shape, setup],
                                       default=str).encode())
    digest.update(np.ascontiguousarray(features).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return cache_dir() / "heads" / f"{digest.hexdigest()}.json"


def _read_cached_scores(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """A cached score table, or ``None`` when absent, damaged or not of this search's shape.

    Safe on a crafted file: the reader is ``json.loads`` on at most 1 MiB (data only, no code;
    deep nesting ends in RecursionError, caught), and anything but a finite (sizes x values) table of accuracies in [0, 1] is ignored, so the
    search simply runs again.
    """
    try:
        if path.stat().st_size > _SEARCH_CACHE_LIMIT:
            return None
        scores = np.array(json.loads(path.read_text(encoding="utf-8"))["scores"], dtype=np.float64)
    except (OSError, ValueError, TypeError, KeyError, RecursionError):  # RecursionError: deeply nested arrays
        return None
    if scores.shape != shape or not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1:
        return None
    return scores


def _write_cached_scores(path: Path, scores: np.ndarray) -> None:
    from cnnkit.paths import atomic_write

    try:
        atomic_write(path, json.dumps({"format": _SEARCH_FORMAT, "scores": scores.tolist()}))
    except OSError:  # a read-only or full cache costs the next run its search, nothing else
        pass


def fit_head(features: np.ndarray, labels: np.ndarray, head: str = "logreg", pca: str | int | None = "auto",
             whiten: bool = False, l2_normalize: bool = False, cv: int = 5, seed: int = 0,
             n_jobs: int | None = None, cache: bool = False, param_value: float | None = None) -> FittedHead:
    """Fit a head, choosing its hyper-parameters by stratified cross-validation.

    The search fits scaling and PCA once per fold and slices the PCA sizes
    from that one fit, runs the folds in parallel, and warm-starts logistic
    regression along its C path (see ``_fold_scores``). Its cost per fold is
    one scaling O(n d), one exact PCA O(n d min(n, d)), and then each
    classifier fit on at most min(n, d) dimensions; it grows linearly with
    the images n and the dimensions d as long as one of them is small.

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
        n_jobs: parallel folds (``None``: every core when the problem is big
            enough to pay for them, else one).
        param_value: the head's hyper-parameter (C, or k for k-NN) to use instead of searching
            ``_classifier``'s grid; CV then still scores it (and the PCA sizes).
        cache: keep the CV score table in ``$CNNKIT_HOME/heads``, keyed by a digest
            of the features, labels and every setting, and reuse it: an identical
            rerun (same cached features, same options) skips the search and only
            fits the chosen pipeline.
    """
    from joblib import Parallel, delayed
    from sklearn.pipeline import Pipeline
    from threadpoolctl import threadpool_limits

    head = Head.parse(head, "--head")
    if head == Head.auto:
        raise CnnkitError("--head auto is a search over heads; fit_head needs one head (see run_extract)")
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if len(counts) < 2:
        raise CnnkitError("a classifier needs at least two classes with images")
    folds = int(min(cv, counts.min()))
    calibration_folds = max(2, min(3, folds - 1))
    classifier, param, values = _classifier(head, seed, calibration_folds)
    if head in ("svm", "linear-svm") and counts.min() < 3:
        raise CnnkitError(f"--head {head} needs at least 3 images per class to calibrate its "
                          "probabilities; use --head logreg or knn")

    n, dims = features.shape
    fold_rows = int(n * (folds - 1) / max(folds, 2)) if folds >= 2 else n
    max_components = min(dims, fold_rows)
    if pca == "auto":
        sizes = sorted({k for k in (32, 128) if k < max_components} | {max_components})
    elif pca is not None:
        sizes = [min(int(pca), max_components)]
    else:
        sizes = None
    if param_value is not None:
        values = [int(param_value) if head == Head.knn else float(param_value)]
    if head == Head.knn:  # k cannot exceed the training fold size
        values = [k for k in values if k < fold_rows] or [1]

    def pipeline(size: int | None, value) -> Pipeline:
        steps = _preprocess(l2_normalize)
        if sizes is not None:
            # The largest size searched is "every component there is" (the
            # fold's rank); on all n images that is PCA(None).
            steps.append(("pca", _pca(None if size == max_components else size, whiten, n, dims, seed)))
        return Pipeline([*steps, ("clf", classifier.set_params(**{param: value}))])

    if folds < 2:
        default = values[0] if param_value is not None else classifier.get_params()[param]
        with threadpool_limits(1, user_api="blas"):
            return FittedHead(pipeline(sizes[-1] if sizes else None, default).fit(features, labels), {}, None, 0)
    cached_at = (_search_cache_file(features, labels, [str(head), sizes, values, whiten, l2_normalize, folds, seed])
                 if cache else None)
    scores = _read_cached_scores(cached_at, (len(sizes or [None]), len(values))) if cached_at else None
    if scores is None:
        splits = cv_folds(folds, seed).split(features, labels)
        jobs = n_jobs if n_jobs is not None else (-1 if features.size * folds > 5_000_000 else 1)
        # One BLAS thread per fold: the folds' matrices are small, and threaded
        # BLAS on small matrices spends its time synchronising (20x slower on a
        # busy two-core machine). Threads, not worker processes: the fits run
        # in BLAS and compiled code that release the GIL, and starting loky's
        # processes cost more than it saved (k-NN, 1,000 x 1,280: 2.8 s with
        # processes, 1.5 s with threads, 1.7 s serial; logreg on 2,000: 11.7,
        # 12.6, 14.7 s).
        with threadpool_limits(1, user_api="blas"):
            per_fold = Parallel(n_jobs=jobs, prefer="threads")(
                delayed(_fold_scores)(features, labels, train, test, head, sizes, param, values, whiten,
                                      l2_normalize, calibration_folds, seed)
                for train, test in splits)
        scores = np.mean(per_fold, axis=0)
        if cached_at:
            _write_cached_scores(cached_at, scores)
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    best = {param.rsplit("__", 1)[-1]: values[j]}
    if sizes is not None:
        best["n_components"] = None if sizes[i] == max_components else sizes[i]
    with threadpool_limits(1, user_api="blas"):  # the final fit too: 0.5 s instead of 4-6 s (2,000 x 1,280, loaded)
        final = pipeline(sizes[i] if sizes else None, values[j]).fit(features, labels)
    return FittedHead(final, best, float(scores[i, j]), folds)


# skops trusts scikit-learn estimators, numpy arrays and plain Python values on
# its own; these are the only other types a cnnkit head file holds.
_EXTRA_TRUSTED = frozenset({
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
})


def save_head(pipeline, path: Path, cache: bool = False) -> None:
    """Write a fitted pipeline with skops (no pickle).

    ``cache``: reuse the file written before for an identical fitted pipeline (a digest
    of everything it holds, ``_fitted_digest``; see ``cnnkit.paths.reuse_or_write``): a
    cached `extract` rerun refits the very same head, and importing skops to write it
    costs ~0.5 s, as skops lists every scikit-learn estimator at import.
    """
    from cnnkit.paths import reuse_or_write

    def write(target: Path) -> None:
        import skops.io as sio

        sio.dump(pipeline, target)

    digest = _fitted_digest(pipeline) if cache else None
    reuse_or_write(path, f"heads/{digest}.skops" if digest else None, write)


class _Opaque(Exception):
    """A fitted pipeline holds something ``_fitted_digest`` cannot read exactly."""


def _fitted_digest(pipeline) -> str | None:
    """SHA-256 of a fitted pipeline's whole state, with the scikit-learn and skops versions.

    Walks the estimators' attributes (scikit-learn objects, numeric arrays, plain values,
    lists, tuples, string-keyed dicts) with their types; ``None`` when it meets anything
    else, so a digest names exactly one skops file.
    """
    import skops
    import sklearn

    digest = hashlib.sha256(f"cnnkit-head 1 sklearn {sklearn.__version__} skops {skops.__version__} "
                            f"numpy {np.__version__}".encode())

    def feed(value) -> None:
        if isinstance(value, np.ndarray) and not value.dtype.hasobject:
            digest.update(f"array {value.dtype.str} {value.shape}:".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif value is None or isinstance(value, (bool, int, float, str, np.generic)):
            digest.update(f"{type(value).__qualname__} {value!r};".encode())
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}:".encode())
            for item in value:
                feed(item)
        elif isinstance(value, dict) and all(isinstance(key, str) for key in value):
            digest.update(f"dict {len(value)}:".encode())
            for key in sorted(value):
                feed(key)
                feed(value[key])
        elif type(value).__module__.startswith("sklearn.") and hasattr(value, "__dict__"):
            digest.update(f"object {type(value).__module__}.{type(value).__qualname__}:".encode())
            feed(vars(value))
        else:
            raise _Opaque

    try:
        feed(pipeline)
    except (_Opaque, RecursionError):  # RecursionError: an object that refers to itself
        return None
    return digest.hexdigest()


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

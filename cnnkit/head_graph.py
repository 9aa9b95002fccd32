"""A fitted scikit-learn head (``cnnkit.heads``) as Keras ops on symbolic features: its one graph.

L2 normalisation as it is; the affine steps -- standardisation, PCA (whitened
or not) and a linear classifier -- multiplied out in float64 into one Dense
layer; then a softmax (logistic regression) or the per-class sigmoid
calibration of a linear SVM, normalised and averaged over the calibration
folds exactly as scikit-learn does; a k-NN head as the exact distances to the
stored training features, top-k and inverse-distance voting. A feature head's
export and its Grad-CAM both read this graph (``cnnkit.kinds.feature_head``).

An RBF SVM head has no such graph: its probabilities come from the
one-vs-one votes of every class pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnkit.errors import CnnkitError


@dataclass
class HeadGraph:
    """The head's class scores before its last squashing (Grad-CAM's target; ``None`` for k-NN) and
    its class probabilities, as symbolic tensors."""

    scores: object | None
    probabilities: object


class _Affine:
    """``x @ matrix + offset``, built up step by step in float64 and applied as one Dense layer."""

    def __init__(self, dims: int):
        self.matrix = np.eye(dims)
        self.offset = np.zeros(dims)
        self.steps = 0

    def then(self, matrix: np.ndarray, offset: np.ndarray) -> None:
        self.matrix = self.matrix @ matrix
        self.offset = self.offset @ matrix + offset
        self.steps += 1

    def dense(self, x, name: str):
        import keras

        layer = keras.layers.Dense(self.matrix.shape[1], name=name)
        y = layer(x)
        layer.set_weights([self.matrix.astype(np.float32), self.offset.astype(np.float32)])
        return y


def head_graph(pipeline, feats, name: str = "head") -> HeadGraph:
    """A fitted cnnkit head (scikit-learn pipeline) as Keras layers on the symbolic features ``feats``.

    Args:
        name: the Dense layer's name (unique within one graph: an ensemble holds several heads).

    Raises:
        CnnkitError: a step with no exact graph (an RBF SVM), with the head to use instead.
    """
    from keras import ops
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import Normalizer, StandardScaler

    *transforms, classifier = [step for _, step in pipeline.steps]
    x = feats
    affine = _Affine(int(feats.shape[-1]))
    for step in transforms:
        if isinstance(step, Normalizer) and not affine.steps:
            # sklearn divides by the row's L2 norm, leaving all-zero rows as they are.
            norm = ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True))
            x = x / ops.where(norm > 0, norm, ops.ones_like(norm))
        elif isinstance(step, StandardScaler):
            mean = step.mean_ if step.with_mean else np.zeros(step.n_features_in_)
            scale = step.scale_ if step.with_std else np.ones(step.n_features_in_)
            affine.then(np.diag(1.0 / scale), -mean / scale)
        elif isinstance(step, PCA):
            matrix = step.components_.T.astype(np.float64)
            if step.whiten:
                matrix = matrix / np.sqrt(step.explained_variance_)
            affine.then(matrix, -step.mean_ @ matrix)
        else:
            raise CnnkitError(f"cannot build a graph of a head with a {type(step).__name__} step here")

    if isinstance(classifier, LogisticRegression):
        affine.then(classifier.coef_.T, classifier.intercept_)
        logits = affine.dense(x, name)
        if classifier.coef_.shape[0] == 1:  # binary: one logit for classes_[1]; softmax([0, s]) = sigmoid(s)
            logits = ops.concatenate([ops.zeros_like(logits), logits], axis=-1)
        return HeadGraph(logits, ops.softmax(logits, axis=-1))
    if isinstance(classifier, CalibratedClassifierCV) and _is_linear_svm(classifier):
        return _calibrated_linear(classifier, affine, x, name)
    if isinstance(classifier, KNeighborsClassifier):
        return HeadGraph(None, _knn(classifier, affine.dense(x, f"{name}_embedding")))
    raise CnnkitError(f"cannot build an exact graph of a {_head_name(classifier)} head: its probabilities come "
                      "from one-vs-one votes over every class pair; re-create the run with --head logreg, "
                      "linear-svm or knn")


def _head_name(classifier) -> str:
    inner = getattr(classifier, "estimator", classifier)
    return "RBF SVM" if type(inner).__name__ == "SVC" else type(inner).__name__


def _is_linear_svm(calibrated) -> bool:
    from sklearn.svm import LinearSVC

    return (calibrated.method == "sigmoid"
            and all(isinstance(c.estimator, LinearSVC) for c in calibrated.calibrated_classifiers_))


def _calibrated_linear(calibrated, affine: _Affine, x, name: str) -> HeadGraph:
    """Platt-calibrated linear SVMs, one per calibration fold, as scikit-learn's ``predict_proba``.

    Each fold: decision d = x W + b per class; p = sigmoid(-(a d + b')) per
    class (the fitted ``_SigmoidCalibration``); binary: [1 - p, p]; else p
    normalised to sum 1 (uniform where all are 0). Folds are averaged. The
    scores are the folds' mean decision function (the calibration is monotonic per class).
    """
    from keras import ops

    n_classes = len(calibrated.classes_)
    members = calibrated.calibrated_classifiers_
    matrices, offsets, slopes, shifts = [], [], [], []
    for member in members:
        if not np.array_equal(member.estimator.classes_, calibrated.classes_):
            raise CnnkitError("cannot build a graph of this linear-svm head: a calibration fold lacked a class; "
                              "re-create the run with --head logreg")
        matrices.append(member.estimator.coef_.T)
        offsets.append(np.atleast_1d(member.estimator.intercept_))
        slopes.append([c.a_ for c in member.calibrators])
        shifts.append([c.b_ for c in member.calibrators])
    affine.then(np.concatenate(matrices, axis=1), np.concatenate(offsets))
    decisions = affine.dense(x, name)  # (n, folds * columns)
    slope = np.concatenate(slopes).astype(np.float32)
    shift = np.concatenate(shifts).astype(np.float32)
    calibrated_columns = ops.sigmoid(-(decisions * slope + shift))  # the calibration, elementwise
    columns = 1 if n_classes == 2 else n_classes
    per_fold = ops.reshape(calibrated_columns, (-1, len(members), columns))
    scores = ops.mean(ops.reshape(decisions, (-1, len(members), columns)), axis=1)
    if n_classes == 2:
        probabilities = ops.concatenate([1.0 - per_fold, per_fold], axis=-1)
        scores = ops.concatenate([ops.zeros_like(scores), scores], axis=-1)
    else:
        total = ops.sum(per_fold, axis=-1, keepdims=True)
        probabilities = ops.where(total > 0, per_fold / ops.where(total > 0, total, ops.ones_like(total)),
                                  ops.ones_like(per_fold) / n_classes)
    return HeadGraph(scores, ops.mean(probabilities, axis=1))


def knn_reference(knn) -> tuple[np.ndarray, np.ndarray]:
    """(training vectors, their class indices) a fitted brute-force k-NN classifier keeps.

    scikit-learn has no public accessor for them: this is the one place that reads its private
    ``_fit_X`` and ``_y``, and tests/test_export.py fails loudly if a scikit-learn release moves them.
    """
    try:
        return np.asarray(knn._fit_X, np.float64), np.asarray(knn._y).reshape(-1)
    except AttributeError:
        raise CnnkitError("this scikit-learn no longer keeps a k-NN head's training vectors where cnnkit reads "
                          "them; re-create the run with --head logreg, or install scikit-learn<=1.9") from None


def _knn(knn, embedded):
    """Exact k-NN with inverse-distance weights, as ``KNeighborsClassifier(weights="distance")``.

    Squared distances to every stored training vector are one matrix
    product (|q|^2 - 2 q.X + |X|^2); the k smallest are taken with top-k; a
    neighbour at distance 0 takes all the weight, as in scikit-learn.
    """
    from keras import ops

    if knn.weights not in ("distance", "uniform") or knn.effective_metric_ != "euclidean":
        raise CnnkitError("cannot build a graph of this k-NN head (only Euclidean distance is); "
                          "re-create the run with --head logreg")
    reference, labels = knn_reference(knn)
    # Distances do not change when both sides move; centring keeps |q|^2 - 2 q.X + |X|^2 from
    # cancelling large terms in float32.
    centre = reference.mean(axis=0)
    reference = reference - centre
    embedded = embedded - centre.astype(np.float32)
    n_classes = len(knn.classes_)
    k = min(knn.n_neighbors, len(reference))
    columns = reference.T.astype(np.float32)  # (dims, training vectors), one constant in the graph
    squared = (ops.sum(embedded * embedded, axis=-1, keepdims=True) - 2.0 * ops.matmul(embedded, columns)
               + (reference ** 2).sum(axis=1).astype(np.float32))
    _, index = ops.top_k(-squared, k=k, sorted=True)
    # The k chosen neighbours' distances again, from the differences themselves: the expansion above
    # cancels large terms (enough to rank), these do not, so a query next to a training vector weighs
    # it as scikit-learn does.
    neighbours = ops.transpose(ops.take(columns, index, axis=1), (1, 2, 0))  # (n, k, dims)
    distance = ops.sqrt(ops.sum((ops.expand_dims(embedded, 1) - neighbours) ** 2, axis=-1))
    one_hot = ops.take(np.eye(n_classes, dtype=np.float32)[labels], index, axis=0)  # (n, k, classes)
    if knn.weights == "uniform":
        weights = ops.ones_like(distance)
    else:
        exact = ops.cast(distance <= 0.0, "float32")
        any_exact = ops.max(exact, axis=-1, keepdims=True)
        weights = ops.where(any_exact > 0, exact, 1.0 / ops.maximum(distance, 1e-30))
    votes = ops.sum(one_hot * ops.expand_dims(weights, -1), axis=1)
    return votes / ops.sum(votes, axis=-1, keepdims=True)

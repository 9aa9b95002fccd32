"""Turning a saved run into a classifier of raw images, whatever its strategy."""

from __future__ import annotations

import numpy as np

from cnnkit.errors import CnnkitError


class FeatureHeadClassifier:
    """Pretrained backbone features -> a fitted scikit-learn head (extract runs)."""

    def __init__(self, run):
        from cnnkit.features import FeatureConfig, FeatureExtractor
        from cnnkit.heads import load_head

        m = run.model
        self.layers = list(m.layers)
        self.head = load_head(run.file("head.skops"))
        self.extractor = FeatureExtractor(FeatureConfig(m.backbone, m.weights, run.image_size, m.pool, m.flip))
        expected = len(run.class_names)
        if len(getattr(self.head, "classes_", [])) != expected:
            raise CnnkitError(f"{run.path}: head and manifest disagree on the classes; re-create the run")

    def features(self, images) -> np.ndarray:
        stage_features = self.extractor(images)
        return np.concatenate([stage_features[self.extractor.spec.stage_key(l)] for l in self.layers], axis=1)

    def embed(self, images) -> np.ndarray:
        """The retrieval embedding: features after the head's own scaling and PCA."""
        return embed_features(self.head, self.features(images))

    def __call__(self, images) -> np.ndarray:
        return self.head.predict_proba(self.features(images))


class NetworkClassifier:
    """A whole Keras network from raw pixels to probabilities (finetune/train runs)."""

    def __init__(self, run):
        import keras

        import cnnkit.backbones.preprocessing  # noqa: F401 - registers the Preprocess layer

        path = run.file("model.keras")
        self.feature_layer = run.model.feature_layer
        try:
            self.model = keras.saving.load_model(path, safe_mode=True, compile=False)
        except Exception as error:  # noqa: BLE001 - Keras raises many kinds on a bad file
            raise CnnkitError(f"{path}: cannot load the model safely ({error})") from None
        from cnnkit.features import inference_fn

        self._predict = inference_fn(self.model)
        self._features = None

    def embed(self, images) -> np.ndarray:
        """The retrieval embedding: the pooled features before the classifier."""
        import keras

        from cnnkit.features import inference_fn

        if self._features is None:
            self._features = inference_fn(keras.Model(self.model.input, self.model.get_layer(self.feature_layer).output))
        return np.asarray(self._features(images))

    def __call__(self, images) -> np.ndarray:
        return np.asarray(self._predict(images))


def embed_features(head, features: np.ndarray) -> np.ndarray:
    """Features as the head sees them before its classifier (standardised, PCA-projected).

    Raw pooled activations are all positive and share a large common
    component, so their cosine similarities bunch near 1; the head's
    standardisation centres them and makes neighbours meaningful.
    """
    return np.asarray(head[:-1].transform(features), dtype=np.float32)


class EnsembleClassifier:
    """The weighted mean of an ensemble's members' probabilities (ensemble runs).

    The ensemble's images are decoded at its largest member's size and crop;
    a member trained at another size or crop sees its own centre crop of them,
    resized, and its columns are put in the ensemble's class order.
    """

    def __init__(self, run):
        self.run = run
        self.members = []
        for member, weight in run.members():
            order = [member.class_names.index(name) for name in run.class_names]
            self.members.append((member, member.classifier(), weight, order))

    def __call__(self, images) -> np.ndarray:
        total = 0.0
        for member, classifier, weight, order in self.members:
            seen = member_view(images, self.run.crop_pct, member.crop_pct, member.image_size)
            total = total + weight * np.asarray(classifier(seen), np.float64)[:, order]
        return np.asarray(total, np.float32)

    def embed(self, images) -> np.ndarray:
        raise CnnkitError(f"{self.run.path}: an ensemble has no retrieval index; use `similar` with one of its "
                          "members (members/<i>)")


def member_view(images, crop_pct: float, member_crop_pct: float, member_size: int) -> np.ndarray:
    """Raw ``uint8`` images decoded for an ensemble, as one of its members would have been given them."""
    images = np.asarray(images)
    share = member_crop_pct / crop_pct
    if images.shape[1] == member_size and share >= 1.0:
        return images
    import tensorflow as tf

    low = (1.0 - min(share, 1.0)) / 2
    boxes = tf.tile(tf.constant([[low, low, 1.0 - low, 1.0 - low]], tf.float32), [len(images), 1])
    resized = tf.image.crop_and_resize(tf.convert_to_tensor(images, tf.float32), boxes,
                                       tf.range(len(images), dtype=tf.int32), (member_size, member_size))
    return np.clip(np.rint(resized.numpy()), 0, 255).astype(np.uint8)


def load_classifier(run):
    """The classifier of a run (see ``Run.classifier``), by the kind of model it holds."""
    if run.kind == "feature_head":
        return FeatureHeadClassifier(run)
    if run.kind == "network":
        return NetworkClassifier(run)
    if run.kind == "ensemble":
        return EnsembleClassifier(run)
    raise CnnkitError(f"{run.path}: cnnkit cannot use a {run.kind!r} model yet; upgrade cnnkit")

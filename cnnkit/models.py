"""Turning a saved run into a classifier of raw images, whatever its strategy."""

from __future__ import annotations

import numpy as np

from cnnkit.errors import CnnkitError


class FeatureHeadClassifier:
    """Pretrained backbone features -> a fitted scikit-learn head (extract runs).

    ``predict_files``/``embed_files`` read features from the feature cache
    where it has them, so a rerun on cached images runs no network and
    imports no TensorFlow.
    """

    def __init__(self, run, engine: str = "tf"):
        from cnnkit.features import FeatureConfig, FeatureExtractor
        from cnnkit.heads import load_head

        m = run.model
        self.layers = list(m.layers)
        self.head = load_head(run.file("head.skops"))
        self.config = FeatureConfig(m.backbone, m.weights, run.image_size, m.pool, m.flip, m.grid)
        self.extractor = FeatureExtractor(self.config, engine)
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

    def _file_features(self, paths, batch_size: int, progress):
        from cnnkit.features import compute_features

        table = compute_features(paths, self.config, batch_size, extractor=self.extractor, progress=progress)
        return table.select(self.layers), table.kept, table.failures

    def predict_files(self, paths, batch_size: int = 32, progress=None):
        """(probabilities, kept indices into ``paths``, unreadable files), cached features first."""
        features, kept, failures = self._file_features(paths, batch_size, progress)
        probabilities = self.head.predict_proba(features) if len(kept) else np.zeros((0, len(self.head.classes_)))
        return probabilities, kept, failures

    def embed_files(self, paths, batch_size: int = 32):
        """(embeddings, kept indices, unreadable files) of image files, cached features first."""
        features, kept, failures = self._file_features(paths, batch_size, None)
        return (embed_features(self.head, features) if len(kept) else np.zeros((0, 0), np.float32)), kept, failures


class NetworkClassifier:
    """A whole Keras network from raw pixels to probabilities (finetune/train runs).

    A run trained with ``--flip`` averages each image with its mirror image
    (``cnnkit.training.network.inference_network``).

    The engine runs one graph with two outputs, the probabilities and the
    pooled features (the retrieval embedding); it is converted once per run
    (keyed by the run's seal) for ONNX Runtime and OpenVINO.
    """

    def __init__(self, run, engine: str = "tf"):
        from cnnkit.engines import make_runner

        self.path = run.file("model.keras")
        self.feature_layer = run.model.feature_layer
        self.flip = run.model.flip
        self._model = None
        self.runner = make_runner(engine, "runs", run.manifest.seal, self._two_outputs, run.image_size)

    @property
    def model(self):
        """The run's Keras model, loaded in safe mode on first use."""
        if self._model is None:
            import keras

            import cnnkit.backbones.preprocessing  # noqa: F401 - registers the Preprocess layer

            try:
                self._model = keras.saving.load_model(self.path, safe_mode=True, compile=False)
            except Exception as error:  # noqa: BLE001 - Keras raises many kinds on a bad file
                raise CnnkitError(f"{self.path}: cannot load the model safely ({error})") from None
        return self._model

    def _two_outputs(self):
        from cnnkit.training.network import inference_network

        try:
            return inference_network(self.model, self.flip, self.feature_layer)
        except ValueError:
            raise CnnkitError(f"{self.path}: has no layer {self.feature_layer!r}, which the manifest names as its "
                              f"feature layer{', or no backbone and classifier' if self.flip else ''}; "
                              "re-create the run") from None

    def embed(self, images) -> np.ndarray:
        """The retrieval embedding: the pooled features before the classifier."""
        return self.runner(np.asarray(images))["features"]

    def __call__(self, images) -> np.ndarray:
        return self.runner(np.asarray(images))["probabilities"]


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

    def __init__(self, run, engine: str = "tf"):
        self.run = run
        self.members = []
        for member, weight in run.members():
            order = [member.class_names.index(name) for name in run.class_names]
            self.members.append((member, member.classifier(engine), weight, order))

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
    """Raw ``uint8`` images decoded for an ensemble, as one of its members would have been given them.

    The member's share of the centre is cut out in whole pixels, then resized by ``resize_view``
    (what an exported ensemble does in its graph, ``cnnkit.export``).
    """
    images = np.asarray(images)
    side = images.shape[1]
    # Both crops come from manifests (schema: 0 < crop_pct <= 1), so the cut is 1..side pixels, centred:
    # a slice inside the array, never an empty one however small a crafted member's crop is.
    keep = min(max(int(round(side * member_crop_pct / crop_pct)), 1), side)
    if keep == side == member_size:
        return images
    start = (side - keep) // 2
    return np.asarray(resize_view(images[:, start:start + keep, start:start + keep], member_size))


def resize_view(images, size: int):
    """``uint8`` images resized to ``size`` x ``size``: bilinear with half-pixel centres, rounded.

    Half-pixel centres put each output pixel where the decoder would have: a 28 px image decoded
    at 128 and resized back to 28 is within a grey level of decoding it at 28, and a network
    trained on the latter scores the same on it (Fashion-MNIST test, 0.9394 both). Corner-aligned
    sampling (``tf.image.crop_and_resize``, used here before) shifts every pixel and cost that
    network 0.55 point. Works on NumPy arrays and on symbolic Keras tensors alike.
    """
    from keras import ops

    resized = ops.image.resize(ops.cast(images, "float32"), (size, size), interpolation="bilinear")
    return ops.cast(ops.clip(ops.round(resized), 0, 255), "uint8")


def load_classifier(run, engine: str = "tf"):
    """The classifier of a run (see ``Run.classifier``), by the kind of model it holds.

    Args:
        engine: what runs the network (``cnnkit.engines``): tf, onnx, openvino or auto.
    """
    if run.kind == "feature_head":
        return FeatureHeadClassifier(run, engine)
    if run.kind == "network":
        return NetworkClassifier(run, engine)
    if run.kind == "ensemble":
        return EnsembleClassifier(run, engine)
    raise CnnkitError(f"{run.path}: cnnkit cannot use a {run.kind!r} model yet; upgrade cnnkit")

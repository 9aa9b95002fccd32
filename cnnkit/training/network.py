"""A classifier network: pretrained (or fresh) backbone, new head, stages frozen by name."""

from __future__ import annotations

from cnnkit.backbones import BackboneSpec
from cnnkit.training.augment import Augmentation

# The pooled layer before the classifier: the retrieval embedding of `similar`,
# recorded in the run's manifest (``NetworkModel.feature_layer``).
FEATURE_LAYER = "features"
BACKBONE_LAYER = "backbone"


def build_network(spec: BackboneSpec, num_classes: int, weights, image_size: int, dropout: float,
                  augmentation: Augmentation, seed: int = 0):
    """raw pixels -> augmentation -> backbone -> global average pool -> dropout -> softmax.

    The pooled feature layer is named ``FEATURE_LAYER``; the backbone is the
    nested model named ``BACKBONE_LAYER``.
    """
    import keras

    from cnnkit.features import build_backbone

    keras.utils.set_random_seed(seed)
    backbone = build_backbone(spec, weights, image_size)
    backbone.name = BACKBONE_LAYER
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    for layer in augmentation.layers(seed):
        x = layer(x)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name=FEATURE_LAYER)(x)
    if dropout:
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions",
                                 dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_classifier")


def inference_network(model, flip: bool = False, feature_layer: str = FEATURE_LAYER):
    """The trained network as a run predicts with it: raw pixels -> ``{"probabilities", "features"}``.

    With ``flip`` (``--flip``, recorded as ``NetworkModel.flip``) the pooled
    features are averaged with the mirror image's before the classifier; the
    classifier is linear before its softmax, so that averages the two views'
    logits. Augmentation and dropout are the identity at inference and are
    left out of that graph. Without ``flip`` the model's own graph, whatever
    its layout.

    Raises:
        ValueError: the model has no layer ``feature_layer`` (or, with
            ``flip``, no backbone or classifier layer of cnnkit's layout).
    """
    import keras

    features = model.get_layer(feature_layer)
    if not flip:
        return keras.Model(model.input, {"probabilities": model.output, "features": features.output})
    backbone, classifier = model.get_layer(BACKBONE_LAYER), model.get_layer("predictions")
    inputs = keras.Input(model.input.shape[1:], name="image")
    pooled = pooled_features(backbone, features, inputs, flip=True)
    return keras.Model(inputs, {"probabilities": classifier(pooled), "features": pooled})


def pooled_features(backbone, pool, images, flip: bool):
    """The pooled features a run's classifier reads: with ``flip``, averaged with the mirror image's.

    The one definition of ``NetworkModel.flip``, for ``inference_network`` and
    the exported graph (``cnnkit.export``) alike.
    """
    from keras import ops

    pooled = pool(backbone(images, training=False))
    if flip:
        pooled = (pooled + pool(backbone(ops.flip(images, axis=2), training=False))) / 2.0
    return pooled


def probabilities_of(predictor):
    """The ``probabilities`` output of an ``inference_network`` alone, as a model of one output."""
    import keras

    return keras.Model(predictor.input, predictor.output["probabilities"])


def backbone_of(model):
    return model.get_layer(BACKBONE_LAYER)


def stage_index(spec: BackboneSpec, backbone, stage: str) -> int:
    """Index in ``backbone.layers`` of the last layer of ``stage``; -1 for "none", the last for "all"."""
    if stage == "none":
        return -1
    if stage == "all":
        return len(backbone.layers) - 1
    layer = spec.stage_layer(backbone, str(stage))
    return backbone.layers.index(layer)


def freeze_through(spec: BackboneSpec, model, stage: str, batchnorm: str = "train") -> int:
    """Freeze the backbone from its input through the end of ``stage``; unfreeze the rest.

    Frozen BatchNorm layers run in inference mode (Keras does this for
    ``trainable=False``), keeping the ImageNet statistics: updating them on a
    few small batches would shift every activation the frozen weights were
    trained for. ``batchnorm="frozen"`` keeps the unfrozen stages' BatchNorm
    layers that way too (the convolutions train, the normalisation does not).

    Returns:
        how many backbone layers are frozen.
    """
    import keras

    backbone = backbone_of(model)
    cut = stage_index(spec, backbone, stage)
    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i > cut and not (batchnorm == "frozen" and isinstance(layer, keras.layers.BatchNormalization))
    return cut + 1


def stage_groups(spec: BackboneSpec, backbone) -> dict[str, list]:
    """Backbone layers with weights, grouped by the stage they belong to (stem is in conv1)."""
    bounds = [(s, backbone.layers.index(spec.stage_layer(backbone, s)))
              for s in spec.layer_choices if s != "top"]
    groups: dict[str, list] = {s: [] for s, _ in bounds}
    for i, layer in enumerate(backbone.layers):
        if not layer.weights:
            continue
        stage = next((s for s, end in bounds if i <= end), bounds[-1][0] if bounds else "top")
        groups.setdefault(stage, []).append(layer)
    return groups

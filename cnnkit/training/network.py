"""A classifier network: pretrained (or fresh) backbone, new head, stages frozen by name."""

from __future__ import annotations

from cnnkit.backbones import BackboneSpec
from cnnkit.kinds.network import BACKBONE_LAYER, CLASSIFIER_LAYER, FEATURE_LAYER
from cnnkit.training.augment import Augmentation


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
    outputs = keras.layers.Dense(num_classes, activation="softmax", name=CLASSIFIER_LAYER,
                                 dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_classifier")


def probabilities_of(predictor):
    """The ``probabilities`` output of an ``inference_network`` (``cnnkit.kinds.network``) alone, as a model."""
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

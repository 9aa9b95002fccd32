"""cnnkit's own networks, trained from scratch: no pretrained weights.

``small_resnet``: a compact ResNet for small images (28-64 px) -- the
"train from scratch" baseline of the strategy table. ``tiny_cnn``: a few
thousand parameters with all five stages, for fast tests and smoke runs.
"""

from __future__ import annotations

from cnnkit.backbones.registry import BackboneSpec, register


def _conv_bn_relu(x, filters, stride, name):
    from keras import layers

    x = layers.Conv2D(filters, 3, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _residual_block(x, filters, stride, name):
    from keras import layers

    shortcut = x
    y = _conv_bn_relu(x, filters, stride, f"{name}_a")
    y = layers.Conv2D(filters, 3, 1, padding="same", use_bias=False, name=f"{name}_b_conv")(y)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_b_bn")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, stride, use_bias=False, name=f"{name}_proj_conv")(x)
        shortcut = layers.BatchNormalization(momentum=0.9, name=f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def build_small_resnet(input_size: int = 32, widths=(32, 64, 128), blocks_per_stage: int = 2):
    """A ResNet with a stride-1 stem and three stride-2 stages (conv1..conv3)."""
    import keras

    from cnnkit.backbones.preprocessing import Preprocess

    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = Preprocess("tf", name="preprocess")(inputs)
    x = _conv_bn_relu(x, widths[0] // 2, 1, "stem")
    for stage, filters in enumerate(widths, start=1):
        for block in range(blocks_per_stage):
            x = _residual_block(x, filters, 2 if block == 0 else 1, f"conv{stage}_block{block}")
    return keras.Model(inputs, x, name="small_resnet")


def build_tiny_cnn(input_size: int = 32):
    """Five stride-2 conv stages of 4 to 16 channels."""
    import keras

    from cnnkit.backbones.preprocessing import Preprocess

    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = Preprocess("tf", name="preprocess")(inputs)
    for stage, filters in enumerate((4, 8, 8, 16, 16), start=1):
        x = _conv_bn_relu(x, filters, 2, f"conv{stage}")
    return keras.Model(inputs, x, name="tiny_cnn")


def _from_scratch_only(name, builder):
    def build(input_size, include_top, weights):
        from cnnkit.errors import CnnkitError

        if include_top:
            raise CnnkitError(f"{name} has no ImageNet classifier; train it first (cnnkit train)")
        model = builder(input_size)
        if weights is not None:
            model.load_weights(str(weights))
        return model

    return build


register(BackboneSpec(
    name="small_resnet", family="cnnkit", input_size=32, preprocessing="tf",
    stages={"conv1": "conv1_block1_out", "conv2": "conv2_block1_out", "conv3": "conv3_block1_out"},
    weights_source="none (train from scratch)",
    build_fn=_from_scratch_only("small_resnet", build_small_resnet),
    weights_present_fn=lambda: False, crop_pct=1.0, pretrained=False,
))
register(BackboneSpec(
    name="tiny_cnn", family="cnnkit", input_size=32, preprocessing="tf",
    stages={f"conv{k}": f"conv{k}_relu" for k in range(1, 6)},
    weights_source="none (for tests and smoke runs)",
    build_fn=_from_scratch_only("tiny_cnn", build_tiny_cnn),
    weights_present_fn=lambda: False, crop_pct=1.0, pretrained=False,
))

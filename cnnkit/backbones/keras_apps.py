"""keras.applications backbones, with ImageNet weights from Keras' own download cache.

Online, ``weights="imagenet"`` downloads once into ``$KERAS_HOME/models``
(default ``~/.keras/models``). Offline with no cached file, building raises a
CnnkitError naming the file, where it goes and how to get it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cnnkit.backbones.registry import MODEL_OUTPUT, BackboneSpec, register
from cnnkit.errors import CnnkitError


@dataclass(frozen=True)
class _App:
    name: str
    constructor: str  # attribute of keras.applications
    preprocessing: str
    stages: dict[str, str]
    notop_file: str
    top_file: str
    input_size: int = 224


def _efficientnet(variant: int, size: int, conv1: str, conv2: str, conv3: str, conv4: str) -> _App:
    return _App(
        f"efficientnet_b{variant}", f"EfficientNetB{variant}", "raw",
        {"conv1": conv1, "conv2": conv2, "conv3": conv3, "conv4": conv4, "conv5": "top_activation"},
        f"efficientnetb{variant}_notop.h5", f"efficientnetb{variant}.h5", size,
    )


_APPS = (
    _App("mobilenet_v2", "MobileNetV2", "tf",
         {"conv1": "expanded_conv_project_BN", "conv2": "block_2_add", "conv3": "block_5_add",
          "conv4": "block_12_add", "conv5": "out_relu"},
         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"),
    _App("mobilenet_v3_small", "MobileNetV3Small", "raw",
         {"conv1": "conv_bn", "conv2": "expanded_conv_project_bn", "conv3": "expanded_conv_2_add",
          "conv4": "expanded_conv_7_add", "conv5": MODEL_OUTPUT},
         "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
         "weights_mobilenet_v3_small_224_1.0_float.h5"),
    _App("mobilenet_v3_large", "MobileNetV3Large", "raw",
         {"conv1": "expanded_conv_add", "conv2": "expanded_conv_2_add", "conv3": "expanded_conv_5_add",
          "conv4": "expanded_conv_11_add", "conv5": MODEL_OUTPUT},
         "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
         "weights_mobilenet_v3_large_224_1.0_float.h5"),
    _efficientnet(0, 224, "block1a_project_bn", "block2b_add", "block3b_add", "block5c_add"),
    _efficientnet(1, 240, "block1b_add", "block2c_add", "block3c_add", "block5d_add"),
    _efficientnet(2, 260, "block1b_add", "block2c_add", "block3c_add", "block5d_add"),
    _efficientnet(3, 300, "block1b_add", "block2c_add", "block3c_add", "block5e_add"),
    _App("resnet50", "ResNet50", "caffe",
         {"conv1": "conv1_relu", "conv2": "conv2_block3_out", "conv3": "conv3_block4_out",
          "conv4": "conv4_block6_out", "conv5": "conv5_block3_out"},
         "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
         "resnet50_weights_tf_dim_ordering_tf_kernels.h5"),
    _App("vgg16", "VGG16", "caffe",
         {f"conv{k}": f"block{k}_pool" for k in range(1, 6)},
         "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
         "vgg16_weights_tf_dim_ordering_tf_kernels.h5"),
    _App("densenet121", "DenseNet121", "torch",
         {"conv1": "conv1_relu", "conv2": "conv2_block6_concat", "conv3": "conv3_block12_concat",
          "conv4": "conv4_block24_concat", "conv5": "relu"},
         "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
         "densenet121_weights_tf_dim_ordering_tf_kernels.h5"),
    # ConvNeXt's stem has stride 4, so it has no conv1.
    _App("convnext_tiny", "ConvNeXtTiny", "raw",
         {"conv2": "convnext_tiny_stage_0_block_2_identity",
          "conv3": "convnext_tiny_stage_1_block_2_identity",
          "conv4": "convnext_tiny_stage_2_block_8_identity", "conv5": MODEL_OUTPUT},
         "convnext_tiny_notop.h5", "convnext_tiny.h5"),
)


def keras_models_dir() -> Path:
    """Where Keras caches downloaded application weights."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _build(app: _App, input_size: int, include_top: bool, weights):
    import keras

    from cnnkit.backbones.preprocessing import Preprocess

    constructor = getattr(keras.applications, app.constructor)
    if include_top and input_size != app.input_size:
        raise CnnkitError(
            f"{app.name}'s ImageNet classifier needs --image-size {app.input_size}, got {input_size}"
        )
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = Preprocess(app.preprocessing, name="preprocess")(inputs)
    kwargs = {"include_top": include_top, "input_tensor": x, "weights": None}
    if include_top:
        kwargs["classifier_activation"] = "softmax"
    model = constructor(**kwargs)
    model = keras.Model(inputs, model.output, name=app.name)
    if weights is None:
        return model
    if weights == "imagenet":
        weights = _imagenet_weights_file(app, include_top)
    try:
        model.load_weights(str(weights))
    except (ValueError, OSError) as error:
        raise CnnkitError(f"--weights {weights}: cannot load into {app.name} ({error})") from None
    return model


def _imagenet_weights_file(app: _App, include_top: bool) -> Path:
    """The cached ImageNet weights file, downloading it if it is missing."""
    import keras

    file_name = app.top_file if include_top else app.notop_file
    cached = keras_models_dir() / file_name
    if cached.exists():
        return cached
    # Build once with Keras' own loader: it knows the URL and the hash.
    constructor = getattr(keras.applications, app.constructor)
    try:
        constructor(include_top=include_top, weights="imagenet",
                    input_shape=(app.input_size, app.input_size, 3))
    except Exception as error:  # noqa: BLE001 - Keras raises bare Exception on URL failure
        url = re.search(r"https?://\S+?\.h5", str(error))
        raise CnnkitError(
            f"ImageNet weights for {app.name} are not cached ({cached}) and could not be downloaded"
            f"{' from ' + url.group(0) if url else ''}; run once with internet access, "
            f"copy {file_name} into {cached.parent}, or pass --weights FILE"
        ) from None
    return cached


for _app in _APPS:
    register(BackboneSpec(
        name=_app.name,
        family="keras",
        input_size=_app.input_size,
        preprocessing=_app.preprocessing,
        stages=_app.stages,
        weights_source=f"Keras download cache ({_app.notop_file})",
        build_fn=lambda size, top, weights, app=_app: _build(app, size, top, weights),
        weights_present_fn=lambda app=_app: (keras_models_dir() / app.notop_file).exists(),
    ))

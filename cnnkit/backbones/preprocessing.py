"""The input scaling each pretrained network expects, as a saveable Keras layer.

Every cnnkit model takes raw RGB pixels in [0, 255]; the backbone's own
scaling is the model's first layer, so a saved or exported model needs no
separate preprocessing code.
"""

from __future__ import annotations

import keras
from keras import ops

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

MODES = ("raw", "lite", "tf", "torch", "caffe")


@keras.saving.register_keras_serializable(package="cnnkit")
class Preprocess(keras.layers.Layer):
    """Scale raw RGB pixels the way a backbone was trained.

    Modes:
        raw: unchanged (the network scales its own input).
        lite: (x - 127) / 128, EfficientNet-Lite.
        tf: x / 127.5 - 1, MobileNetV2 and other TF-slim models.
        torch: x / 255 normalised by the ImageNet mean and std, DenseNet.
        caffe: RGB to BGR minus the ImageNet BGR mean, ResNet50 and VGG16.
    """

    def __init__(self, mode: str = "raw", **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; choose from {', '.join(MODES)}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "lite":
            return (x - 127.0) / 128.0
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_IMAGENET_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_IMAGENET_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            mean = ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=self.compute_dtype)
            return ops.flip(x, axis=-1) - mean
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}

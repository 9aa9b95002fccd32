"""Where a model looks, as maps over its input square: Grad-CAM where there is a gradient, occlusion where not.

Grad-CAM (Selvaraju et al., in the notes): the gradient of a class's score
(before the softmax) with respect to a stage's feature maps, averaged over
space, weights those maps; their weighted sum, kept where positive, is the
heat map. It runs through any forward pass that returns its feature maps and
class scores (a kind's ``Forward``, ``cnnkit.kinds``). Occlusion sensitivity
needs only a classifier: a grey patch slides over the image and the heat is
how much the class probability drops where it covers.

The run kinds build their explainers from these (``Kind.explainer``);
``cnnkit.explain`` turns a map into files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cnnkit.data.images import square_crop_box
from cnnkit.errors import CnnkitError

GRAD_CAM = "grad-cam"
OCCLUSION = "occlusion"


@dataclass
class HeatMap:
    """What an explainer returns for one image at the model's input size.

    Attributes:
        probabilities: the model's class probabilities.
        class_index: the class explained.
        heat: 0..1 map over the model's input square (any resolution).
    """

    probabilities: np.ndarray
    class_index: int
    heat: np.ndarray


class Explainer:
    """Explains single images for one model.

    Attributes:
        class_names: the model's classes.
        image_size: its square input side.
        crop_pct: the share of the shorter side its centre crop keeps.
        method: ``GRAD_CAM`` or ``OCCLUSION``.
        layer: the stage whose maps are weighted (Grad-CAM).
    """

    class_names: list[str]
    image_size: int
    crop_pct: float
    method: str
    layer: str

    def heat_map(self, image: np.ndarray, class_index: int | None) -> HeatMap:
        raise NotImplementedError


# float32 images -> ([(feature maps, row, mirrored)], class scores before the softmax)
Forward = Callable


def grad_cam(forward: Forward, image: np.ndarray, class_index: int | None) -> HeatMap:
    """Grad-CAM of one raw ``uint8`` image through ``forward``.

    Each view of the image is one ``row`` of a feature-map tensor (the mirror image's is flipped
    back, ``mirrored``) before the views' maps are summed.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(image[None], tf.float32)
    with tf.GradientTape() as tape:
        # Watching the input records every operation, so gradients reach the
        # feature maps even when the weights are frozen (not watched by default).
        tape.watch(x)
        maps, logits = forward(x)
        logits = tf.cast(logits, tf.float32)
        probabilities = tf.nn.softmax(logits)[0].numpy()
        if class_index is None:
            class_index = int(np.argmax(probabilities))
        target = logits[0, class_index]
    gradients = tape.gradient(target, [m for m, _, _ in maps])
    heat = None
    for (feature_map, row, mirrored), gradient in zip(maps, gradients):
        feature_map = tf.cast(feature_map, tf.float32)[row]
        gradient = tf.zeros_like(feature_map) if gradient is None else tf.cast(gradient, tf.float32)[row]
        weights = tf.reduce_mean(gradient, axis=(0, 1))
        cam = tf.reduce_sum(feature_map * weights, axis=-1).numpy()
        cam = cam[:, ::-1] if mirrored else cam
        heat = cam if heat is None else heat + cam
    heat = np.maximum(heat, 0)
    return HeatMap(probabilities, class_index, normalise(heat))


class GradCamExplainer(Explainer):
    """Grad-CAM through a forward pass ``x -> ([(feature map, mirrored)], class scores)``."""

    method = GRAD_CAM

    def __init__(self, forward: Forward, class_names: Sequence[str], image_size: int, crop_pct: float, layer: str):
        self._forward = forward
        self.class_names, self.image_size, self.crop_pct, self.layer = list(class_names), image_size, crop_pct, layer

    def heat_map(self, image, class_index=None):
        return grad_cam(self._forward, image, class_index)


def normalise(heat: np.ndarray) -> np.ndarray:
    """Scale to 0..1 by the maximum; an all-zero map stays zero."""
    heat = np.nan_to_num(np.asarray(heat, np.float32))
    top = float(heat.max()) if heat.size else 0.0
    return heat / top if top > 0 else np.zeros_like(heat)


def class_scores(layer, inputs):
    """The scores before the softmax of a model's last layer (Dense or Activation), given its input."""
    from keras import ops

    kernel = getattr(layer, "kernel", None)
    if kernel is not None:
        scores = ops.matmul(ops.cast(inputs, "float32"), ops.cast(kernel, "float32"))
        return scores + ops.cast(layer.bias, "float32") if getattr(layer, "bias", None) is not None else scores
    if layer.__class__.__name__ == "Activation":  # MobileNetV3: conv logits, then a softmax layer
        return ops.cast(ops.reshape(inputs, (ops.shape(inputs)[0], -1)), "float32")
    raise CnnkitError(f"cannot find the class scores of layer {layer.name!r}")


def feature_map_layer(spec, model, layer: str):
    """The layer of ``model`` whose 4-D output ends ``layer`` (a stage key)."""
    found = spec.stage_layer(model, layer)
    if len(found.output.shape) != 4:
        choices = [s for s in spec.layer_choices if s not in ("top", "conv5")]
        raise CnnkitError(f"--layer {layer}: {spec.name}'s last stage is not a feature map here; "
                          f"choose from {', '.join(choices)}")
    return found


class OcclusionExplainer(Explainer):
    """Occlusion sensitivity of any classifier of raw ``uint8`` batches.

    A grey square of a seventh of the side slides over the image at half its
    size; each pixel's heat is the mean drop of the class probability over
    the positions that covered it.
    """

    method = OCCLUSION
    layer = "input"

    def __init__(self, classifier: Callable, class_names: Sequence[str], image_size: int, crop_pct: float,
                 batch_size: int = 32):
        self.classifier = classifier
        self.class_names, self.image_size, self.crop_pct = list(class_names), image_size, crop_pct
        self.batch_size = batch_size

    def heat_map(self, image, class_index=None):
        size = image.shape[0]
        patch = max(1, size // 7)
        stride = max(1, patch // 2)
        starts = sorted(set(range(0, size - patch + 1, stride)) | {size - patch})
        positions = [(y, x) for y in starts for x in starts]
        probabilities = np.asarray(self.classifier(image[None]), np.float64)[0]
        if class_index is None:
            class_index = int(np.argmax(probabilities))
        heat = np.zeros((size, size), np.float64)
        covered = np.zeros((size, size), np.float64)
        for start in range(0, len(positions), self.batch_size):
            chunk = positions[start:start + self.batch_size]
            batch = np.repeat(image[None], len(chunk), axis=0)
            for i, (y, x) in enumerate(chunk):
                batch[i, y:y + patch, x:x + patch] = 127
            drops = probabilities[class_index] - np.asarray(self.classifier(batch), np.float64)[:, class_index]
            for (y, x), drop in zip(chunk, drops):
                heat[y:y + patch, x:x + patch] += drop
                covered[y:y + patch, x:x + patch] += 1
        heat = np.maximum(heat / np.maximum(covered, 1), 0)
        return HeatMap(probabilities.astype(np.float32), class_index, normalise(heat))


def place_in_box(heat: np.ndarray, height: int, width: int, crop_pct: float) -> np.ndarray:
    """``heat`` over the centre square a model saw of a ``height`` x ``width`` image, in that image's grid.

    Outside the square the model did not look: zero there.
    """
    from PIL import Image

    left, top, right, bottom = square_crop_box(width, height, crop_pct)
    full = np.zeros((height, width), np.float32)
    if right <= left or bottom <= top:
        return full
    resized = Image.fromarray(np.asarray(heat, np.float32), mode="F").resize(
        (right - left, bottom - top), Image.Resampling.BILINEAR)
    full[top:bottom, left:right] = np.clip(np.asarray(resized, np.float32), 0, 1)
    return full

"""Test-time augmentation: class probabilities averaged over crops and flips of each image.

As VGG and GoogLeNet evaluate: the image as the model usually sees it, plus
the centre and the four corners cropped to ``crop`` of its side (each resized
back to the model's input size), each also mirrored left to right; with the
defaults that is 12 views. The views are made from the already decoded input
batch in one ``tf.image.crop_and_resize`` call per view, so any classifier of
raw ``uint8`` batches -- every kind of run -- gains TTA without knowing about it,
and the run itself records nothing new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from cnnkit.classifier import Classifier

# (top, left) of each crop as a share of the room left around it: centre, then the four corners.
_PLACES = ((0.5, 0.5), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))


@dataclass(frozen=True)
class TTA:
    """Which views to average.

    Attributes:
        scales: crop sides as shares of the image side; 1.0 is the whole
            image (one view), a smaller share gives the centre and four corners.
        flip: add the mirror image of every view.
    """

    scales: tuple[float, ...] = (1.0, 0.875)
    flip: bool = True

    def boxes(self) -> list[tuple[float, float, float, float, bool]]:
        """Every view as (y1, x1, y2, x2, mirrored) in normalised coordinates; the plain image first."""
        boxes = []
        for scale in self.scales:
            places = _PLACES[:1] if scale >= 1.0 else _PLACES
            for top, left in places:
                y1, x1 = top * (1 - scale), left * (1 - scale)
                boxes.append((y1, x1, y1 + scale, x1 + scale))
        flips = (False, True) if self.flip else (False,)
        return [(*box, mirrored) for mirrored in flips for box in boxes]

    @property
    def views(self) -> int:
        return len(self.boxes())

    def for_run(self, run) -> TTA:
        """The views ``run`` needs: none mirrored when the run averages each image with its mirror
        already (``Run.mirror_symmetric``), as a mirrored view would repeat its plain view's probabilities."""
        return replace(self, flip=False) if self.flip and run.mirror_symmetric else self


def views(images, tta: TTA = TTA()):
    """Yield each view of a batch of raw ``uint8`` images, same shape and dtype, the plain batch first."""
    import tensorflow as tf

    images = np.asarray(images)
    count, height, width = images.shape[:3]
    pixels = tf.convert_to_tensor(images, tf.float32)
    indices = tf.range(count, dtype=tf.int32)
    for y1, x1, y2, x2, mirrored in tta.boxes():
        if (y1, x1, y2, x2) == (0.0, 0.0, 1.0, 1.0):
            view = images
        else:
            boxes = tf.tile(tf.constant([[y1, x1, y2, x2]], tf.float32), [count, 1])
            view = tf.image.crop_and_resize(pixels, boxes, indices, (height, width), method="bilinear")
            view = np.clip(np.rint(view.numpy()), 0, 255).astype(np.uint8)
        yield np.ascontiguousarray(view[:, :, ::-1]) if mirrored else view


class TTAClassifier(Classifier):
    """A classifier of raw ``uint8`` batches that averages another one's probabilities over views.

    ``batch`` returns the plain view's probabilities beside the average, so a caller can report
    the accuracy with and without TTA from one pass (``FilePredictions.plain``). Files are always
    decoded and classified view by view (a feature head's cache holds the plain view only).
    """

    def __init__(self, classifier: Classifier | Callable, tta: TTA = TTA()):
        self.classifier = classifier
        self.tta = tta
        # A plain callable of batches works too, for batches (files need a Classifier's decoding size).
        self.image_size = getattr(classifier, "image_size", None)
        self.crop_pct = getattr(classifier, "crop_pct", 1.0)
        self.classes = getattr(classifier, "classes", None)

    def batch(self, images) -> tuple[np.ndarray, np.ndarray]:
        total, plain = None, None
        for i, view in enumerate(views(images, self.tta)):
            probabilities = np.asarray(self.classifier(view), np.float64)
            if i == 0:
                plain = probabilities.astype(np.float32)
            total = probabilities if total is None else total + probabilities
        return (total / self.tta.views).astype(np.float32), plain

    def __call__(self, images) -> np.ndarray:
        return self.batch(images)[0]

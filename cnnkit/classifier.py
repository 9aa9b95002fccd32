"""What every classifier of images is: raw ``uint8`` batches in, class probabilities out, and image files too.

A run's classifier (``cnnkit.kinds``), the backbone's own ImageNet classifier
(``cnnkit.predict``) and test-time augmentation (``cnnkit.tta``) all are one:
predict, evaluate and similar call ``predict_files`` / ``embed_files`` and
never ask what kind of classifier they hold. The default reads the files in
a stream (``cnnkit.data.ImageStream``); a feature head overrides it to read
its features from the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data import ImageStream, SkippedFile
from cnnkit.errors import CnnkitError

ProgressFn = Callable[[int, int], None]


@dataclass
class FilePredictions:
    """Class probabilities of image files.

    Attributes:
        probabilities: one row per readable file, ``(len(kept), classes)``.
        kept: indices (into the paths asked for) of those files.
        failures: the files that could not be read.
        plain: with test-time augmentation, the plain view's probabilities (same rows).
    """

    probabilities: np.ndarray
    kept: np.ndarray
    failures: list[SkippedFile] = field(default_factory=list)
    plain: np.ndarray | None = None


class Classifier:
    """A callable from a batch of raw ``uint8`` images (n, S, S, 3) to class probabilities (n, classes).

    Attributes:
        image_size: the square side images are decoded at.
        crop_pct: the share of the shorter side the centre crop keeps.
        classes: the number of classes.
    """

    image_size: int
    crop_pct: float = 1.0
    classes: int

    def __call__(self, images) -> np.ndarray:
        raise NotImplementedError

    def batch(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, the plain view's probabilities or ``None``) of a batch; see ``FilePredictions``."""
        return np.asarray(self(images), np.float32), None

    def embed(self, images) -> np.ndarray:
        """The retrieval embedding of a batch (the features before the classifier)."""
        raise CnnkitError("this model has no retrieval embedding")

    def predict_files(self, paths: Sequence[Path], batch_size: int = 32,
                      progress: ProgressFn | None = None) -> FilePredictions:
        """Probabilities of image files, decoded and classified in batches; unreadable files skipped."""
        stream = ImageStream(list(paths), self.image_size, self.crop_pct)
        outputs, kept = stream.map_batches(self.batch, batch_size, progress)
        if not outputs:
            return FilePredictions(np.zeros((0, self.classes), np.float32), kept, stream.failures)
        plain = np.concatenate([o[1] for o in outputs]) if outputs[0][1] is not None else None
        return FilePredictions(np.concatenate([o[0] for o in outputs]), kept, stream.failures, plain)

    def embed_files(self, paths: Sequence[Path], batch_size: int = 32
                    ) -> tuple[np.ndarray, np.ndarray, list[SkippedFile]]:
        """(embeddings, kept indices, unreadable files) of image files."""
        stream = ImageStream(list(paths), self.image_size, self.crop_pct)
        outputs, kept = stream.map_batches(lambda images: np.asarray(self.embed(images), np.float32), batch_size)
        return (np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)), kept, stream.failures


class RunnerClassifier(Classifier):
    """An engine runner (``cnnkit.engines``) whose outputs are ``probabilities`` and, maybe, ``features``."""

    def __init__(self, runner, image_size: int, crop_pct: float, classes: int):
        self.runner = runner
        self.image_size, self.crop_pct, self.classes = image_size, crop_pct, classes

    def __call__(self, images) -> np.ndarray:
        return self.runner(np.asarray(images))["probabilities"]

    def embed(self, images) -> np.ndarray:
        out = self.runner(np.asarray(images))
        if "features" not in out:
            return super().embed(images)
        return out["features"]

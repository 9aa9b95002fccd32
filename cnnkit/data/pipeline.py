"""Streaming decoded images in batches.

Files are decoded by Pillow (so every format and mode in ``images.py`` works),
batched and prefetched; the whole dataset is never held in memory. A file that
fails to decode is recorded once in ``ImageStream.failures`` and dropped from
the stream.

Two ways to stream: ``dataset`` is a tf.data pipeline (training feeds Keras'
``fit`` with it); ``batches``/``map_batches`` decode in a pool of threads with
no TensorFlow at all, so inference on another engine (``cnnkit.engines``)
never imports it. Pillow releases the GIL while it decodes and resizes, so the
threads decode in parallel.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cnnkit.data.dataset import SkippedFile
from cnnkit.data.images import UnreadableImageError, load_image

_CHUNK = 32


class ImageStream:
    """Decode a fixed list of image files into batches.

    Args:
        paths: the files, in order; batches carry each image's index here.
        image_size: side of the square images produced.
        crop_pct: share of the shorter side kept by the centre crop.
    """

    def __init__(self, paths: Sequence[str | Path], image_size: int, crop_pct: float = 1.0):
        self.paths = [Path(p) for p in paths]
        self.image_size = image_size
        self.crop_pct = crop_pct
        self._failures: dict[int, SkippedFile] = {}
        self._lock = threading.Lock()

    @property
    def failures(self) -> list[SkippedFile]:
        """Files that could not be decoded so far, in path order."""
        with self._lock:
            return [self._failures[i] for i in sorted(self._failures)]

    def _decode(self, index) -> tuple[np.ndarray, bool]:
        index = int(index)
        try:
            return load_image(self.paths[index], self.image_size, self.crop_pct), True
        except UnreadableImageError as error:
            reason = str(error).removeprefix(f"{self.paths[index]}: ")
            with self._lock:
                self._failures[index] = SkippedFile(self.paths[index], reason)
            return np.zeros((self.image_size, self.image_size, 3), np.uint8), False

    def _decode_chunk(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        decoded = [self._decode(i) for i in indices]
        size = self.image_size
        images = np.stack([d[0] for d in decoded]) if decoded else np.zeros((0, size, size, 3), np.uint8)
        return images, np.array([d[1] for d in decoded], dtype=bool)

    def decoded(self, indices):
        """Map a ``tf.data.Dataset`` of file indices to ``(image, index)`` elements.

        Files are decoded in chunks of 32 per Python call (a call per image
        costs more than decoding a small PNG) and several chunks in
        parallel; unreadable files are dropped. Element order is kept.
        """
        import tensorflow as tf

        size = self.image_size

        def decode(chunk):
            images, ok = tf.numpy_function(self._decode_chunk, [chunk], [tf.uint8, tf.bool])
            images.set_shape((None, size, size, 3))
            ok.set_shape((None,))
            return images, chunk, ok

        ds = indices.batch(_CHUNK).map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.unbatch()
        return ds.filter(_is_ok).map(_drop_flag)

    def decoded_batches(self, index_batches):
        """Map a ``tf.data.Dataset`` of index vectors, one batch each, to ``(images, indices)`` batches.

        For callers that choose every batch's members themselves (training
        across several workers splits each global batch by position). Each
        batch is decoded in one Python call, several batches in parallel;
        order is kept; unreadable files are dropped from their batch.
        """
        import tensorflow as tf

        size = self.image_size

        def decode(indices):
            images, ok = tf.numpy_function(self._decode_chunk, [indices], [tf.uint8, tf.bool])
            images.set_shape((None, size, size, 3))
            ok.set_shape((None,))
            return tf.boolean_mask(images, ok), tf.boolean_mask(indices, ok)

        return index_batches.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def dataset(self, batch_size: int, labels: Sequence[int] | None = None):
        """A ``tf.data.Dataset`` of batches, in file order.

        Yields ``(images, indices)``, or ``(images, labels)`` when ``labels``
        is given. Images are ``uint8`` (B, S, S, 3) raw RGB; every cnnkit
        model takes raw pixels and does its own preprocessing.
        """
        import tensorflow as tf

        ds = self.decoded(tf.data.Dataset.range(len(self.paths)))
        if labels is not None:
            label_table = tf.constant(np.asarray(labels, dtype=np.int64))
            ds = ds.map(lambda image, index: (image, tf.gather(label_table, index)))
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def batches(self, batch_size: int, workers: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(images, indices)`` batches in file order, decoded by threads ahead of the consumer.

        At most ``2 * workers`` batches are decoded ahead, so memory stays
        bounded however many files there are. Unreadable files are dropped
        (see ``failures``); a batch whose files all failed is skipped.
        """
        workers = workers or min(os.cpu_count() or 1, 8)
        starts = iter(range(0, len(self.paths), batch_size))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers, thread_name_prefix="cnnkit-decode") as pool:
            pending: deque = deque()

            def submit() -> None:
                start = next(starts, None)
                if start is not None:
                    chunk = np.arange(start, min(start + batch_size, len(self.paths)))
                    pending.append((chunk, pool.submit(self._decode_chunk, chunk)))

            for _ in range(2 * workers):
                submit()
            while pending:
                chunk, future = pending.popleft()
                images, ok = future.result()
                submit()
                if ok.any():
                    yield (images, chunk) if ok.all() else (images[ok], chunk[ok])

    def map_batches(self, fn: Callable, batch_size: int,
                    progress: Callable[[int, int], None] | None = None) -> tuple[list, np.ndarray]:
        """Apply ``fn`` to every batch of decoded images, in file order.

        Returns:
            (outputs, kept): ``fn``'s result for each batch, and the indices
            (into ``paths``) of the images that were read, in row order.
        """
        outputs, kept = [], []
        if progress:
            progress(0, len(self.paths))
        for images, indices in self.batches(batch_size):
            outputs.append(fn(images))
            kept.append(indices)
            if progress:
                progress(sum(len(k) for k in kept) + len(self.failures), len(self.paths))
        return outputs, np.concatenate(kept) if kept else np.zeros(0, np.int64)


def _is_ok(image, index, ok):
    return ok


def _drop_flag(image, index, ok):
    return image, index

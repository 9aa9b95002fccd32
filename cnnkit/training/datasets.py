"""The tf.data pipelines training reads: shuffled per epoch for training, in order for evaluation."""

from __future__ import annotations

import numpy as np

from cnnkit.data import ImageStream


def training_batches(samples, num_classes: int, image_size: int, batch_size: int, seed: int, epoch_var):
    """One-hot labelled batches in an order that depends only on (seed, epoch).

    The order is drawn with a stateless shuffle keyed by ``epoch_var``, which
    ``callbacks.EpochSeeding`` sets at each epoch start, so a resumed run sees
    the same data as an uninterrupted one.

    Returns:
        (dataset, stream): the stream records the files that failed to decode.
    """
    import tensorflow as tf

    stream = ImageStream([s.path for s in samples], image_size)
    indices = tf.range(len(samples), dtype=tf.int64)
    labels = tf.constant(np.asarray([s.label for s in samples], np.int64))

    def epoch_order(_):
        order = tf.random.experimental.stateless_shuffle(
            indices, seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch_var.read_value(), tf.int64)]))
        return tf.data.Dataset.from_tensor_slices(order)

    ds = stream.decoded(tf.data.Dataset.from_tensors(0).flat_map(epoch_order))
    ds = ds.map(lambda image, index: (image, tf.one_hot(tf.gather(labels, index), num_classes)))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE), stream


def evaluation_batches(samples, num_classes: int, image_size: int, batch_size: int):
    """One-hot labelled batches in file order. Returns (dataset, stream)."""
    import tensorflow as tf

    stream = ImageStream([s.path for s in samples], image_size)
    ds = stream.dataset(batch_size, labels=[s.label for s in samples])
    return ds.map(lambda image, label: (image, tf.one_hot(label, num_classes))), stream

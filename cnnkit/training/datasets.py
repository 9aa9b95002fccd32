"""The tf.data pipelines training reads, split across the replicas of a ``tf.distribute`` strategy.

A step's global batch is ``--batch-size`` images taken in order from the
epoch's sample order; replica ``k`` of ``N`` (a device of one of the
workers) takes positions ``[k c / N, (k + 1) c / N)`` of each global batch of
``c`` images, so every worker decodes only its own part and ``N`` replicas
see exactly the images one process would. With one replica this is plain
batching.
"""

from __future__ import annotations

import numpy as np

from cnnkit.data import ImageStream


def replica_batches(order, global_batch: int, first_replica: int, local_replicas: int, replicas: int):
    """This input pipeline's per-replica index batches for one pass over ``order``.

    Args:
        order: 1-D int64 tensor, the sample indices in this epoch's order.
        global_batch: images per step over all replicas.
        first_replica: the global index of this pipeline's first replica.
        local_replicas: replicas fed by this pipeline (devices of this worker).
        replicas: replicas over all workers.

    Returns:
        a ``tf.data.Dataset`` of index vectors, for each step one per local
        replica, in replica order (``tf.distribute`` hands a pipeline's
        elements to its replicas round-robin). A replica's part of a short
        last batch may be empty.
    """
    import tensorflow as tf

    n = tf.shape(order, out_type=tf.int64)[0]
    size, local, total = (tf.constant(v, tf.int64) for v in (global_batch, local_replicas, replicas))
    steps = (n + size - 1) // size

    def part(element):
        step, k = element // local, first_replica + element % local
        start = step * size
        count = tf.minimum(size, n - start)
        return order[start + k * count // total: start + (k + 1) * count // total]

    return tf.data.Dataset.range(steps * local).map(part)


def _pipeline_batches(stream: ImageStream, labels: np.ndarray, num_classes: int, batch_size: int,
                      ordering, context):
    """Batches of one input pipeline: ``(uint8 images, one-hot labels)``, prefetched."""
    import tensorflow as tf

    local = context.num_replicas_in_sync // context.num_input_pipelines
    first = context.input_pipeline_id * local
    label_table = tf.constant(labels)

    def epoch(_):
        # Built when an iterator starts, so a per-epoch ordering sees that epoch's seed.
        return replica_batches(ordering(), batch_size, first, local, context.num_replicas_in_sync)

    indices = tf.data.Dataset.from_tensors(0).flat_map(epoch)
    ds = stream.decoded_batches(indices)
    ds = ds.map(lambda images, index: (images, tf.one_hot(tf.gather(label_table, index), num_classes)))
    return ds.prefetch(tf.data.AUTOTUNE)


def training_batches(samples, num_classes: int, image_size: int, batch_size: int, seed: int, epoch_var,
                     strategy):
    """One-hot labelled batches in an order that depends only on (seed, epoch), split across replicas.

    The order is drawn with a stateless shuffle keyed by ``epoch_var``, which
    ``callbacks.EpochSeeding`` sets at each epoch start, so a resumed run sees
    the same data as an uninterrupted one, and every worker the same order.

    Returns:
        (distributed dataset, stream): iterate the dataset once per epoch;
        the stream records the files that failed to decode.
    """
    import tensorflow as tf

    stream = ImageStream([s.path for s in samples], image_size)
    indices = tf.range(len(samples), dtype=tf.int64)
    labels = np.asarray([s.label for s in samples], np.int64)

    def ordering():
        return tf.random.experimental.stateless_shuffle(
            indices, seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch_var.read_value(), tf.int64)]))

    return strategy.distribute_datasets_from_function(
        lambda context: _pipeline_batches(stream, labels, num_classes, batch_size, ordering, context)), stream


def evaluation_batches(samples, num_classes: int, image_size: int, batch_size: int, strategy):
    """One-hot labelled batches in file order, split across replicas. Returns (distributed dataset, stream)."""
    import tensorflow as tf

    stream = ImageStream([s.path for s in samples], image_size)
    labels = np.asarray([s.label for s in samples], np.int64)
    count = len(samples)
    return strategy.distribute_datasets_from_function(
        lambda context: _pipeline_batches(stream, labels, num_classes, batch_size,
                                          lambda: tf.range(count, dtype=tf.int64), context)), stream

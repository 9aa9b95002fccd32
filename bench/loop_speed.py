"""The training loop's speed against Keras' ``model.fit`` on one CPU worker, in one run.

Both arms fine-tune the same network (EfficientNet-Lite0, ``--freeze conv4``
as ``cnnkit finetune`` does) on the same Fashion-MNIST images with the same
optimizer, batch size and validation set:

- fit: ``model.compile`` + ``model.fit`` on the input pipeline cnnkit used
  before (files decoded in chunks, ``batch``), as ``cnnkit/training/loop.py``
  did before the custom loop;
- loop: ``cnnkit.training.loop.Steps`` (a ``strategy.run`` step under the
  default strategy) on ``cnnkit.training.datasets`` (batches split by
  position across replicas: here one).

The arms alternate epoch by epoch (fit, loop, fit, loop, ...) so the load
of a shared machine falls on both; the first epoch of each (tracing) is
reported apart. Prints images/s and the speed ratio loop / fit (above 1:
the loop is faster), over all warm epochs and as the median of epoch pairs.

    python bench/loop_speed.py --per-class 16 --epochs 8 --json docs/loop_speed.json

Needs: apt-get install dataset-fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import write_image_folder  # noqa: E402


def fit_pipeline(samples, num_classes, image_size, batch_size, seed):
    """cnnkit's training pipeline before the custom loop (a fixed epoch order is enough here)."""
    import tensorflow as tf

    from cnnkit.data import ImageStream

    stream = ImageStream([s.path for s in samples], image_size)
    labels = tf.constant(np.asarray([s.label for s in samples], np.int64))
    order = tf.random.experimental.stateless_shuffle(tf.range(len(samples), dtype=tf.int64), seed=[seed, 0])
    ds = stream.decoded(tf.data.Dataset.from_tensor_slices(order))
    ds = ds.map(lambda image, index: (image, tf.one_hot(tf.gather(labels, index), num_classes)))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=32, help="training images per class (10 classes)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per arm, the first one tracing")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnnkit-loop-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CNNKIT_HOME", str(args.out / "cache"))

    import keras
    import tensorflow as tf

    from cnnkit.backbones import get_backbone
    from cnnkit.data import load_dataset
    from cnnkit.options import TrainOptions
    from cnnkit.training.augment import Augmentation
    from cnnkit.training.datasets import evaluation_batches, training_batches
    from cnnkit.training.loop import Steps, compile_model, make_optimizer
    from cnnkit.training.network import build_network, freeze_through

    data = args.out / "data"
    if not data.exists():
        write_image_folder(data / "train", "train", args.per_class, seed=1)
        write_image_folder(data / "val", "train", max(args.per_class // 4, 1), seed=1, offset=args.per_class)
    dataset = load_dataset(data)
    train, val = dataset.splits["train"], dataset.splits["val"]
    classes = len(dataset.class_names)
    spec = get_backbone("efficientnet_lite0")
    options = TrainOptions(batch_size=args.batch_size)
    strategy = tf.distribute.get_strategy()

    def network():
        model = build_network(spec, classes, "imagenet", args.image_size, 0.2, Augmentation.preset("light"), 0)
        freeze_through(spec, model, "conv4")
        return model

    fit_model, loop_model = network(), network()
    fit_model.compile(optimizer=make_optimizer(options, 0.001), metrics=["accuracy"], jit_compile=False,
                      loss=keras.losses.CategoricalCrossentropy())
    fit_model.optimizer.build(fit_model.trainable_variables)
    compile_model(loop_model, options, 0.001)
    steps = Steps(loop_model, strategy)
    fit_train = fit_pipeline(train, classes, args.image_size, args.batch_size, 0)
    fit_val = fit_pipeline(val, classes, args.image_size, args.batch_size, 0)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    loop_train, _ = training_batches(train, classes, args.image_size, args.batch_size, 0, epoch_var, strategy)
    loop_val, _ = evaluation_batches(val, classes, args.image_size, args.batch_size, strategy)

    def fit_epoch():
        fit_model.fit(fit_train, validation_data=fit_val, epochs=1, verbose=0)

    def loop_epoch():
        steps.train_epoch(loop_train)
        steps.evaluate(loop_val)

    seconds: dict[str, list[float]] = {"fit": [], "loop": []}
    for epoch in range(args.epochs):
        for name, run in (("fit", fit_epoch), ("loop", loop_epoch)):
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
            print(f"epoch {epoch + 1} {name:>4}: {seconds[name][-1]:6.1f} s "
                  f"({len(train) / seconds[name][-1]:.1f} train img/s incl. validation)", flush=True)

    warm = {name: float(np.sum(values[1:])) for name, values in seconds.items()}
    # Each warm epoch of the loop against the fit epoch just before it: on a shared
    # machine the pairs see about the same load, and their median shrugs off a spike.
    pairs = [f / l for f, l in zip(seconds["fit"][1:], seconds["loop"][1:])]
    results = {
        "command": " ".join(["python", *sys.argv]),
        "train_images": len(train), "val_images": len(val), "image_size": args.image_size,
        "batch_size": args.batch_size, "epochs_per_arm": args.epochs,
        "seconds": seconds,
        "warm_images_per_s": {name: (args.epochs - 1) * len(train) / value for name, value in warm.items()},
        "first_epoch_ratio_loop_over_fit": seconds["loop"][0] / seconds["fit"][0],
        "warm_speed_ratio_loop_over_fit": warm["fit"] / warm["loop"],
        "pair_speed_ratios_loop_over_fit": pairs,
        "median_pair_speed_ratio_loop_over_fit": float(np.median(pairs)),
    }
    print(f"warm epochs: fit {results['warm_images_per_s']['fit']:.1f} img/s, "
          f"loop {results['warm_images_per_s']['loop']:.1f} img/s, "
          f"speed loop/fit {results['warm_speed_ratio_loop_over_fit']:.3f} in all, "
          f"{results['median_pair_speed_ratio_loop_over_fit']:.3f} median of epoch pairs (>1: the loop is faster)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

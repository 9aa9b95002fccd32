"""The pieces of training across devices and workers that one process can check: TF_CONFIG, batch splitting,
mixed precision in the training step, and what `cnnkit info` reports."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.errors import CnnkitError
from cnnkit.training.device import Cluster, device_report, helper_task, read_cluster


def _tf_config(cluster, task_type="worker", index=0):
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}


def test_tf_config_names_the_cluster_and_the_chief():
    two = {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}
    assert read_cluster({}) is None
    assert read_cluster(_tf_config({"worker": ["10.0.0.1:2222"]})) is None  # one task: a single process
    assert read_cluster(_tf_config(two, index=1)) == Cluster(2, "worker", 1, False)
    assert read_cluster(_tf_config(two)).chief and not read_cluster(_tf_config(two, index=1)).chief
    with_chief = {"chief": ["10.0.0.9:2222"], **two}
    assert read_cluster(_tf_config(with_chief, "chief")).chief
    assert not read_cluster(_tf_config(with_chief)).chief  # worker 0 is not the chief when there is one
    assert helper_task(_tf_config(two, index=1)) == "worker-1" and helper_task(_tf_config(two)) == ""


@pytest.mark.parametrize("environ, message", [
    ({"TF_CONFIG": "{not json"}, "TF_CONFIG is not valid"),
    ({"TF_CONFIG": '{"cluster": ["a"]}'}, "TF_CONFIG is not valid"),
    (_tf_config({"worker": ["a:1"], "ps": ["b:1"]}), "task type(s) ps are not used"),
    (_tf_config({"worker": ["a:1", "b:1"]}, index=2), "task 'worker' 2 is not in the cluster"),
])
def test_a_bad_tf_config_is_one_clear_error(environ, message):
    with pytest.raises(CnnkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_cluster(environ)


def _parts(count: int, batch: int, replicas: int, local: int = 1) -> list[list[list[int]]]:
    """Each pipeline's index batches, for a dataset in order 100, 101, ..."""
    import tensorflow as tf

    from cnnkit.training.datasets import replica_batches

    order = tf.range(100, 100 + count, dtype=tf.int64)
    return [[list(b.numpy()) for b in replica_batches(order, batch, first, local, replicas)]
            for first in range(0, replicas, local)]


def test_one_replica_is_plain_batching():
    assert _parts(10, 4, 1) == [[[100, 101, 102, 103], [104, 105, 106, 107], [108, 109]]]


@pytest.mark.parametrize("count, batch, replicas, local", [(18, 8, 2, 1), (19, 8, 3, 1), (7, 4, 4, 2), (3, 8, 2, 2)])
def test_replicas_split_each_global_batch_by_position(count, batch, replicas, local):
    pipelines = _parts(count, batch, replicas, local)
    steps = -(-count // batch)
    # Every pipeline runs the same number of steps, one batch per local replica each.
    assert all(len(batches) == steps * local for batches in pipelines)
    for step in range(steps):
        # The step's replicas, in replica order, put together give the same global batch one process reads.
        step_parts = [batches[step * local + r] for batches in pipelines for r in range(local)]
        expected = list(range(100 + step * batch, 100 + min(count, (step + 1) * batch)))
        assert sum(step_parts, []) == expected
        assert max(map(len, step_parts)) - min(map(len, step_parts)) <= 1  # as even as it gets


def test_mixed_precision_training_keeps_the_classifier_float32_and_scales_the_loss(tmp_path):
    import keras
    import tensorflow as tf

    from conftest import make_class_tree
    from cnnkit.backbones import get_backbone
    from cnnkit.data import load_dataset
    from cnnkit.options import TrainOptions
    from cnnkit.training.augment import Augmentation
    from cnnkit.training.datasets import training_batches
    from cnnkit.training.device import DeviceSetup
    from cnnkit.training.loop import Steps, compile_model
    from cnnkit.training.network import build_network

    # The GPU setup's precision, on the CPU: float16 layers, the softmax in float32.
    device = DeviceSetup(tf.distribute.get_strategy(), "test", "mixed_float16")
    with device.precision():
        model = build_network(get_backbone("tiny_cnn"), 2, None, 32, 0.0, Augmentation(), 0)
        augmented = build_network(get_backbone("tiny_cnn"), 2, None, 32, 0.0, Augmentation.preset("strong", 0.5), 0)
    # Every augmentation layer runs in a float16 network (Keras' RandomErasing has no float16 kernel: float32).
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    assert np.isfinite(np.asarray(tf.function(lambda x: augmented(x, training=True))(images))).all()
    assert keras.config.dtype_policy().name == "float32"  # put back after building
    assert model.get_layer("backbone").layers[-1].compute_dtype == "float16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    compile_model(model, TrainOptions(), 0.05)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)

    samples = load_dataset(make_class_tree(tmp_path / "data", {"a": 8, "b": 8}, size=32)).splits["train"]
    dataset, _ = training_batches(samples, 2, 32, 8, 0, tf.Variable(0, dtype=tf.int64), device.strategy)
    steps = Steps(model, device.strategy)
    losses = [steps.train_epoch(dataset)["loss"] for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] / 2  # it learns, in float16 with loss scaling
    # Ten batches: each is a step, or, where a float16 gradient overflowed, a step skipped and the
    # loss scale halved (how often depends on the CPU's float16 kernels; none grew it back: that takes
    # 2,000 good steps). Both are loss scaling at work.
    optimizer = model.optimizer
    halvings = round(np.log2(optimizer.initial_scale / float(optimizer.dynamic_scale.numpy())))
    assert 0 <= halvings <= 3 and int(optimizer.iterations.numpy()) + halvings == 10


def test_info_reports_devices_and_what_training_uses(monkeypatch):
    report = device_report({})
    assert report["gpus"] == [] and report["would_use"] == "CPU (float32)" and report["workers"] == 1
    two = _tf_config({"worker": ["a:1", "b:1"]}, index=1)
    assert "this is worker-1 of 2 workers" in device_report(two)["notes"][0]

    monkeypatch.setenv("TF_CONFIG", two["TF_CONFIG"])
    shown = CliRunner().invoke(app, ["info"])
    assert shown.exit_code == 0, shown.output
    assert "training uses" in shown.stdout and "CPU (float32)" in shown.stdout
    assert "tensorflow build" in shown.stdout
    assert "note: TF_CONFIG: this is worker-1 of 2 workers" in " ".join(shown.stdout.split())


def test_a_cluster_cannot_be_joined_once_tensorflow_runs(monkeypatch):
    import tensorflow as tf

    from cnnkit.training.device import setup_device

    tf.constant(1) + 1  # TensorFlow's runtime has started in this process
    monkeypatch.setenv("TF_CONFIG", _tf_config({"worker": ["127.0.0.1:1", "127.0.0.1:2"]})["TF_CONFIG"])
    with pytest.raises(CnnkitError, match="TensorFlow was already running in this process.*fresh process"):
        setup_device()


def test_one_epoch_of_the_loop_is_one_epoch_of_model_fit(tmp_path):
    """On one device the custom step does what Keras' fit did: same batches in, the same weights out."""
    import keras
    import tensorflow as tf

    from conftest import make_class_tree
    from cnnkit.backbones import get_backbone
    from cnnkit.data import load_dataset
    from cnnkit.options import TrainOptions
    from cnnkit.training.augment import Augmentation
    from cnnkit.training.datasets import evaluation_batches
    from cnnkit.training.loop import Steps, compile_model, make_optimizer
    from cnnkit.training.network import build_network

    samples = load_dataset(make_class_tree(tmp_path / "data", {"a": 9, "b": 9}, size=32)).splits["train"]
    strategy = tf.distribute.get_strategy()
    batches, _ = evaluation_batches(samples, 2, 32, 4, strategy)  # fixed order; the last batch is short
    options = TrainOptions(weight_decay=1e-3, label_smoothing=0.1)
    fitted, looped = (build_network(get_backbone("tiny_cnn"), 2, None, 32, 0.0, Augmentation(), 3) for _ in "ab")
    fitted.compile(optimizer=make_optimizer(options, 0.05), jit_compile=False,
                   loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"])
    logs = fitted.fit(batches, epochs=1, verbose=0).history
    compile_model(looped, options, 0.05)
    measured = Steps(looped, strategy, label_smoothing=0.1).train_epoch(batches)

    for a, b in zip(fitted.weights, looped.weights):  # BatchNorm moving statistics included
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert measured["loss"] == pytest.approx(logs["loss"][0], rel=1e-5)
    assert measured["accuracy"] == pytest.approx(logs["accuracy"][0])

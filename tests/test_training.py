"""Fine-tuning and training: freezing by stage, resume, interruption, monitoring output."""

import json
import os
import signal

import numpy as np
import pytest

from cnnkit.backbones import get_backbone
from cnnkit.errors import CnnkitError
from cnnkit.predict import predict_run
from cnnkit.runs import load_run
from cnnkit.training import TrainOptions, run_training
from cnnkit.training.augment import Augmentation
from cnnkit.training.network import stage_index
from cnnkit.training.schedule import schedule_factor
from conftest import make_class_tree


@pytest.fixture
def data(tmp_path):
    return make_class_tree(tmp_path / "data", {"a": 8, "b": 8}, size=32)


def _tiny(**overrides):
    options = dict(mode="train", backbone="tiny_cnn", weights="none", freeze="none", image_size=32, epochs=4,
                   head_epochs=0, batch_size=4, lr=0.05, augment="strong", erase=0.5, dropout=0.3,
                   val_split=0.25, deterministic=True, patience=10)
    options.update(overrides)
    return TrainOptions(**options)


def test_freeze_conv4_keeps_every_weight_up_to_conv4_bit_identical(data, tmp_path):
    import keras

    options = TrainOptions(mode="finetune", backbone="efficientnet_lite0", freeze="conv4", image_size=32,
                           epochs=1, head_epochs=0, batch_size=8, lr=1.0, augment="light", val_split=0.25)
    result = run_training(data, options, tmp_path / "run")
    trained = keras.saving.load_model(result.run_path / "model.keras", compile=False).get_layer("backbone")
    spec = get_backbone("efficientnet_lite0")
    pretrained = spec.build(weights="imagenet", input_size=32)
    cut = stage_index(spec, pretrained, "conv4")
    frozen_checked = changed = 0
    for i, (before, after) in enumerate(zip(pretrained.layers, trained.layers)):
        for w0, w1 in zip(before.weights, after.weights):  # includes BatchNorm moving statistics
            if i <= cut:
                assert np.array_equal(w0.numpy(), w1.numpy()), before.name
                frozen_checked += 1
            elif not np.array_equal(w0.numpy(), w1.numpy()):
                changed += 1
    assert frozen_checked > 100 and changed > 10
    assert result.history["phase"] == ["finetune"]


def test_resumed_run_matches_an_uninterrupted_one(data, tmp_path):
    whole = run_training(data, _tiny(), tmp_path / "whole")

    def interrupt_after_epoch_2(row):
        if row["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM is handled like Ctrl-C

    part = run_training(data, _tiny(), tmp_path / "part", report=interrupt_after_epoch_2)
    assert part.interrupted and len(part.history["loss"]) == 2
    manifest = load_run(part.run_path).manifest
    assert manifest.model.interrupted and "checkpoints/state.json" in manifest.files
    assert len(predict_run([data / "a"], part.run_path).predictions) == 8  # usable as it is

    epochs_seen = []
    resumed = run_training(data, TrainOptions(), tmp_path / "part", resume=True,
                           report=lambda row: epochs_seen.append(row["epoch"]))
    assert epochs_seen == [3, 4]
    assert not resumed.interrupted
    np.testing.assert_allclose(resumed.history["loss"], whole.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(resumed.history["val_accuracy"], whole.history["val_accuracy"])
    assert not (tmp_path / ".part.training").exists()


def test_run_writes_history_plots_and_works_with_predict_and_similar(data, tmp_path):
    from cnnkit.evaluation import evaluate_run
    from cnnkit.similarity import similar_images

    result = run_training(data, _tiny(epochs=2, sanity=True), tmp_path / "run")
    run = result.run_path
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    for column in ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
                   "seconds", "images_per_s"):
        assert column in header
    for plot in ("loss.png", "accuracy.png", "update_ratio.png", "first_layer_filters.png"):
        assert (run / "plots" / plot).stat().st_size > 500, plot
    report = json.loads((run / "report.json").read_text())
    assert report["diagnosis"] and report["sanity"]["steps"] >= 1
    assert set(report["update_ratios"][0]) == {"conv1", "conv2", "conv3", "conv4", "conv5"}
    evaluation = evaluate_run(run, data)
    predicted = {str(p.path): p.top[0][0] for p in predict_run([data], run).predictions}
    # evaluate and predict classify through the same saved model: the same top-1 everywhere.
    assert len(evaluation.labels) == 16
    assert evaluation.accuracy == pytest.approx(np.mean([predicted[str(p)] == p.parent.name for p in evaluation.paths]))
    assert len(similar_images(run, data / "a" / "000.png", k=3)) == 3


def test_sanity_check_overfits_two_batches(data, tmp_path):
    result = run_training(data, _tiny(epochs=1, sanity=True, augment="none"), tmp_path / "run")
    assert result.sanity["passed"], result.sanity
    assert result.sanity["final_loss"] < 0.05 < result.sanity["initial_loss"]


@pytest.mark.parametrize("overrides, message", [
    ({"mode": "finetune", "freeze": "conv9", "weights": "imagenet", "backbone": "efficientnet_lite0"}, "conv9"),
    ({"optimizer": "rmsprop"}, "--optimizer 'rmsprop'"),
    ({"schedule": "sawtooth"}, "--schedule 'sawtooth'"),
    ({"augment": "extreme"}, "--augment 'extreme'"),
    ({"mode": "finetune", "freeze": "conv4"}, "use `cnnkit train --weights none`"),
])
def test_bad_options_fail_before_any_work(data, tmp_path, overrides, message):
    with pytest.raises(CnnkitError, match=message):
        run_training(data, _tiny(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_schedules():
    assert schedule_factor("exp", 2, 10) == pytest.approx(0.97 ** 2)
    assert schedule_factor("step", 5, 10) == pytest.approx(0.1)
    assert schedule_factor("step", 8, 10) == pytest.approx(0.01)
    assert schedule_factor("inv", 2, 10) == pytest.approx(0.5)
    assert schedule_factor("cosine", 0, 10, warmup=2) == pytest.approx(1 / 3)
    assert schedule_factor("cosine", 2, 10, warmup=2) == pytest.approx(1.0)


def test_time_limit_cuts_the_epochs_and_the_cosine_schedule_to_what_fits(monkeypatch):
    """Epochs of 10 s (the first, tracing, 20 s) and a 65 s limit: 5 epochs fit, and the schedule ends with them."""
    import cnnkit.training.callbacks as callbacks
    from cnnkit.training.callbacks import TimeLimit
    from cnnkit.training.schedule import LearningRatePolicy

    clock = {"now": 0.0}
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock["now"])
    policy = LearningRatePolicy(0.1, "cosine", epochs=100, warmup=1, patience=0)
    said = []
    limit = TimeLimit(deadline=65.0, policy=policy, first_epoch=0, epochs=100, say=said.append)
    limit.set_model(type("Model", (), {"stop_training": False})())
    stopped_after = None
    for epoch in range(100):
        limit.on_epoch_begin(epoch)
        clock["now"] += 20.0 if epoch == 0 else 10.0
        limit.on_epoch_end(epoch)
        if limit.model.stop_training:
            stopped_after = epoch + 1
            break
    # After the first epoch: 45 s left at 20 s each -> 3 epochs; then 35 s left at 10 s each -> 5
    # (a sixth would end at 70 s).
    assert stopped_after == 5 and policy.epochs == 5 and clock["now"] <= 65.0
    assert policy.rate(4) < 0.1 * 0.2  # the last epoch is near the cosine's end, not at its start
    assert said[0].startswith("time limit: 3 epochs") and said[-1].startswith("time limit: 5 epochs")
    # A cut schedule survives a restart from a checkpoint.
    restored = LearningRatePolicy(0.1, "cosine", epochs=100, warmup=1)
    restored.restore(policy.state())
    assert restored.epochs == 5


def test_a_time_limited_run_stops_on_time_and_records_what_it_ran(data, tmp_path):
    import time

    started = time.monotonic()
    result = run_training(data, _tiny(epochs=10_000, patience=10_000, time_limit=0.15), tmp_path / "run")
    seconds = time.monotonic() - started
    manifest = load_run(result.run_path).manifest
    assert 1 <= manifest.model.epochs_run < 10_000
    assert manifest.options["time_limit"] == 0.15
    # 9 s of training, one epoch's overshoot at most, then evaluation and saving.
    assert seconds < 9 + 15


def test_an_edited_checkpoint_state_is_a_one_line_error_on_resume(data, tmp_path):
    def interrupt_after_epoch_2(row):
        if row["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    run_training(data, _tiny(), tmp_path / "part", report=interrupt_after_epoch_2)
    (state_file,) = (tmp_path / ".part.training").rglob("state.json")
    state = json.loads(state_file.read_text())
    state["callbacks"]["policy"]["epochs"] = "__import__('os')"  # a crafted value of the wrong type
    state_file.write_text(json.dumps(state))
    with pytest.raises(CnnkitError, match="damaged checkpoint .policy state"):
        run_training(data, TrainOptions(), tmp_path / "part", resume=True)


def test_random_erasing_fills_one_rectangle_of_each_image_while_training_only():
    assert [layer.name for layer in Augmentation.preset("light", 0.5).layers()] == [
        "aug_flip", "aug_zoom", "aug_shift", "aug_erase"]
    assert not any(layer.name == "aug_erase" for layer in Augmentation.preset("light").layers())
    erase, = Augmentation(erase=1.0).layers(seed=1)
    images = np.full((64, 28, 28, 3), 128.0, np.float32)
    erased = np.asarray(erase(images, training=True))
    for changed in np.any(erased != 128.0, axis=-1):  # the noise matches 128 exactly almost never
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert changed.sum() >= 0.95 * box  # one rectangle
        assert 0.01 <= box / changed.size <= 0.40  # 2-33 % of the image, whole pixels
    assert np.array_equal(np.asarray(erase(images, training=False)), images)


def test_a_flip_run_predicts_an_image_and_its_mirror_alike_and_reports_what_it_predicts(tmp_path):
    """--flip: the saved run averages each image with its mirror image, everywhere it predicts."""
    import keras

    from cnnkit.data import load_image
    from cnnkit.evaluation import evaluate_run

    data = make_class_tree(tmp_path / "data" / "train", {"a": 8, "b": 8}, size=32).parent
    make_class_tree(data / "test", {"a": 4, "b": 4}, size=32)
    result = run_training(data, _tiny(epochs=2, flip=True), tmp_path / "run")
    run = load_run(result.run_path)
    assert run.model.flip and run.manifest.options["flip"]

    images = np.stack([load_image(path, 32) for path in sorted((data / "test").glob("*/*.png"))])
    classify = run.classifier()
    np.testing.assert_allclose(classify(images), classify(images[:, :, ::-1]), atol=1e-5)
    # The saved model alone predicts the plain view; the run averages the two views' logits.
    model = keras.saving.load_model(result.run_path / "model.keras", compile=False)
    logits = [np.log(model.predict(x.astype("float32"), verbose=0)) for x in (images, images[:, :, ::-1])]
    expected = keras.ops.convert_to_numpy(keras.ops.softmax((logits[0] + logits[1]) / 2))
    np.testing.assert_allclose(classify(images), expected, atol=1e-4)
    # The accuracy training reports is the one evaluate measures with the saved run.
    assert result.metrics["test_accuracy"] == pytest.approx(evaluate_run(result.run_path, data).accuracy)


def test_every_random_layers_seed_generator_is_found_including_nested_ones():
    """The callbacks re-seed every random layer through Keras internals (``seed_generators``): a Keras release
    that moves them must fail here, not silently break --resume's reproducibility."""
    import keras

    from cnnkit.training.augment import Augmentation
    from cnnkit.training.callbacks import seed_generators

    inner = keras.Sequential([keras.layers.Dropout(0.5, seed=1)], name="inner")
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for layer in Augmentation(flip=True, crop=0.1, color=0.2, erase=0.5).layers(seed=3):
        x = layer(x)
    model = keras.Model(inputs, inner(keras.layers.Flatten()(x)))
    found = list(seed_generators(model))
    assert all(isinstance(g, keras.random.SeedGenerator) for g in found)
    # flip, zoom, shift, colour jitter (and the jitters inside it), erasing, and the nested dropout
    assert len({id(g) for g in found}) >= 6

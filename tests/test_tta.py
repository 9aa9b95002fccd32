"""Test-time augmentation: the views, their average, and --tta on predict and evaluate."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.evaluation import evaluate_run
from cnnkit.tta import TTA, TTAClassifier, views
from tiny_runs import shared_runs

runner = CliRunner()


def _gradient_batch(size=32):
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), np.full_like(x, 40)], axis=-1)
    return np.stack([image, 255 - image]).astype(np.uint8)


def test_twelve_views_plain_first_then_crops_and_mirrors():
    batch = _gradient_batch()
    found = list(views(batch))
    assert TTA().views == 12 and len(found) == 12
    assert all(v.shape == batch.shape and v.dtype == np.uint8 for v in found)
    assert np.array_equal(found[0], batch)  # the plain image, untouched
    assert np.array_equal(found[6], batch[:, :, ::-1])  # its mirror image
    centre, top_left, top_right, bottom_left, bottom_right = found[1:6]
    # Each crop keeps its own corner of the image and is enlarged from 87.5% of it.
    assert np.abs(top_left[:, 0, 0].astype(int) - batch[:, 0, 0]).max() <= 1
    assert np.abs(bottom_right[:, -1, -1].astype(int) - batch[:, -1, -1]).max() <= 1
    assert top_left[0, -1, -1, 0] < batch[0, -1, -1, 0] - 20  # it does not reach the far edge
    assert top_right[0, 0, -1, 0] > top_left[0, 0, -1, 0] and bottom_left[0, -1, 0, 1] > top_left[0, -1, 0, 1]
    assert not np.array_equal(centre, batch)
    assert len(list(views(batch, TTA(scales=(1.0,), flip=False)))) == 1


def test_the_classifier_averages_every_views_probabilities():
    def left_brightness(images):
        p = images[:, :, : images.shape[2] // 2].mean(axis=(1, 2, 3)) / 255.0
        return np.stack([p, 1 - p], axis=1)

    batch = _gradient_batch()
    averaged = TTAClassifier(left_brightness)
    result, plain = averaged.batch(batch)
    expected = np.mean([left_brightness(v) for v in views(batch)], axis=0)
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    np.testing.assert_allclose(averaged(batch), expected, rtol=1e-6)
    np.testing.assert_allclose(plain, left_brightness(batch), rtol=1e-6)
    # Mirroring swaps the halves, so the average is pulled towards 0.5.
    assert abs(result[0, 0] - 0.5) < abs(left_brightness(batch)[0, 0] - 0.5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data, made = shared_runs(tmp_path_factory)
    return data, {"feature_head": made["extract"], "network": made["train"]}


@pytest.mark.parametrize("kind", ["feature_head", "network"])
def test_evaluate_with_tta_reports_both_accuracies(runs, kind):
    data, paths = runs
    plain = evaluate_run(paths[kind], data)
    augmented = evaluate_run(paths[kind], data, tta=TTA())
    scores = augmented.to_dict()
    # cnnkit train's network averages each image with its mirror (--flip): no mirrored views.
    views = {"feature_head": 12, "network": 6}[kind]
    assert scores["tta_views"] == views
    assert scores["accuracy_without_tta"] == pytest.approx(plain.accuracy)
    np.testing.assert_allclose(augmented.plain_probabilities, plain.probabilities, atol=1e-5)
    assert not np.allclose(augmented.probabilities, plain.probabilities, atol=1e-4)

    result = runner.invoke(app, ["evaluate", str(paths[kind]), str(data), "--tta", "--json",
                                 "--out", str(data.parent / f"eval-{kind}")])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["tta_views"] == views and printed["accuracy"] == pytest.approx(augmented.accuracy)
    html = (data.parent / f"eval-{kind}" / "report.html").read_text()
    assert "accuracy with TTA" in html and "accuracy without TTA" in html


def test_predict_with_tta(runs):
    data, paths = runs
    folder = str(data / "test")
    plain = json.loads(runner.invoke(app, ["predict", folder, "-m", str(paths["network"]), "--json"]).stdout)
    result = runner.invoke(app, ["predict", folder, "-m", str(paths["network"]), "--json", "--tta"])
    assert result.exit_code == 0, result.output
    augmented = json.loads(result.stdout)
    assert [p["path"] for p in augmented] == [p["path"] for p in plain]
    assert all(len(p["top"]) == 3 for p in augmented)
    # Some images of a tiny network's test set give the same output for every view (all its units
    # dead on them); the views must change the others.
    assert any(a["top"] != p["top"] for a, p in zip(augmented, plain))
    assert all(sum(t["score"] for t in p["top"]) == pytest.approx(1.0, abs=1e-4) for p in augmented)


def test_a_run_that_averages_each_image_with_its_mirror_gets_no_mirrored_views(runs, tmp_path):
    # A mirrored view of such a run repeats its plain view's probabilities: the six unmirrored views
    # give what all twelve give, at half the forward passes.
    from cnnkit.data import load_image
    from cnnkit.ensemble import make_ensemble
    from cnnkit.runs import load_run
    from tiny_runs import train_run

    data, paths = runs
    run = load_run(paths["network"])  # cnnkit train: --flip by default
    unmirrored = load_run(train_run(data, tmp_path / "no-flip", flip=False))
    assert run.mirror_symmetric and not unmirrored.mirror_symmetric
    evaluation = evaluate_run(run, data, tta=TTA())
    assert evaluation.tta_views == 6 and evaluate_run(unmirrored, data, tta=TTA()).tta_views == 12
    images = np.stack([load_image(path, run.image_size) for path in evaluation.paths])
    twelve = TTAClassifier(run.classifier(), TTA())(images)
    np.testing.assert_allclose(evaluation.probabilities, twelve, atol=1e-5)
    # An ensemble is symmetric only when every member is.
    mixed = load_run(make_ensemble([run.path, unmirrored.path], tmp_path / "mixed", data=data))
    both = load_run(make_ensemble([run.path, run.path], tmp_path / "both", data=data))
    assert not mixed.mirror_symmetric and both.mirror_symmetric
    assert evaluate_run(mixed, data, tta=TTA()).tta_views == 12


def test_a_feature_head_is_mirror_symmetric_only_when_every_stage_is_pooled_over_the_whole_map(runs, tmp_path):
    # extract --flip averages each grid region with the mirror image's region moved back: the mirror
    # image then gets its regions in mirrored order, and other probabilities, so it keeps its views.
    from cnnkit.data import load_image
    from cnnkit.runs import load_run
    from tiny_runs import extract_run

    data, _ = runs
    whole = load_run(extract_run(data, tmp_path / "whole", flip=True))
    regions = load_run(extract_run(data, tmp_path / "regions", flip=True, grid=2))  # conv3 in 2 x 2 regions
    assert whole.mirror_symmetric and not regions.mirror_symmetric
    for run, views_expected in ((whole, 6), (regions, 12)):
        evaluation = evaluate_run(run, data, tta=TTA())
        assert evaluation.tta_views == views_expected
    images = np.stack([load_image(path, 32) for path in evaluation.paths])
    for run, symmetric in ((whole, True), (regions, False)):
        classify = run.classifier()
        assert np.allclose(classify(images), classify(np.ascontiguousarray(images[:, :, ::-1])), atol=1e-5) == symmetric

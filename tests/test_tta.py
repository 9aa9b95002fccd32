"""Test-time augmentation: the views, their average, and --tta on predict and evaluate."""

import json
from html import escape

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.evaluation import evaluate_run
from cnnkit.tta import TTA, TTAClassifier, views
from tiny_runs import TINY, shared_runs

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

    # The CLI's --tta averages the views the run chose on its held-out images (tta.json); the tiny
    # runs had too few of them to choose any, so it predicts as without, and says why.
    result = runner.invoke(app, ["evaluate", str(paths[kind]), str(data), "--tta", "--json",
                                 "--out", str(data.parent / f"eval-{kind}")])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["tta_views"] == 1 and printed["accuracy"] == pytest.approx(plain.accuracy)
    assert printed["accuracy_without_tta"] == pytest.approx(plain.accuracy)
    assert "to measure views on" in printed["tta"] and "predicts as without it" in printed["tta"]
    assert "note: TTA:" in result.stderr
    html = (data.parent / f"eval-{kind}" / "report.html").read_text()
    assert "accuracy with TTA" in html and "accuracy without TTA" in html


def test_predict_with_tta(runs):
    from cnnkit.predict import predict_run

    data, paths = runs
    folder = str(data / "test")
    plain = json.loads(runner.invoke(app, ["predict", folder, "-m", str(paths["network"]), "--json"]).stdout)
    augmented = [p.to_dict() for p in predict_run([folder], paths["network"], 3, tta=TTA()).predictions]
    assert [p["path"] for p in augmented] == [p["path"] for p in plain]
    assert all(len(p["top"]) == 3 for p in augmented)
    # Some images of a tiny network's test set give the same output for every view (all its units
    # dead on them); the views must change the others.
    assert any(a["top"] != p["top"] for a, p in zip(augmented, plain))
    assert all(sum(t["score"] for t in p["top"]) == pytest.approx(1.0, abs=1e-4) for p in augmented)
    # The CLI's --tta: the run's own choice (none, on its six validation images), said in a note
    # (once per process: forget the evaluate test's).
    import cnnkit.engines

    cnnkit.engines._noted.clear()
    result = runner.invoke(app, ["predict", folder, "-m", str(paths["network"]), "--json", "--tta"])
    assert result.exit_code == 0, result.output
    assert [p["top"] for p in json.loads(result.stdout)] == [p["top"] for p in plain]
    assert result.stderr.count("note: TTA: this run had only 6 validation images") == 1


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


def _scores(probabilities_by_name, labels, seen=()):
    from cnnkit.tta import CANDIDATES, NONE, choose

    boxes = {}
    for name, tta in [("none", NONE), *CANDIDATES.items()]:
        for box in tta.boxes():  # every box of a set gets the set's probabilities: its mean is them
            boxes.setdefault(box, probabilities_by_name.get(name, probabilities_by_name["none"]))
    return choose(boxes, labels, {"zoom": CANDIDATES["zoom"]}, "validation", seen)


def test_views_are_chosen_only_when_they_fix_clearly_more_than_they_break():
    from cnnkit.tta import MIN_EVIDENCE

    labels = np.arange(200) % 2
    right = np.eye(2)[labels]
    # The plain image: right on the first 170 of 200 images, 0.8 sure either way.
    plain = np.where(np.arange(200)[:, None] < 170, 0.6 * right + 0.2, 0.6 * (1 - right) + 0.2)

    def with_views(fixed, broken, sure=0.8):
        """The zoom set's mean: ``fixed`` of the plain image's mistakes right, ``broken`` of its right ones wrong."""
        mean = np.where(np.arange(200)[:, None] < 170, (2 * sure - 1) * right + 1 - sure,
                        (2 * sure - 1) * (1 - right) + 1 - sure)
        mean[170:170 + fixed] = 0.8 * right[170:170 + fixed] + 0.1
        mean[:broken] = 0.6 * (1 - right[:broken]) + 0.2
        return (6 * mean - plain) / 5  # the five crops, so that with the plain view they average to mean

    chosen = _scores({"none": plain, "zoom": with_views(12, 1)}, labels)  # 11 on balance >= 2 sqrt(13)
    assert chosen.chosen == "zoom" and (chosen.score("zoom").fixed, chosen.score("zoom").broken) == (12, 1)
    assert "zoom (6 views)" in chosen.line() and "0.905 vs 0.850 without (fixing 12, breaking 1)" in chosen.line()
    # Six more right on balance, but 14 broken for 20 fixed: within what chance gives, the plain image stays.
    lucky = _scores({"none": plain, "zoom": with_views(20, 14)}, labels)
    assert lucky.score("zoom").accuracy > lucky.score("none").accuracy and lucky.chosen == "none"
    assert "no view set clearly beat the plain image" in lucky.line() and "fixing 20 and breaking 14" in lucky.line()
    # Clearly more right, but every other image less sure: the log loss rises, the plain image stays.
    unsure = _scores({"none": plain, "zoom": with_views(12, 1, sure=0.55)}, labels)
    assert unsure.score("zoom").log_loss > unsure.score("none").log_loss and unsure.chosen == "none"
    # Too few held-out images choose nothing, whatever they show.
    few = _scores({"none": plain[170 - MIN_EVIDENCE // 2:170 + MIN_EVIDENCE // 2 - 1],
                   "zoom": with_views(12, 1)[170 - MIN_EVIDENCE // 2:170 + MIN_EVIDENCE // 2 - 1]},
                  labels[170 - MIN_EVIDENCE // 2:170 + MIN_EVIDENCE // 2 - 1])
    assert few.chosen == "none" and "needed to choose" in few.line()
    # Views the network was trained on need only fix as many as they break and lower the log loss.
    trained = _scores({"none": plain, "zoom": with_views(6, 2)}, labels, seen=["zoom", "mirror"])
    assert trained.chosen == "zoom" and trained.seen == ["zoom"]
    assert "zoom (6 views, of the kind it was trained on), chosen" in trained.line()
    assert _scores({"none": plain, "zoom": with_views(6, 2)}, labels).chosen == "none"
    assert _scores({"none": plain, "zoom": with_views(2, 3)}, labels, seen=["zoom"]).chosen == "none"
    assert _scores({"none": plain, "zoom": with_views(6, 2, sure=0.55)}, labels, seen=["zoom"]).chosen == "none"


def test_a_network_has_seen_the_views_its_augmentation_made():
    from cnnkit.training.augment import Augmentation
    from cnnkit.tta import seen_candidates

    def seen(name):
        augmentation = Augmentation.preset(name)
        return seen_candidates(augmentation.flip, augmentation.crop)

    assert seen("none") == [] and seen("light") == seen("strong") == ["mirror", "zoom", "zoom+mirror"]
    assert seen_candidates(True, 0.05) == ["mirror"] and seen_candidates(False, 0.1) == ["zoom"]


@pytest.fixture(scope="module")
def chosen_runs(tmp_path_factory, monkeypatch_module):
    """Tiny runs that choose their views on their (few) held-out images: MIN_EVIDENCE lowered to 5, and
    extract's validation images (6) enough to choose on."""
    import cnnkit.extraction
    import cnnkit.tta
    from tiny_runs import extract_run, make_data, train_run

    monkeypatch_module.setattr(cnnkit.tta, "MIN_EVIDENCE", 5)
    monkeypatch_module.setattr(cnnkit.extraction, "VALIDATION_EVIDENCE", 5)
    root = tmp_path_factory.mktemp("chosen")
    data = make_data(root / "data")
    return data, {"oof": extract_run(data, root / "oof", val_split=0.0), "val": extract_run(data, root / "val"),
                  "network": train_run(data, root / "net", flip=False)}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_every_run_records_the_views_its_held_out_images_chose(chosen_runs, tmp_path):
    from cnnkit.data import load_image
    from cnnkit.ensemble import make_ensemble
    from cnnkit.runs import load_run

    data, paths = chosen_runs
    every = {"none", "mirror", "zoom", "zoom+mirror"}  # none of these runs averages the mirror itself
    expected = {"oof": ("out-of-fold", 24, every), "val": ("validation", 6, every),
                "network": ("validation", 6, every)}
    for name, (evidence, images, names) in expected.items():
        run = load_run(paths[name])
        choice = run.tta_choice
        assert (choice.evidence, choice.images, {s.name for s in choice.scores}) == (evidence, images, names), name
        assert "tta.json" in run.manifest.files  # sealed with the run
        html = (run.path / "report.html").read_text()
        assert "<h2>Test-time augmentation</h2>" in html and escape(run.tta_line) in html
        # --tta averages exactly the chosen views, and reports the plain view from the same pass.
        evaluation = evaluate_run(run, data, tta=True)
        assert evaluation.tta_views == choice.tta.views and evaluation.tta_line == run.tta_line
        images_ = np.stack([load_image(p, run.image_size) for p in evaluation.paths])
        np.testing.assert_allclose(evaluation.probabilities, TTAClassifier(run.classifier(), choice.tta)(images_),
                                   atol=1e-5)
        np.testing.assert_allclose(evaluation.plain_probabilities, run.classifier()(images_), atol=1e-5)
    # An ensemble's members each average their own chosen views.
    members = [load_run(paths[n]) for n in ("oof", "network")]
    ensemble = load_run(make_ensemble([m.path for m in members], tmp_path / "ens", data=data))
    evaluation = evaluate_run(ensemble, data, tta=True)
    images_ = np.stack([load_image(p, ensemble.image_size) for p in evaluation.paths])
    expected = np.mean([TTAClassifier(m.classifier(), m.tta_choice.tta)(images_) for m in members], axis=0)
    np.testing.assert_allclose(evaluation.probabilities, expected, atol=1e-5)
    assert all(f"member {i} {m.tta_choice.chosen}" in ensemble.tta_line for i, m in enumerate(members))


@pytest.mark.parametrize("text", ['{"format": 1, "evidence": "validation", "images": 5, "scores": [], '
                                  '"chosen": "none"}',
                                  '{"format": 1, "evidence": "validation", "images": 5, "chosen": "../../etc", '
                                  '"scores": [{"name": "none", "views": 1, "accuracy": 0.5, "log_loss": 1.0, '
                                  '"fixed": 0, "broken": 0}]}',
                                  '{"format": 1, "evidence": "validation", "images": 5, "chosen": "zoom", '
                                  '"scores": [{"name": "mirror", "views": 2, "accuracy": 0.5, "log_loss": 1.0, '
                                  '"fixed": 0, "broken": 0}]}',
                                  '{"format": 1, "evidence": "validation", "images": 5, "chosen": "none", '
                                  '"seen": ["zoom"], "scores": [{"name": "none", "views": 1, "accuracy": 0.5, '
                                  '"log_loss": 1.0, "fixed": 0, "broken": 0}]}',
                                  '{"__class__": "os.system", "format": 1}', "[1, 2", "\xff\xfe"])
def test_a_crafted_choice_file_is_refused_in_one_line(chosen_runs, tmp_path, text):
    import shutil

    from cnnkit.errors import CnnkitError
    from cnnkit.runs import load_run
    from conftest import reseal

    data, paths = chosen_runs
    forged = tmp_path / "forged"
    shutil.copytree(paths["oof"], forged)
    (forged / "tta.json").write_bytes(text.encode("latin-1"))
    reseal(forged)
    with pytest.raises(CnnkitError, match=r"tta.json: not a view choice cnnkit wrote .*re-create the run"):
        evaluate_run(forged, data, tta=True)
    result = runner.invoke(app, ["evaluate", str(forged), str(data), "--tta", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "tta.json: not a view choice" in result.output
    assert "Traceback" not in result.output


def test_the_views_features_are_computed_once_per_image_and_view(chosen_runs, monkeypatch):
    """A second run on the same images (another head or layer) reads its views' features from the cache."""
    import cnnkit.features
    from cnnkit.extraction import view_features
    from cnnkit.features import FeatureConfig
    from cnnkit.tta import CANDIDATES, all_boxes

    data, _ = chosen_runs
    paths = sorted((data / "train").rglob("*.png"))[:7]
    config = FeatureConfig(TINY["backbone"], weights="none", image_size=32)
    boxes = all_boxes(CANDIDATES)[1:]
    first = view_features(paths, boxes, config, "tf")
    assert set(first) == set(boxes) and all(len(rows) == 7 for f in first.values() for rows in f.values())

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("a cached view was computed again")

    monkeypatch.setattr(cnnkit.features, "FeatureExtractor", no_forward_pass)
    again = view_features(paths[::-1], boxes, config, "tf")
    for box in boxes:
        for stage, rows in first[box].items():
            np.testing.assert_array_equal(again[box][stage], rows[::-1])

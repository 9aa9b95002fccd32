"""Ensembles: a run that averages its members, pinned so it cannot change behind its back."""

import json
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.ensemble import make_ensemble, parse_weights
from cnnkit.errors import CnnkitError
from cnnkit.evaluation import evaluate_run
from cnnkit.kinds.ensemble import member_input, members
from cnnkit.runs import load_run
from cnnkit.similarity import similar_images
from conftest import make_class_tree, reseal
from tiny_runs import extract_run, shared_runs

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    data, runs = shared_runs(tmp_path_factory)
    feat, net = runs["extract"], runs["train"]
    ensemble = make_ensemble([feat, net], tmp_path_factory.mktemp("ensemble") / "ens", weights=[3, 1])
    return data.parent, data, feat, net, ensemble


def test_the_ensemble_is_the_weighted_mean_of_its_members(made):
    root, data, feat, net, ensemble = made
    run = load_run(ensemble)
    assert run.kind == "ensemble" and run.manifest.command == "ensemble"
    assert [m.weight for m in run.model.members] == [0.75, 0.25]
    assert run.class_names == load_run(feat).class_names
    combined = evaluate_run(ensemble, data).probabilities
    expected = 0.75 * evaluate_run(feat, data).probabilities + 0.25 * evaluate_run(net, data).probabilities
    np.testing.assert_allclose(combined, expected, atol=1e-5)


def test_members_are_copies_and_the_originals_can_go(made, tmp_path):
    root, data, feat, net, ensemble = made
    moved = tmp_path / "ens"
    shutil.copytree(ensemble, moved)
    shutil.copytree(feat, tmp_path / "feat")
    shutil.rmtree(tmp_path / "feat")  # nothing outside the ensemble is needed
    run = load_run(moved)
    assert "members/0/head.skops" in run.manifest.files and "members/1/model.keras" in run.manifest.files
    assert [seal for seal in (m.seal for m in run.model.members)] == [load_run(feat).manifest.seal,
                                                                      load_run(net).manifest.seal]
    assert len(evaluate_run(moved, data).labels) == 9


def test_a_changed_member_file_is_refused(made, tmp_path):
    copy = tmp_path / "ens"
    shutil.copytree(made[4], copy)
    (copy / "members" / "1" / "history.csv").write_text("epoch\n")
    with pytest.raises(CnnkitError, match="history.csv: was modified"):
        load_run(copy)


def test_a_member_resealed_after_the_fact_is_refused(made, tmp_path):
    """Even if the member and the ensemble are both consistently re-sealed, the recorded member seal differs."""
    copy = tmp_path / "ens"
    shutil.copytree(made[4], copy)
    reseal(copy / "members" / "0", lambda m: m["metrics"].update(test_accuracy=0.0))
    reseal(copy)
    with pytest.raises(CnnkitError, match="seal mismatch"):
        load_run(copy).classifier()


@pytest.mark.parametrize("path", ["../feat", "/tmp", "members/0/..", "."])
def test_member_paths_stay_inside_the_run(made, tmp_path, path):
    copy = tmp_path / "ens"
    shutil.copytree(made[4], copy)
    reseal(copy, lambda m: m["model"]["members"][0].update(path=path))
    with pytest.raises(CnnkitError, match="not a file inside the run"):
        members(load_run(copy))
    with pytest.raises(CnnkitError, match="not a file inside the run"):  # the TTA view count reads members too
        load_run(copy).mirror_symmetric


def test_a_member_behind_a_symbolic_link_is_refused(made, tmp_path):
    copy = tmp_path / "ens"
    shutil.copytree(made[4], copy)
    shutil.copytree(made[2], tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", copy / "linked")
    reseal(copy, lambda m: m["model"]["members"][0].update(path="linked"))
    with pytest.raises(CnnkitError, match="symbolic link"):
        members(load_run(copy))
    with pytest.raises(CnnkitError, match="symbolic link"):
        load_run(copy).mirror_symmetric


def test_members_with_other_classes_are_refused_in_one_line(made, tmp_path):
    root, data, feat, net, ensemble = made
    other = make_class_tree(tmp_path / "other", {"red": 6, "green": 6, "cyan": 6}, size=32)
    odd = extract_run(other, tmp_path / "odd", val_split=0.0)
    with pytest.raises(CnnkitError, match="an ensemble's members must have the same classes"):
        make_ensemble([feat, odd], tmp_path / "bad")
    result = runner.invoke(app, ["ensemble", str(feat), str(odd), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "cyan" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_weights_and_member_count_are_checked():
    assert parse_weights(None, 2) == [1.0, 1.0] and parse_weights("2,1", 2) == [2.0, 1.0]
    for text, message in (("1", "1 number"), ("1,x", "comma-separated"), ("1,-1", "positive"), ("1,inf", "positive")):
        with pytest.raises(CnnkitError, match=message):
            parse_weights(text, 2)
    with pytest.raises(CnnkitError, match="at least two"):
        make_ensemble(["a"], "out")


def test_cli_writes_an_ensemble_that_every_reader_takes(made, tmp_path):
    root, data, feat, net, ensemble = made
    out = tmp_path / "cli-ens"
    result = runner.invoke(app, ["ensemble", str(feat), str(net), "--out", str(out), "--weights", "2,1",
                                 "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["run"] == str(out) and printed["data_accuracy"] == pytest.approx(evaluate_run(out, data).accuracy)
    run = load_run(out)
    assert {"report.html", "heldout/data/metrics.json", "heldout/data/confusion.png"} <= set(run.manifest.files)
    assert run.manifest.command_line.endswith("--weights 2,1")

    image = str(next((data / "test" / "blue").iterdir()))
    predicted = runner.invoke(app, ["predict", image, "-m", str(out), "--json"])
    assert predicted.exit_code == 0 and json.loads(predicted.stdout)[0]["top"][0]["label"] in run.class_names
    evaluated = runner.invoke(app, ["evaluate", str(out), str(data), "--json", "--out", str(tmp_path / "ev")])
    assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["images"] == 9
    explained = runner.invoke(app, ["explain", image, "-m", str(out), "--out", str(tmp_path / "ex"), "--json"])
    assert explained.exit_code == 0, explained.output
    assert np.load(json.loads(explained.stdout)[0]["heatmap"]).shape == (32, 32)
    again = runner.invoke(app, ["ensemble", str(feat), str(net), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr


def test_similar_on_an_ensemble_says_to_use_a_member(made):
    root, data, feat, net, ensemble = made
    with pytest.raises(CnnkitError, match="no retrieval index"):
        similar_images(ensemble, next((data / "test" / "red").iterdir()))


def test_members_of_different_input_sizes_each_see_their_own(made, tmp_path):
    root, data, feat, net, ensemble = made
    small = extract_run(data, tmp_path / "small", image_size=24)
    mixed = make_ensemble([feat, small], tmp_path / "mixed")
    run = load_run(mixed)
    assert run.image_size == 32
    combined = evaluate_run(mixed, data).probabilities
    alone = evaluate_run(small, data).probabilities
    # Resized by TensorFlow rather than decoded at 24 px by Pillow: close, not identical.
    expected = (evaluate_run(feat, data).probabilities + alone) / 2
    assert np.abs(combined - expected).max() < 0.1


def test_a_smaller_member_sees_the_image_as_if_decoded_at_its_own_size(tmp_path):
    """28 px pictures decoded at 128 px and resized back for a 28 px member: within a grey level or two."""
    from PIL import Image

    from cnnkit.data.images import load_image

    y, x = np.mgrid[0:28, 0:28]
    picture = (127 + 120 * np.sin(x / 3.0) * np.cos(y / 4.0)).astype(np.uint8)  # smooth, like a garment
    Image.fromarray(picture).save(tmp_path / "garment.png")
    direct = load_image(tmp_path / "garment.png", 28).astype(int)
    seen = member_input(load_image(tmp_path / "garment.png", 128)[None], 1.0, 1.0, 28)[0].astype(int)
    assert seen.shape == direct.shape and seen.dtype == np.int64
    assert np.abs(seen - direct).mean() < 1.5 and np.abs(seen - direct).max() <= 12
    # The same share of the centre when the member crops more than the ensemble does.
    cropped = member_input(np.zeros((1, 100, 100, 3), np.uint8), 1.0, 0.5, 20)
    assert cropped.shape == (1, 20, 20, 3) and cropped.dtype == np.uint8
    # A crafted member crop far below a pixel still gives the member a (one-pixel) view, not an error.
    tiny = member_input(np.full((1, 100, 100, 3), 7, np.uint8), 1.0, 1e-9, 20)
    assert tiny.shape == (1, 20, 20, 3) and (tiny == 7).all()

"""`--grid`: stages pooled over N x N regions, flip-averaged region by region, everywhere a run is read."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.errors import CnnkitError
from cnnkit.features import FeatureCache, FeatureConfig, FeatureExtractor, grid_bounds, unmirror
from cnnkit.options import ExtractOptions
from conftest import make_class_tree

runner = CliRunner()


@pytest.mark.parametrize("grid", range(1, 7))
def test_regions_cover_each_side_and_mirror_onto_each_other(grid):
    for size in range(1, 16):
        bounds = grid_bounds(size, grid)
        assert len(bounds) == grid and bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(a < b and a <= previous_end for (a, b), (_, previous_end) in zip(bounds[1:], bounds))
        assert bounds[::-1] == [(size - b, size - a) for a, b in bounds]  # region i mirrors onto grid - 1 - i


def test_grid_features_are_region_means_and_the_last_stage_stays_global(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    whole = FeatureExtractor(FeatureConfig("tiny_cnn", "none", 32))(images)
    grid = FeatureExtractor(FeatureConfig("tiny_cnn", "none", 32, grid=2))(images)
    for stage in ("conv1", "conv2", "conv3", "conv4"):  # 16, 8, 4 and 2 px maps: four equal regions each
        channels = whole[stage].shape[1]
        assert grid[stage].shape == (5, 4 * channels)
        np.testing.assert_allclose(grid[stage].reshape(5, 4, channels).mean(1), whole[stage], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(grid["conv5"], whole["conv5"])  # the last stage: top, pooled whole


def test_flip_averaged_grid_features_of_a_mirror_image_are_the_same_regions_mirrored():
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    extractor = FeatureExtractor(FeatureConfig("tiny_cnn", "none", 32, flip=True, grid=3))
    own, mirrored = extractor(images), extractor(np.ascontiguousarray(images[:, :, ::-1]))
    for stage in ("conv2", "conv3"):  # 8 and 4 px: overlapping regions where 3 does not divide the side
        np.testing.assert_allclose(mirrored[stage], unmirror(own[stage], 3), rtol=1e-5, atol=1e-5)
        assert not np.allclose(mirrored[stage], own[stage], atol=1e-3)  # left and right regions really differ
    np.testing.assert_allclose(mirrored["conv5"], own["conv5"], rtol=1e-5, atol=1e-5)


def test_a_grid_has_its_own_cache_and_the_whole_map_keeps_the_old_one():
    assert FeatureConfig("tiny_cnn", "none", 32).resolved().cache_key == "none-32px-avg"
    config = FeatureConfig("tiny_cnn", "none", 32, flip=True, grid=3).resolved()
    assert config.cache_key == "none-32px-avg-grid3-flip"
    assert FeatureCache(config).meta["grid"] == 3 and "grid" not in FeatureCache(FeatureConfig("tiny_cnn")).meta


@pytest.mark.parametrize("grid", [0, 7, 2.5, True])
def test_a_bad_grid_is_refused_with_the_range(grid):
    with pytest.raises(CnnkitError, match=r"--grid .*1 .* 6"):
        ExtractOptions(grid=grid)


def test_a_bad_grid_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    data = make_class_tree(tmp_path / "data", {"a": 3, "b": 3})
    result = runner.invoke(app, ["extract", str(data), "--grid", "9", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--grid" in result.output
    assert not (tmp_path / "run").exists()


def test_a_grid_run_classifies_raw_images_as_its_head_was_fitted_and_records_its_grid(tmp_path):
    from cnnkit.data import load_image
    from cnnkit.extraction import run_extract
    from cnnkit.features import compute_features
    from cnnkit.heads import load_head
    from cnnkit.runs import load_run

    data = make_class_tree(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    options = ExtractOptions(backbone="tiny_cnn", weights="none", image_size=32, engine="tf", layers="conv3,top",
                             flip=True, grid=3, pca=None, cv=3, val_split=0.0)
    result = run_extract(data, options, tmp_path / "run")
    run = load_run(result.run_path)
    assert run.model.grid == 3 and run.model.flip and result.feature_dims == 9 * 8 + 16
    assert "--grid 3" in run.manifest.command_line
    paths = sorted(data.rglob("*.png"))
    # The features the head was fitted on (the cache extract filled) against the run's own
    # classifier on decoded pixels (cnnkit.kinds: the path predict, tta and similar take).
    table = compute_features(paths, FeatureConfig("tiny_cnn", "none", 32, flip=True, grid=3))
    fitted = load_head(run.file("head.skops")).predict_proba(table.select(["conv3", "top"]))
    direct = run.classifier("tf")(np.stack([load_image(p, 32) for p in paths]))
    np.testing.assert_allclose(direct, fitted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grid", [0, 7, 10**9, "3; import os"])
def test_a_run_whose_manifest_claims_a_crafted_grid_is_refused(grid):
    # The grid sizes slices of the feature map: a manifest may only name what --grid accepts.
    from pydantic import ValidationError

    from cnnkit.kinds.feature_head import FeatureHeadModel

    fields = dict(backbone="tiny_cnn", weights="none", layers=["conv3"], pool="avg", flip=False, head="logreg",
                  pca=None, whiten=False, l2_normalize=False, best_params={}, cv_folds=0, feature_dims=8)
    assert FeatureHeadModel(**fields).grid == 1  # runs from before --grid read as the whole map
    with pytest.raises(ValidationError):
        FeatureHeadModel(**fields, grid=grid)

"""Feature extraction runs end to end on tiny data with an untrained tiny backbone."""

import json

import numpy as np
import pytest
import skops.io as sio

from cnnkit.errors import CnnkitError
from cnnkit.evaluation import Evaluation, evaluate_run, write_evaluation
from cnnkit.extraction import ExtractOptions, run_extract
from cnnkit.features import FeatureConfig, compute_features
from cnnkit.heads import HEADS, fit_head, load_head
from cnnkit.predict import predict_run
from cnnkit.runs import load_run
from cnnkit.similarity import nearest, similar_images
from conftest import make_class_tree, reseal, write_bad_files

TINY = dict(backbone="tiny_cnn", weights="none", image_size=32)


@pytest.fixture
def data(tmp_path):
    return make_class_tree(tmp_path / "data", {"red": 8, "green": 8, "blue": 8})


@pytest.fixture
def run(tmp_path, data):
    options = ExtractOptions(**TINY, layers="conv3,top", head="logreg", cv=3)
    return run_extract(data, options, tmp_path / "run")


def test_feature_cache_computes_each_image_once(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "own_cache"))
    config = FeatureConfig(**TINY)
    paths = sorted(data.rglob("*.png"))
    first = compute_features(paths[:-1], config)
    again = compute_features(paths[:-1], config)
    grown = compute_features(paths, config)
    assert first.computed == len(paths) - 1 and again.computed == 0 and grown.computed == 1
    np.testing.assert_allclose(again.features["conv3"], first.features["conv3"], rtol=1e-6)
    np.testing.assert_allclose(grown.features["conv5"][:-1], first.features["conv5"], rtol=1e-6)
    assert set(first.features) == {"conv1", "conv2", "conv3", "conv4", "conv5"}
    # Another pooling is another cache entry.
    assert compute_features(paths[:2], FeatureConfig(**TINY, pool="max")).computed == 2
    # An unreadable file is tried (and named) every time, and never counted as computed.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    for use_cache in (True, False):
        table = compute_features([*paths[:2], broken], config, use_cache=use_cache)
        assert [f.path for f in table.failures] == [broken] and table.computed == (0 if use_cache else 2)


def test_unreadable_images_are_reported_and_left_out(data):
    write_bad_files(data / "red")
    paths = sorted(p for p in data.rglob("*") if p.is_file())
    table = compute_features(paths, FeatureConfig(**TINY))
    assert {f.path.name for f in table.failures} == {"truncated.jpg", "empty.png", "notes.txt", "fake.png"}
    assert len(table.kept) == 24


@pytest.mark.parametrize("head", HEADS)
def test_every_head_gives_probabilities(head):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 12)
    features = rng.normal(size=(36, 10)) + labels[:, None] * 2.0
    fitted = fit_head(features, labels, head, pca="auto", cv=3)
    proba = fitted.pipeline.predict_proba(features)
    assert proba.shape == (36, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert fitted.cv_accuracy > 0.9 and fitted.cv_folds == 3
    assert "n_components" in fitted.best_params


def test_cross_validation_picks_from_the_grid_and_tiny_classes_skip_it():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 20)
    features = rng.normal(size=(40, 5)) + labels[:, None]
    fitted = fit_head(features, labels, "knn", pca=None, cv=5)
    assert fitted.best_params["n_neighbors"] in (1, 3, 5, 10, 20)
    one_each = fit_head(features[[0, 39]], labels[[0, 39]], "logreg", pca=None)
    assert one_each.cv_accuracy is None and one_each.cv_folds == 0


def test_run_round_trip_gives_identical_predictions(run, data):
    loaded = load_run(run.run_path)
    assert loaded.class_names == ["blue", "green", "red"]
    assert loaded.model.layers == ["conv3", "top"] and loaded.kind == "feature_head"
    report = predict_run([data], run.run_path, k=3)
    assert len(report.predictions) == 24
    images = np.stack([__import__("cnnkit").data.load_image(p.path, 32) for p in report.predictions])
    classifier = loaded.classifier()
    expected = classifier(images)
    for prediction, row in zip(report.predictions, expected):
        assert prediction.top[0][1] == pytest.approx(float(row.max()), abs=1e-6)
    assert run.metrics["train_accuracy"] is not None and "val_accuracy" in run.metrics


def test_existing_out_is_never_overwritten_without_force(run, data):
    with pytest.raises(CnnkitError, match="already exists"):
        run_extract(data, ExtractOptions(**TINY), run.run_path)
    replaced = run_extract(data, ExtractOptions(**TINY, head="knn", cv=3), run.run_path, force=True)
    assert load_run(replaced.run_path).model.head == "knn"


def test_tampered_head_bytes_are_refused(run):
    head = run.run_path / "head.skops"
    head.write_bytes(head.read_bytes() + b"x")
    with pytest.raises(CnnkitError, match="head.skops: was modified after the run was written"):
        load_run(run.run_path)


def test_head_with_foreign_types_is_refused_even_with_a_matching_checksum(run, tmp_path):
    import collections

    evil = tmp_path / "evil.skops"
    sio.dump({"x": collections.Counter("abc")}, evil)
    with pytest.raises(CnnkitError, match="refusing to load"):
        load_head(evil)
    # Planting it in the run with forged checksums and seal still gets refused.
    head = run.run_path / "head.skops"
    head.write_bytes(evil.read_bytes())
    reseal(run.run_path)
    with pytest.raises(CnnkitError, match="refusing to load"):
        load_run(run.run_path).classifier()


def test_pickled_index_is_refused(run, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = run.run_path / "index" / "features.npy"
    np.save(path, np.array([Payload()], dtype=object), allow_pickle=True)
    reseal(run.run_path)
    with pytest.raises(CnnkitError, match="not a plain array"):
        load_run(run.run_path).load_array("index/features.npy")
    assert not marker.exists()


def test_damaged_manifest_and_missing_run(run, tmp_path):
    (run.run_path / "manifest.json").write_text("{not json")
    with pytest.raises(CnnkitError, match="damaged"):
        load_run(run.run_path)
    with pytest.raises(CnnkitError, match="no such run"):
        load_run(tmp_path / "nope")


def test_evaluation_numbers_on_a_known_case(tmp_path):
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([0, 1, 1, 2])
    evaluation = Evaluation(["a", "b", "c"], labels, probabilities, [])
    assert evaluation.accuracy == 0.75
    assert evaluation.top_k_accuracy(2) == 1.0
    assert evaluation.confusion().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    per_class = evaluation.per_class()
    assert per_class["a"]["precision"] == 0.5 and per_class["b"]["recall"] == 0.5
    written = write_evaluation(evaluation, tmp_path / "eval")
    assert json.loads((written / "metrics.json").read_text())["accuracy"] == 0.75
    assert (written / "confusion.png").stat().st_size > 1000


def test_evaluate_run_on_its_own_data_agrees_with_the_run_metrics(run, data):
    evaluation = evaluate_run(run.run_path, data)
    assert len(evaluation.labels) == 24
    # evaluate classifies the image files; extract scored the cached features: same numbers.
    n_train, n_val = run.counts["train"], run.counts["val"]
    expected = (run.metrics["train_accuracy"] * n_train + run.metrics["val_accuracy"] * n_val) / 24
    assert evaluation.accuracy == pytest.approx(expected, abs=1e-9)


def test_similar_finds_the_query_itself_first(run, data):
    train_paths = json.loads((run.run_path / "index" / "paths.json").read_text())
    query = next(p for p in train_paths if "/green/" in p)
    neighbours = similar_images(run.run_path, query, k=3)
    assert len(neighbours) == 3
    scores = [n.score for n in neighbours]
    assert scores == sorted(scores, reverse=True)
    assert neighbours[0].path == query and neighbours[0].score == pytest.approx(1.0, abs=1e-5)
    assert neighbours[0].label == "green"


def test_exact_nearest_search_matches_brute_force():
    rng = np.random.default_rng(0)
    index = rng.normal(size=(1000, 16)).astype(np.float32)
    index /= np.linalg.norm(index, axis=1, keepdims=True)
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    rows, scores = nearest(index, queries, k=4, chunk=128)
    expected = np.argsort(-(queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ index.T, axis=1)[:, :4]
    assert rows.tolist() == expected.tolist()


def test_a_cached_rerun_reuses_the_same_head_and_plot_files(data, tmp_path, monkeypatch):
    """An identical rerun copies head.skops and confusion.png kept from the first run (no skops
    or matplotlib import): the same bytes, the head still loads and predicts alike."""
    import cnnkit.evaluation
    import cnnkit.heads

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "own_cache"))
    options = ExtractOptions(**TINY, layers="top", head="knn", pca=None, cv=3, val_split=0.25)
    first = run_extract(data, options, tmp_path / "first")

    def must_not_draw(*args):
        raise AssertionError("drew again")

    monkeypatch.setattr(cnnkit.evaluation, "_draw_confusion", must_not_draw)
    monkeypatch.setattr(sio, "dump", must_not_draw)
    second = run_extract(data, options, tmp_path / "second")
    for name in ("head.skops", "heldout/val/confusion.png"):
        assert (first.run_path / name).read_bytes() == (second.run_path / name).read_bytes()
    assert second.metrics == first.metrics
    head = load_head(second.run_path / "head.skops")
    x = np.random.default_rng(0).random((4, first.feature_dims), dtype=np.float32)
    assert np.array_equal(head.predict(x), first.fitted.pipeline.predict(x))
    # Another head, or --no-cache, writes its own.
    assert cnnkit.heads._fitted_digest(first.fitted.pipeline) == cnnkit.heads._fitted_digest(second.fitted.pipeline)
    other = fit_head(x, np.array([0, 0, 1, 1]), "knn", None, cv=2)
    assert cnnkit.heads._fitted_digest(other.pipeline) != cnnkit.heads._fitted_digest(first.fitted.pipeline)
    with pytest.raises(AssertionError, match="drew again"):
        run_extract(data, ExtractOptions(**{**options.__dict__, "use_cache": False}), tmp_path / "third")


def test_a_crafted_file_in_the_reuse_cache_is_copied_but_never_loaded_as_a_head(data, tmp_path, monkeypatch):
    """reuse_or_write only copies bytes; the run's head is still loaded through skops' type check,
    so a file planted under the digest an identical rerun looks up is refused, not run."""
    import collections

    import cnnkit.heads
    from cnnkit.paths import cache_dir

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "own_cache"))
    options = ExtractOptions(**TINY, layers="top", head="knn", pca=None, cv=3, val_split=0.25)
    first = run_extract(data, options, tmp_path / "first")
    kept = cache_dir() / f"heads/{cnnkit.heads._fitted_digest(first.fitted.pipeline)}.skops"
    assert kept.is_file()
    sio.dump({"x": collections.Counter("abc")}, kept)  # foreign types, as an attacker would plant
    planted = run_extract(data, options, tmp_path / "planted")
    with pytest.raises(CnnkitError, match="refusing to load"):
        load_run(planted.run_path).classifier()
    kept.write_bytes(b"not a zip")
    damaged = run_extract(data, options, tmp_path / "damaged")
    with pytest.raises(CnnkitError, match="damaged or not a cnnkit head file"):
        load_run(damaged.run_path).classifier()


def test_the_index_is_written_in_chunks_as_the_unit_rows_of_the_embedded_features(tmp_path):
    from cnnkit.similarity import write_index

    features = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    write_index(tmp_path, features, np.arange(7) % 2, [f"{i}.png" for i in range(7)],
                embed=lambda x: x * 2 + 1, chunk=3)
    index = np.load(tmp_path / "index" / "features.npy", allow_pickle=False)
    expected = features * 2 + 1
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert index.dtype == np.float32 and index.shape == (7, 5)
    np.testing.assert_allclose(index, expected, rtol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "index" / "labels.npy"), np.arange(7) % 2)

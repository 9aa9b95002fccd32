"""The fast head search gives GridSearchCV's answer, and measuring big data does not open every file."""

import numpy as np
import pytest

from cnnkit.heads import fit_head


def _reference(features, labels, head, pca, folds=5, seed=0):
    """The plain scikit-learn search fit_head replaces: refit scaler + PCA for every candidate."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from cnnkit.heads import _classifier

    classifier, param, values = _classifier(head, seed, 3)
    steps = [("scale", StandardScaler())]
    grid = {f"clf__{param}": values}
    if pca is not None:
        steps.append(("pca", PCA(svd_solver="full")))
        grid["pca__n_components"] = pca
    search = GridSearchCV(Pipeline(steps + [("clf", classifier)]), grid,
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    search.fit(features, labels)
    return search.cv_results_


@pytest.mark.parametrize("rows, dims", [(150, 40), (60, 200)])
def test_knn_search_scores_every_candidate_as_gridsearch_does(rows, dims):
    """Slicing one PCA fit per fold, and projecting when rows < dims, changes no score."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], rows // 3)
    features = rng.normal(size=(rows, dims)) + labels[:, None] * rng.normal(size=dims) * 0.4
    fitted = fit_head(features, labels, "knn", pca=None, cv=5)
    reference = _reference(features, labels, "knn", None)
    assert fitted.cv_accuracy == pytest.approx(max(reference["mean_test_score"]), abs=1e-9)
    best = reference["params"][int(np.argmax(reference["mean_test_score"]))]
    assert fitted.best_params["n_neighbors"] == best["clf__n_neighbors"]

    sized = fit_head(features, labels, "knn", pca=16, cv=5)
    reference = _reference(features, labels, "knn", [16])
    assert sized.cv_accuracy == pytest.approx(max(reference["mean_test_score"]), abs=1e-9)
    assert sized.pipeline.named_steps["pca"].n_components == 16


def test_logreg_search_matches_gridsearch_and_records_the_pca_size():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 40)
    features = rng.normal(size=(160, 300)) + labels[:, None] * rng.normal(size=300) * 0.15
    fitted = fit_head(features, labels, "logreg", pca="auto", cv=4)
    sizes = sorted({32, 120})  # 32, and every component a 120-row fold has
    reference = _reference(features, labels, "logreg", sizes, folds=4)
    assert fitted.cv_accuracy == pytest.approx(max(reference["mean_test_score"]), abs=0.02)
    assert fitted.best_params["n_components"] in (32, None) and fitted.best_params["C"] in (0.01, 0.1, 1.0, 10.0)
    # The saved pipeline is plain scikit-learn: scaler -> PCA -> logistic regression.
    assert [name for name, _ in fitted.pipeline.steps] == ["scale", "pca", "clf"]
    assert fitted.pipeline.score(features, labels) > 0.9


@pytest.mark.parametrize("head, value, key", [("logreg", 0.1, "C"), ("knn", 3.0, "n_neighbors")])
def test_a_fixed_head_parameter_is_used_and_still_scored(head, value, key):
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], 30)
    features = rng.normal(size=(90, 20)) + labels[:, None] * rng.normal(size=20)
    fitted = fit_head(features, labels, head, pca=None, cv=3, param_value=value)
    reference = _reference(features, labels, head, None, folds=3)
    scored = dict(zip([p[f"clf__{key}"] for p in reference["params"]], reference["mean_test_score"]))
    assert fitted.best_params == {key: value} and fitted.cv_accuracy == pytest.approx(scored[value], abs=1e-9)
    assert fitted.pipeline.named_steps["clf"].get_params()[key] == value


def test_a_bad_head_param_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from cnnkit.cli import app
    from conftest import make_class_tree

    data = make_class_tree(tmp_path / "data", {"a": 4, "b": 4}, size=32)
    result = CliRunner().invoke(app, ["extract", str(data), "--head", "auto", "--head-param", "0.1",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--head-param needs one --head" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, ["extract", str(data), "--head-param", "0", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--head-param 0: give a positive number" in result.stderr


def test_parallel_folds_give_the_same_answer_as_one_process():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 30)
    features = rng.normal(size=(60, 20)) + labels[:, None]
    one = fit_head(features, labels, "logreg", pca="auto", cv=3, n_jobs=1)
    two = fit_head(features, labels, "logreg", pca="auto", cv=3, n_jobs=2)
    assert one.best_params == two.best_params and one.cv_accuracy == two.cv_accuracy


def test_an_identical_search_is_answered_from_the_cache_and_a_crafted_cache_is_ignored(tmp_path, monkeypatch):
    import cnnkit.heads as heads

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path))
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], 20)
    features = rng.normal(size=(60, 30)) + labels[:, None] * 0.8
    first = fit_head(features, labels, "logreg", pca="auto", cv=3, cache=True)
    (table,) = (tmp_path / "heads").glob("*.json")

    searched = []
    real = heads._fold_scores
    monkeypatch.setattr(heads, "_fold_scores", lambda *a, **k: searched.append(1) or real(*a, **k))
    again = fit_head(features, labels, "logreg", pca="auto", cv=3, cache=True)
    assert not searched  # no fold was scored: the table answered
    assert (again.best_params, again.cv_accuracy) == (first.best_params, first.cv_accuracy)
    assert np.array_equal(again.pipeline.predict(features), first.pipeline.predict(features))

    # Other labels, other options or --no-cache: a search of their own.
    fit_head(features, labels[::-1].copy(), "logreg", pca="auto", cv=3, cache=True)
    fit_head(features, labels, "logreg", pca=None, cv=3, cache=True)
    fit_head(features, labels, "logreg", pca="auto", cv=3)
    assert len(searched) == 9

    # A crafted or damaged table (code-like text, wrong shape, out-of-range or NaN scores, too big)
    # is ignored: the search runs again, gives the true answer and rewrites the table.
    for crafted in ("__import__('os').system('false')", '{"scores": [[0.5]]}', '{"scores": [[2, 2, 2, 2]]}',
                    '{"scores": "NaN"}', '{"scores": ' + "[" * 100_000 + "]" * 100_000 + "}",
                    "x" * (heads._SEARCH_CACHE_LIMIT + 1)):
        table.write_text(crafted)
        searched.clear()
        redone = fit_head(features, labels, "logreg", pca="auto", cv=3, cache=True)
        assert searched and (redone.best_params, redone.cv_accuracy) == (first.best_params, first.cv_accuracy)


def test_advise_lists_a_big_dataset_without_opening_every_file(tmp_path, monkeypatch):
    import cnnkit.data.dataset as dataset_module
    from cnnkit.data import load_dataset
    from conftest import make_class_tree, write_bad_files

    data = make_class_tree(tmp_path / "data", {"a": 30, "b": 30})
    write_bad_files(data / "a")
    opened = []
    real = dataset_module.check_image_header
    monkeypatch.setattr(dataset_module, "check_image_header", lambda path: opened.append(path) or real(path))
    listed = load_dataset(data, check_headers=False)
    assert opened == [] and listed.skipped == []
    assert len(listed.splits["train"]) == 60 + 4  # unreadable files are only met (and named) when sampled
    checked = load_dataset(data)
    assert len(opened) == 64 and {s.path.name for s in checked.skipped} >= {"empty.png", "fake.png"}

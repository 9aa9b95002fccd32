"""explain: Grad-CAM through every kind of run, occlusion for heads without a gradient, the heat map's grid."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.errors import CnnkitError
from cnnkit.explain import explain, resolve_class
from cnnkit.saliency import place_in_box
from cnnkit.heads import fit_head
from conftest import PHOTOS
from tiny_runs import extract_run, shared_runs, train_run

runner = CliRunner()


def _graph(pipeline, features):
    """The head's graph evaluated on ``features``: (scores or None, probabilities)."""
    import keras

    from cnnkit.head_graph import head_graph

    inputs = keras.Input((features.shape[1],))
    graph = head_graph(pipeline, inputs)
    outputs = {"probabilities": graph.probabilities, **({"scores": graph.scores} if graph.scores is not None else {})}
    out = keras.Model(inputs, outputs)(features.astype(np.float32))
    return (np.asarray(out["scores"]) if "scores" in out else None), np.asarray(out["probabilities"])


@pytest.mark.parametrize("head, pca, whiten, l2, classes", [
    ("logreg", "auto", False, False, 3), ("logreg", 4, True, True, 3), ("logreg", None, False, False, 2),
    ("linear-svm", 4, False, False, 3), ("linear-svm", None, False, True, 2),
])
def test_the_head_graph_gives_the_pipelines_probabilities_and_scores(head, pca, whiten, l2, classes):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), 12)
    features = rng.normal(size=(len(labels), 10)) + labels[:, None] * 0.8 + 3.0
    pipeline = fit_head(features, labels, head, pca, whiten, l2, cv=3).pipeline
    scores, probabilities = _graph(pipeline, features)
    np.testing.assert_allclose(probabilities, pipeline.predict_proba(features), atol=1e-4)
    if head == "logreg":  # the logits: their softmax is the head's probabilities
        softmax = np.exp(scores - scores.max(axis=1, keepdims=True))
        np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True), probabilities, atol=1e-5)
    else:  # the mean decision function of the calibration folds' SVMs
        svms = [c.estimator for c in pipeline.named_steps["clf"].calibrated_classifiers_]
        inner = pipeline[:-1].transform(features)
        expected = np.mean([s.decision_function(inner) for s in svms], axis=0)
        expected = expected if classes > 2 else np.stack([np.zeros_like(expected), expected], axis=1)
        np.testing.assert_allclose(scores, expected, atol=1e-3)


def test_a_knn_head_has_probabilities_but_no_scores_and_an_rbf_svm_no_graph():
    labels = np.repeat([0, 1], 10)
    features = np.random.default_rng(1).normal(size=(20, 5)) + labels[:, None]
    knn = fit_head(features, labels, "knn", None, cv=3).pipeline
    queries = np.random.default_rng(2).normal(size=(8, 5)) + 0.5  # not training points: no distance is 0
    scores, probabilities = _graph(knn, queries)
    assert scores is None
    # The graph reads scikit-learn's private training vectors (knn_reference): fail loudly if they move.
    from cnnkit.head_graph import knn_reference

    vectors, classes = knn_reference(knn[-1])
    np.testing.assert_allclose(vectors, knn[:-1].transform(features), atol=1e-5)  # stored as float32
    np.testing.assert_array_equal(knn[-1].classes_[classes], labels)
    np.testing.assert_allclose(probabilities, knn.predict_proba(queries), atol=1e-5)
    from cnnkit.head_graph import head_graph

    with pytest.raises(CnnkitError, match="one-vs-one"):
        head_graph(fit_head(features, labels, "svm", None, cv=3).pipeline, features.astype(np.float32))


def test_the_map_is_in_the_original_grid_and_zero_outside_the_crop():
    heat = np.ones((7, 7), np.float32)
    full = place_in_box(heat, 30, 50, 1.0)  # a 50 x 30 image: the model saw its centre 30 x 30
    assert full.shape == (30, 50) and full.dtype == np.float32
    assert full[:, :10].max() == 0 and full[:, 40:].max() == 0 and full[:, 10:40].min() > 0.99
    cropped = place_in_box(heat, 100, 100, 0.5)
    assert cropped[:25].max() == 0 and cropped[25:75, 25:75].min() > 0.99


def test_class_by_name_or_index():
    names = ["cat", "dog", "10"]
    assert resolve_class(None, names) is None
    assert resolve_class("dog", names) == 1 and resolve_class("DOG", names) == 1 and resolve_class("0", names) == 0
    assert resolve_class("10", names) == 2  # a name wins over an index
    with pytest.raises(CnnkitError, match="0..2"):
        resolve_class("7", names)
    with pytest.raises(CnnkitError, match="not a class"):
        resolve_class("bird", names)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data, made = shared_runs(tmp_path_factory)
    wide = root / "images" / "wide.png"
    wide.parent.mkdir()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(wide)
    runs = {"network": made["train"], "network-plain": train_run(data, root / "plain", flip=False),
            "logreg": made["extract"], "knn": made["knn"],
            "flip-l2": extract_run(data, root / "flip", flip=True, l2_normalize=True),
            "grid-flip": extract_run(data, root / "grid", flip=True, grid=3)}
    return root, wide, runs


@pytest.mark.parametrize("kind, method", [("network", "grad-cam"), ("network-plain", "grad-cam"),
                                          ("logreg", "grad-cam"), ("flip-l2", "grad-cam"),
                                          ("grid-flip", "grad-cam"),
                                          ("knn", "occlusion")])
def test_every_run_kind_explains_into_the_images_own_grid(made, kind, method):
    root, wide, runs = made
    out = root / f"out-{kind}"
    result = runner.invoke(app, ["explain", str(wide), "-m", str(runs[kind]), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)
    assert entry["method"] == method and entry["path"] == str(wide) and 0 <= entry["score"] <= 1
    heat = np.load(entry["heatmap"], allow_pickle=False)
    assert entry["heatmap"] == str(out / "wide.npy") and entry["overlay"] == str(out / "wide.png")
    assert heat.shape == (24, 40) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    assert heat[:, :8].max() == 0 and heat[:, 32:].max() == 0  # outside the centre crop the model never looked
    assert Image.open(out / "wide.png").size[0] > 100


def test_class_layer_and_errors_on_the_command_line(made):
    root, wide, runs = made
    explanations, _ = explain([wide], runs["network"], class_name="green", layer="conv3", out=None)
    assert explanations[0].label == "green" and explanations[0].layer == "conv3"
    bad = runner.invoke(app, ["explain", str(wide), "-m", str(runs["network"]), "--class", "purple",
                              "--out", str(root / "x")])
    assert bad.exit_code == 2 and "--class 'purple'" in bad.stderr and "Traceback" not in bad.output
    stage = runner.invoke(app, ["explain", str(wide), "--layer", "conv9"])
    assert stage.exit_code == 2 and "conv9" in stage.stderr
    over = runner.invoke(app, ["explain", str(wide), "-m", str(runs["network"]), "--out", str(wide.parent)])
    assert over.exit_code == 2 and "would overwrite the input" in over.stderr
    assert Image.open(wide).size == (40, 24)  # untouched
    missing = runner.invoke(app, ["explain", str(root / "nope.png"), "-m", str(runs["network"]),
                                  "--out", str(root / "y")])
    assert missing.exit_code == 2 and "nope.png" in missing.stderr


@pytest.mark.slow
def test_grad_cam_finds_each_photo_in_a_collage(tmp_path):
    """Done-when of issue 12: a 2x2 collage, the ImageNet classifier, --class for each photo's class."""
    side = 300
    collage = Image.new("RGB", (2 * side, 2 * side))
    photos = [("cat.png", 282), ("rocket.jpg", 657), ("motorcycle.png", 665), ("coffee.png", 967)]
    for quadrant, (name, _) in enumerate(photos):
        image = Image.open(PHOTOS / name).convert("RGB")
        short = min(image.size)
        left, top = (image.width - short) // 2, (image.height - short) // 2
        image = image.crop((left, top, left + short, top + short)).resize((side, side))
        collage.paste(image, ((quadrant % 2) * side, (quadrant // 2) * side))
    collage.save(tmp_path / "collage.png")
    for quadrant, (name, index) in enumerate(photos):
        result = runner.invoke(app, ["explain", str(tmp_path / "collage.png"), "--class", str(index),
                                     "--out", str(tmp_path / name), "--json"])
        assert result.exit_code == 0, result.output
        heat = np.load(json.loads(result.stdout)[0]["heatmap"])
        assert heat.shape == (2 * side, 2 * side)
        mass = [heat[:side, :side].sum(), heat[:side, side:].sum(), heat[side:, :side].sum(), heat[side:, side:].sum()]
        assert int(np.argmax(mass)) == quadrant, (name, np.round(np.array(mass) / sum(mass), 3))

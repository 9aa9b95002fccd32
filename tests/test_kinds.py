"""The contract every run kind keeps, checked over the registry on real images (sample Fashion-MNIST photos).

For each registered kind's runs: the classifier on every installed engine, the export graph and the
forward pass explain differentiates give the same probabilities (1e-5), and the run predicts the same
for an image and its mirror image exactly when it says it does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from cnnkit.data import find_images, load_image
from cnnkit.engines import available_engines
from cnnkit.kinds import get_kind, registered_kinds
from cnnkit.runs import load_run
from conftest import SAMPLE_DATA
from tiny_runs import TINY, extract_run, train_run

FASHION = SAMPLE_DATA / "fashion"
BUILT_IN = ("feature_head", "network", "ensemble")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The bundled Fashion-MNIST images as train/ (24 per class) and test/ (6 per class)."""
    root = tmp_path_factory.mktemp("fashion")
    for folder in sorted(FASHION.iterdir()):
        for i, image in enumerate(sorted(folder.iterdir())):
            target = root / ("test" if i % 5 == 0 else "train") / folder.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target)
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Runs of every built-in kind, learned from the bundled Fashion-MNIST images (tiny networks)."""
    from cnnkit.ensemble import make_ensemble

    root = tmp_path_factory.mktemp("kinds")
    made = {
        "logreg": extract_run(data, root / "logreg", layers="conv2,top", cv=2, val_split=0),
        "linear-svm": extract_run(data, root / "svm", head="linear-svm", cv=2, val_split=0),
        "knn": extract_run(data, root / "knn", head="knn", cv=2, val_split=0),
        "grid-flip": extract_run(data, root / "grid", layers="conv3,top", flip=True, grid=2, cv=2, val_split=0),
        "flip": extract_run(data, root / "flip", layers="top", flip=True, cv=2, val_split=0),
        "network-flip": train_run(data, root / "net", epochs=1, flip=True, val_split=0.2),
        "network": train_run(data, root / "net-plain", epochs=1, flip=False, val_split=0.2, image_size=28),
    }
    made["ensemble"] = make_ensemble([made["logreg"], made["network-flip"], made["network"]], root / "ensemble",
                                     weights=[2, 1, 1])
    return {name: load_run(path) for name, path in made.items()}


def _images(data: Path, size: int) -> np.ndarray:
    """The held-out test images (none of them in any run's training set or k-NN index)."""
    paths, _ = find_images([data / "test"])
    return np.stack([load_image(p, size) for p in paths])


def test_every_built_in_kind_is_registered_and_covered(runs):
    assert set(BUILT_IN) <= {kind.name for kind in registered_kinds()}
    assert set(BUILT_IN) == {run.kind for run in runs.values()}


def _graph_probabilities(run, images, stage=None):
    inputs = keras.Input((run.image_size, run.image_size, 3), dtype="uint8")
    found = get_kind(run.kind).forward(run, inputs, stage=stage)
    return np.asarray(keras.Model(inputs, found.probabilities)(images))


@pytest.mark.parametrize("name", ["logreg", "linear-svm", "knn", "grid-flip", "flip", "network-flip", "network",
                                  "ensemble"])
def test_the_classifier_on_every_engine_the_export_graph_and_the_explained_pass_agree(runs, data, name):
    from cnnkit.export import inference_model

    run = runs[name]
    images = _images(data, run.image_size)
    exported = np.asarray(inference_model(run)(images)["probabilities"])
    for engine in available_engines():
        np.testing.assert_allclose(run.classifier(engine)(images), exported, atol=1e-5, err_msg=str(engine))
    if run.kind != "ensemble":  # an ensemble explains member by member, each through its own pass
        stage = "conv3" if run.kind == "feature_head" else "conv4"
        np.testing.assert_allclose(_graph_probabilities(run, images, stage), exported, atol=1e-5)


@pytest.mark.parametrize("name, symmetric", [("flip", True), ("grid-flip", False), ("network-flip", True),
                                             ("network", False), ("logreg", False), ("ensemble", False)])
def test_a_run_predicts_the_same_for_the_mirror_image_exactly_when_it_says_so(runs, data, name, symmetric):
    run = runs[name]
    assert run.mirror_symmetric == symmetric
    images = _images(data, run.image_size)
    classify = run.classifier()
    plain, mirrored = classify(images), classify(np.ascontiguousarray(images[:, :, ::-1]))
    if symmetric:
        np.testing.assert_allclose(mirrored, plain, atol=1e-5)
    else:
        assert np.abs(mirrored - plain).max() > 1e-4

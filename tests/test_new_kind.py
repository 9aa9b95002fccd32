"""Adding a run kind is one file and its registration: a kind made here, in the test, works with every verb.

The kind below -- a nearest-centroid classifier of an image's mean colour -- touches no cnnkit
module: it registers itself, and predict, evaluate, TTA, export and explain read its runs as
they read any run (``cnnkit.kinds``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from cnnkit.classifier import Classifier
from cnnkit.kinds import Forward, Kind, ModelDescription, Section, register_kind
from conftest import make_class_tree


class MeanColourModel(Section):
    """Class centroids of the images' mean RGB colour (``centroids.json``)."""

    kind: Literal["mean_colour"] = "mean_colour"
    sharpness: float = 0.1


class MeanColourClassifier(Classifier):
    def __init__(self, run):
        self.centroids = np.asarray(json.loads(run.file("centroids.json").read_text()), np.float64)
        self.sharpness = run.model.sharpness
        self.image_size, self.crop_pct, self.classes = run.image_size, run.crop_pct, len(run.class_names)

    def __call__(self, images):
        colours = np.asarray(images, np.float64).mean(axis=(1, 2))
        logits = -self.sharpness * ((colours[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


@register_kind
class MeanColourKind(Kind):
    name = "mean_colour"
    section = MeanColourModel

    def classifier(self, run, engine="auto", precision="float32"):
        return MeanColourClassifier(run)

    def forward(self, run, images, stage=None, tag=""):
        from keras import ops

        centroids = np.asarray(json.loads(run.file("centroids.json").read_text()), np.float32)
        colours = ops.mean(ops.cast(images, "float32"), axis=(1, 2))
        logits = -run.model.sharpness * ops.sum((ops.expand_dims(colours, 1) - centroids[None]) ** 2, axis=-1)
        return Forward(ops.softmax(logits, axis=-1), logits, colours)

    def explainer(self, run, layer=None, batch_size=32):
        from cnnkit.saliency import OcclusionExplainer

        return OcclusionExplainer(self.classifier(run), run.class_names, run.image_size, run.crop_pct, batch_size)

    def mirror_symmetric(self, run):
        return True  # a mean colour does not change under a mirror

    def describe(self, manifest):
        return ModelDescription("The nearest class centroid of the image's mean colour.",
                                [("sharpness", manifest.model.sharpness)])


def _write_run(data: Path, out: Path) -> Path:
    from cnnkit.data import load_dataset, load_image
    from cnnkit.reporting import write_report
    from cnnkit.runs import RunManifest, data_summary, write_run

    dataset = load_dataset(data)
    colours = np.array([load_image(s.path, 16).mean(axis=(0, 1)) for s in dataset.samples])
    labels = np.array([s.label for s in dataset.samples])
    centroids = [colours[labels == c].mean(axis=0).tolist() for c in range(len(dataset.class_names))]
    manifest = RunManifest(command="extract", class_names=dataset.class_names, image_size=16, preprocessing="raw",
                           data=data_summary(dataset, {"train": dataset.samples}), model=MeanColourModel())
    return write_run(out, manifest, lambda folder: (folder / "centroids.json").write_text(json.dumps(centroids)),
                     attach=[write_report])


def test_a_kind_registered_outside_cnnkit_works_with_every_verb(tmp_path):
    from cnnkit.evaluation import evaluate_run
    from cnnkit.explain import explain
    from cnnkit.export import export_run, load_exported
    from cnnkit.predict import predict_run
    from cnnkit.runs import load_run
    from cnnkit.tta import TTA

    data = make_class_tree(tmp_path / "data", {"dark": 5, "mid": 5, "light": 5}, size=16)
    run_path = _write_run(data, tmp_path / "run")
    run = load_run(run_path)  # the manifest validates with the new kind's section, sealed as any run
    assert run.kind == "mean_colour" and run.mirror_symmetric
    predicted = predict_run([data / "light"], run_path, k=1)
    assert {p.top[0][0] for p in predicted.predictions} == {"light"}
    evaluation = evaluate_run(run_path, data, tta=TTA())
    assert evaluation.accuracy == 1.0 and evaluation.tta_views == 6  # symmetric: no mirrored views
    out = export_run(run_path, "onnx", tmp_path / "export")
    assert out.check.agreement == 1.0
    images = np.stack([np.full((16, 16, 3), v, np.uint8) for v in (10, 120, 240)])
    np.testing.assert_allclose(load_exported(out.out / "model.onnx", "onnx")(images), run.classifier()(images),
                               atol=1e-5)
    explanations, _ = explain([data / "dark" / "000.png"], run_path)
    assert explanations[0].label == "dark" and explanations[0].method == "occlusion"
    assert "nearest class centroid" in (run_path / "report.html").read_text()

"""The feature-head kind (`extract` runs): a fixed pretrained backbone's pooled stage features and a
scikit-learn head (``head.skops``).

The forward pass is the feature network of ``cnnkit.features`` (every stage
pooled over its grid, mirror-averaged with ``flip``) followed by the head.
The classifier runs the feature network on an engine, reading the feature
cache first, and the head with scikit-learn; the graph (export, Grad-CAM) is
the same feature network as Keras ops followed by the head's graph
(``cnnkit.head_graph``). tests/test_kinds.py holds the two to 1e-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from cnnkit.classifier import Classifier, FilePredictions
from cnnkit.errors import CnnkitError
from cnnkit.kinds.registry import Forward, Kind, ModelDescription, Section, TriedRow, register_kind
from cnnkit.options import MAX_GRID

# Heads whose class scores are an affine map of the features: Grad-CAM differentiates them.
LINEAR_HEADS = ("logreg", "linear-svm")


class FeatureHeadModel(Section):
    """A fixed pretrained backbone's pooled stage features and a scikit-learn head (``head.skops``)."""

    kind: Literal["feature_head"] = "feature_head"
    backbone: str
    weights: str
    layers: list[str] = Field(min_length=1)
    pool: Literal["avg", "max"]
    flip: bool
    # Regions per side of every stage but the last (1 before --grid existed); bounded like --grid,
    # since it sizes the slices of the feature map a reader builds.
    grid: int = Field(1, ge=1, le=MAX_GRID)
    head: Literal["logreg", "svm", "linear-svm", "knn"]
    pca: int | Literal["auto"] | None
    whiten: bool
    l2_normalize: bool
    best_params: dict[str, Any]
    cv_folds: int
    feature_dims: int
    tried: list[TriedRow] = []


def embed_features(head, features: np.ndarray) -> np.ndarray:
    """Features as the head sees them before its classifier (standardised, PCA-projected).

    Raw pooled activations are all positive and share a large common
    component, so their cosine similarities bunch near 1; the head's
    standardisation centres them and makes neighbours meaningful.
    """
    return np.asarray(head[:-1].transform(features), dtype=np.float32)


def feature_config(run, precision="float32"):
    """The ``FeatureConfig`` of the run's features (in ``precision``)."""
    from cnnkit.features import FeatureConfig

    m = run.model
    return FeatureConfig(m.backbone, m.weights, run.image_size, m.pool, m.flip, m.grid, precision)


class FeatureHeadClassifier(Classifier):
    """Pretrained backbone features -> the fitted scikit-learn head.

    ``predict_files``/``embed_files`` read features from the feature cache
    where it has them, so a rerun on cached images runs no network and
    imports no TensorFlow.
    """

    def __init__(self, run, engine="auto", precision="float32"):
        from cnnkit.features import FeatureExtractor
        from cnnkit.heads import load_head

        self.layers = list(run.model.layers)
        self.head = load_head(run.file("head.skops"))
        self.config = feature_config(run, precision)
        self.extractor = FeatureExtractor(self.config, engine)
        self.image_size, self.crop_pct, self.classes = run.image_size, run.crop_pct, len(run.class_names)
        if len(getattr(self.head, "classes_", [])) != self.classes:
            raise CnnkitError(f"{run.path}: head and manifest disagree on the classes; re-create the run")

    def features(self, images) -> np.ndarray:
        stage_features = self.extractor(images)
        return np.concatenate([stage_features[self.extractor.spec.stage_key(l)] for l in self.layers], axis=1)

    def embed(self, images) -> np.ndarray:
        """The retrieval embedding: features after the head's own scaling and PCA."""
        return embed_features(self.head, self.features(images))

    def __call__(self, images) -> np.ndarray:
        return self.head.predict_proba(self.features(images))

    def _file_features(self, paths, batch_size: int, progress):
        from cnnkit.features import compute_features

        table = compute_features(paths, self.config, batch_size, extractor=self.extractor, progress=progress)
        return table.select(self.layers), table.kept, table.failures

    def predict_files(self, paths, batch_size: int = 32, progress=None) -> FilePredictions:
        """Probabilities of image files, from cached features first."""
        features, kept, failures = self._file_features(paths, batch_size, progress)
        probabilities = (self.head.predict_proba(features) if len(kept)
                         else np.zeros((0, self.classes)))
        return FilePredictions(np.asarray(probabilities, np.float32), kept, failures)

    def embed_files(self, paths, batch_size: int = 32):
        """(embeddings, kept indices, unreadable files) of image files, cached features first."""
        features, kept, failures = self._file_features(paths, batch_size, None)
        return (embed_features(self.head, features) if len(kept) else np.zeros((0, 0), np.float32)), kept, failures


@register_kind
class FeatureHeadKind(Kind):
    name = "feature_head"
    section = FeatureHeadModel

    def classifier(self, run, engine="auto", precision="float32"):
        return FeatureHeadClassifier(run, engine, precision)

    def forward(self, run, images, stage=None, tag=""):
        from keras import ops

        from cnnkit.backbones import get_backbone
        from cnnkit.features import pooled_stages, stage_grid, stage_maps
        from cnnkit.head_graph import head_graph
        from cnnkit.heads import load_head

        m = run.model
        spec = get_backbone(m.backbone)
        head = load_head(run.file("head.skops"))
        keys = [spec.stage_key(layer) for layer in m.layers]
        target = [spec.stage_key(spec.check_stage(stage))] if stage else []
        maps = stage_maps(spec, m.weights, run.image_size, list(dict.fromkeys([*keys, *target])))
        maps.name = f"{maps.name}{tag}"
        pooled, views = pooled_stages(maps, images, {k: stage_grid(spec, k, m.grid) for k in keys}, m.pool,
                                      m.flip, keep=target)
        parts = [pooled[k] for k in keys]
        features = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)
        graph = head_graph(head, features, name=f"head{tag}")
        return Forward(graph.probabilities, graph.scores, features,
                       [(maps[target[0]], row, mirrored) for maps, row, mirrored in views] if target else [])

    def explainer(self, run, layer=None, batch_size=32):
        from cnnkit.saliency import OcclusionExplainer

        if run.model.head not in LINEAR_HEADS:  # no useful gradient (k-NN, RBF SVM)
            return OcclusionExplainer(self.classifier(run, "tf"), run.class_names, run.image_size, run.crop_pct,
                                      batch_size)
        return self.grad_cam(run, layer or run.model.layers[-1])

    def mirror_symmetric(self, run) -> bool:
        """Only when every stage is pooled over the whole map: a stage pooled over a grid of regions is
        averaged region by region with the mirror's regions moved back (``cnnkit.features.unmirror``), so
        the mirror image gets those regions in mirrored order."""
        from cnnkit.backbones import get_backbone
        from cnnkit.features import stage_grid

        m = run.model
        spec = get_backbone(m.backbone)
        return m.flip and all(stage_grid(spec, spec.stage_key(layer), m.grid) == 1 for layer in m.layers)

    def describe(self, manifest) -> ModelDescription:
        m = manifest.model
        return ModelDescription(
            "A pretrained network as a fixed feature extractor: pooled activations of the stages below, "
            "then a classical head fitted on them (the notes' first level of use).",
            [("backbone", f"{m.backbone} ({m.weights} weights)"), ("stages", ", ".join(m.layers)),
             ("pooling", m.pool + (f", {m.grid} x {m.grid} regions below the last stage" if m.grid > 1 else "")
              + (", flip-averaged" if m.flip else "")),
             ("head", m.head), ("PCA", f"{m.pca}{' whitened' if m.whiten else ''}"),
             ("L2-normalised", "yes" if m.l2_normalize else "no"),
             ("chosen by cross-validation", ", ".join(f"{k}={v}" for k, v in m.best_params.items()) or "-"),
             ("CV folds", m.cv_folds), ("feature dimensions", m.feature_dims)])

    def report_sections(self, manifest, folder: Path) -> list[str]:
        from cnnkit.reporting.markup import cv_png, esc, number, png_tag, table

        m = manifest.model
        if not m.tried:
            return ["<h2>Cross-validation</h2><p>One configuration was fitted; "
                    f"its {m.cv_folds}-fold CV accuracy is {esc(number(manifest.metrics.get('cv_accuracy')))}.</p>"]
        scored = [t.cv_accuracy if t.cv_accuracy is not None else -1.0 for t in m.tried]
        best = max(range(len(m.tried)), key=lambda i: scored[i])
        rows = [(t.layers, t.head, number(t.cv_accuracy) if t.cv_accuracy is not None else (t.error or "-"),
                 ", ".join(f"{k}={v}" for k, v in t.best_params.items())) for t in m.tried]
        chart = cv_png([f"{t.layers} {t.head}" for t in m.tried], scored, best)
        chart = (f"<figure>{png_tag(chart, 'CV accuracy of each candidate')}<figcaption>CV accuracy of each "
                 "candidate (green: chosen).</figcaption></figure>") if chart else ""
        return ["<h2>What was tried (cross-validation)</h2><p>Each stage set and head scored by stratified "
                "cross-validation on the training images; the best (highlighted) was fitted on all of them.</p>"
                + '<div class="grid"><div>'
                + table(["stages", "head", "CV accuracy", "best parameters"], rows, [False, False, True, False], best)
                + f"</div>{chart}</div>"]

    def tried(self, run) -> list[TriedRow]:
        return list(run.model.tried)


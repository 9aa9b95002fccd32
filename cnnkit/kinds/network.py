"""The network kind (`finetune` and `train` runs): a Keras network from raw pixels to probabilities (``model.keras``).

cnnkit's networks have one layout (``cnnkit.training.network.build_network``):
raw pixels -> augmentation (the identity at inference) -> the nested backbone
``BACKBONE_LAYER`` -> global average pooling ``FEATURE_LAYER`` -> dropout ->
the softmax classifier ``CLASSIFIER_LAYER``. The forward pass (``network_forward``)
reads those layers: the pooled features (averaged with the mirror image's with
``flip``, ``cnnkit.features.mirror_average``), then the classifier. The run's
classifier runs it on an engine, training validates with it, and export and
Grad-CAM build on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cnnkit.classifier import RunnerClassifier
from cnnkit.errors import CnnkitError
from cnnkit.kinds.registry import Forward, Kind, ModelDescription, Section, register_kind

# The layers of cnnkit's network layout that inference reads.
BACKBONE_LAYER = "backbone"
# The pooled layer before the classifier: the retrieval embedding of `similar` (``NetworkModel.feature_layer``).
FEATURE_LAYER = "features"
CLASSIFIER_LAYER = "predictions"


class NetworkModel(Section):
    """A Keras network from raw pixels to probabilities (``model.keras``).

    ``feature_layer`` names the pooled layer before the classifier, the
    retrieval embedding of `similar`. ``flip``: the pooled features are
    averaged with the mirror image's before the classifier (runs before it
    existed read as ``False``, which is how they predicted).
    """

    kind: Literal["network"] = "network"
    backbone: str
    weights: str
    freeze: str
    feature_layer: str
    flip: bool = False
    epochs_run: int
    best_epoch: int
    interrupted: bool = False


def load_network(path: Path):
    """A run's ``model.keras``, loaded in safe mode (no Python code from the file runs)."""
    import keras

    import cnnkit.backbones.preprocessing  # noqa: F401 - registers the Preprocess layer

    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds on a bad file
        raise CnnkitError(f"{path}: cannot load the model safely ({error})") from None


def network_forward(model, images, flip: bool, feature_layer: str = FEATURE_LAYER, stage_layer=None,
                    tag: str = "") -> Forward:
    """The forward pass of a network of cnnkit's layout, as Keras ops on raw pixels.

    Args:
        flip: average the pooled features with the mirror image's (``NetworkModel.flip``).
        stage_layer: a layer of the backbone whose feature maps to return too (Grad-CAM).
        tag: appended to the layers' names (unique within an ensemble's graph).

    Raises:
        ValueError: the model lacks a layer of the layout.
    """
    import keras
    from keras import ops

    from cnnkit.features import mirror_average
    from cnnkit.saliency import class_scores

    backbone, pool, classifier = (model.get_layer(name) for name in (BACKBONE_LAYER, feature_layer, CLASSIFIER_LAYER))
    if tag:
        for layer in (backbone, pool, classifier):
            layer.name = f"{layer.name}{tag}"
    inner = keras.Model(backbone.input, [stage_layer.output, backbone.output]) if stage_layer is not None else None

    def pooled_of(x):
        if inner is None:
            return pool(backbone(x, training=False)), {}
        feature_map, final = inner(x, training=False)
        return pool(final), {"map": feature_map}

    pooled, views = mirror_average(pooled_of, ops.cast(images, "float32"), flip)
    return Forward(classifier(pooled), class_scores(classifier, pooled), pooled,
                   [(maps["map"], row, mirrored) for maps, row, mirrored in views] if inner is not None else [])


def inference_network(model, flip: bool = False, feature_layer: str = FEATURE_LAYER):
    """The network as a run predicts with it: raw pixels -> ``{"probabilities", "features"}``.

    Training validates with it, the run's classifier runs it on an engine (fed ``uint8``), and the
    saved run's index and held-out evidence come from it.

    Raises:
        ValueError: the model lacks a layer of cnnkit's layout.
    """
    import keras

    inputs = keras.Input(model.input.shape[1:], dtype=model.input.dtype, name="image")
    found = network_forward(model, inputs, flip, feature_layer)
    return keras.Model(inputs, {"probabilities": found.probabilities, "features": found.features})


def _layout_error(run) -> CnnkitError:
    return CnnkitError(f"{run.path / 'model.keras'}: has no layers {BACKBONE_LAYER!r}, {run.model.feature_layer!r} "
                       f"and {CLASSIFIER_LAYER!r} (cnnkit's network layout); re-create the run")


@register_kind
class NetworkKind(Kind):
    name = "network"
    section = NetworkModel

    def classifier(self, run, engine="auto", precision="float32"):
        """The network on an engine: one graph with two outputs, the probabilities and the pooled
        features (the retrieval embedding), converted once per run (keyed by its seal)."""
        from cnnkit.engines import make_runner

        def build():
            try:
                return inference_network(load_network(run.file("model.keras")), run.model.flip,
                                         run.model.feature_layer)
            except ValueError:
                raise _layout_error(run) from None

        runner = make_runner(engine, "runs", run.manifest.seal, build, run.image_size, precision)
        return RunnerClassifier(runner, run.image_size, run.crop_pct, len(run.class_names))

    def forward(self, run, images, stage=None, tag=""):
        from cnnkit.backbones import get_backbone

        model = load_network(run.file("model.keras"))
        try:
            backbone = model.get_layer(BACKBONE_LAYER)
            stage_layer = get_backbone(run.model.backbone).stage_layer(backbone, stage) if stage else None
            return network_forward(model, images, run.model.flip, run.model.feature_layer, stage_layer, tag)
        except ValueError:
            raise _layout_error(run) from None

    def explainer(self, run, layer=None, batch_size=32):
        return self.grad_cam(run, layer or "top")

    def mirror_symmetric(self, run) -> bool:
        """A network with ``flip`` averages the pooled features of the image and its mirror image."""
        return run.model.flip

    def describe(self, manifest) -> ModelDescription:
        m = manifest.model
        what = ("Fine-tuning: a new classifier on the pretrained network, the stages up to the frozen one kept "
                "fixed, the rest trained." if manifest.command == "finetune" else "Training every layer of the network.")
        return ModelDescription(what, [
            ("backbone", f"{m.backbone} ({m.weights} weights)"), ("frozen through", m.freeze),
            ("predicts", "averaged with the mirror image (--flip)" if m.flip else "the image as given"),
            ("epochs run", m.epochs_run), ("best epoch", m.best_epoch),
            ("interrupted", "yes (resumable with --resume)" if m.interrupted else "no")])

    def report_sections(self, manifest, folder: Path) -> list[str]:
        from cnnkit.reporting.markup import (esc, figure, learning_rate_png, number, png_tag, read_history,
                                             read_json, table)

        report = read_json(folder / "report.json", {}) or {}
        history = read_history(folder / "history.csv")
        parts = ["<h2>Training</h2>"]
        diagnosis = report.get("diagnosis") or []
        if diagnosis:
            parts.append(f"<h3>Diagnosis ({esc(manifest.command)} run)</h3><ul>"
                         + "".join(f"<li>{esc(d)}</li>" for d in diagnosis) + "</ul>")
        sanity = report.get("sanity")
        if isinstance(sanity, dict):
            verdict = "passed" if sanity.get("passed") else "FAILED"
            parts.append(f'<p class="{"ok" if sanity.get("passed") else "note"}">Sanity check {verdict}: the loss on '
                         f"two batches fell from {number(sanity.get('initial_loss'))} to "
                         f"{number(sanity.get('final_loss'), 4)} in {esc(sanity.get('steps'))} steps.</p>")
        figures = [figure(folder / "plots" / "loss.png", "Loss per epoch: too noisy means a bigger batch; "
                          "rising means too high a learning rate."),
                   figure(folder / "plots" / "accuracy.png", "Train vs validation accuracy: a big gap means "
                          "overfitting (more regularization), no gap means too little capacity.")]
        rate = learning_rate_png(history)
        if rate:
            figures.append(f"<figure>{png_tag(rate, 'learning rate')}<figcaption>Learning rate per epoch (dotted: "
                           "phase change; drops: the schedule and the /10 on plateaus).</figcaption></figure>")
        figures.append(figure(folder / "plots" / "update_ratio.png", "Update/weight ratio per stage; the notes' "
                              "rule of thumb is about 1e-3 (dashed)."))
        figures.append(figure(folder / "plots" / "first_layer_filters.png", "First-layer filters: smooth, "
                              "structured filters are healthy; noisy ones mean too little regularization."))
        parts.append('<div class="grid">' + "".join(f for f in figures if f) + "</div>")
        if history.get("loss"):
            keys = [k for k in ("phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
                                "seconds", "images_per_s") if k in history]
            rows = [[number(history[k][i], 4) if isinstance(history[k][i], float) else history[k][i] for k in keys]
                    for i in range(len(history["loss"]))]
            parts.append("<details><summary>history.csv</summary>"
                         + table(["epoch", *keys], [[i + 1, *r] for i, r in enumerate(rows)],
                                 [True] + [k != "phase" for k in keys]) + "</details>")
        return ["".join(parts)]

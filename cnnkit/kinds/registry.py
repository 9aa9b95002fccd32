"""The registry of run kinds, and what a kind is. It imports no kind: each kind's module registers itself.

A run's model is of one kind -- a feature head, a network, an ensemble -- and
everything that differs between kinds lives in that kind's module, as a model
family's does in timm: its manifest section, its classifier (the forward pass
on any engine), its graph (the same forward pass as Keras ops, which `export`
writes and `explain` differentiates), its explainer, whether it predicts the
same for an image and its mirror image, its report sections and the
candidates it scored. Everything else (``cnnkit.runs``, predict, evaluate,
export, explain, reports) asks the run's kind and never tests for one.

Adding a kind is one module with a ``Kind`` subclass decorated with
``register_kind``, imported by ``cnnkit.kinds``, or anywhere before its runs are read (tests/test_new_kind.py adds one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from cnnkit.errors import CnnkitError


class Section(BaseModel):
    """A part of a run's manifest. Unknown fields are refused: a manifest that does not fit this
    version's schema is a damaged run or a newer format, never silently half-read."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Forward:
    """A kind's forward pass as symbolic Keras tensors, from raw pixels.

    Attributes:
        probabilities: (n, classes) class probabilities: what the run predicts.
        scores: (n, classes) the class scores before the last squashing (logits), which Grad-CAM
            differentiates; ``None`` where there are none (a k-NN head).
        features: (n, dims) the retrieval embedding before the classifier, where the graph has one.
        maps: the feature maps of the stage asked for, one ``(maps, row offset, mirrored)`` per view: that
            view of image ``i`` is row ``offset + i`` of ``maps`` (``cnnkit.features.mirror_average``).
    """

    probabilities: Any
    scores: Any = None
    features: Any = None
    maps: list = field(default_factory=list)


class TriedRow(Section):
    """One candidate a run's search scored: its stages, head and cross-validated accuracy, or why it failed."""

    layers: str
    head: str
    cv_accuracy: float | None = None
    best_params: dict[str, Any] = {}
    error: str | None = None


@dataclass
class ModelDescription:
    """What a report says about a run's model: one sentence and a table of (what, value) rows."""

    what: str
    rows: list[tuple[str, Any]]


class Kind:
    """One kind of run model. Subclasses set ``name`` and ``section`` and implement the methods.

    Every method takes a loaded, verified ``cnnkit.runs.Run`` (or its manifest): a kind never
    reads a run folder itself except through the run.
    """

    name: str
    section: type[Section]

    def classifier(self, run, engine="auto", precision="float32"):
        """The run's ``cnnkit.classifier.Classifier``, its network run by ``engine`` in ``precision``."""
        raise NotImplementedError

    def tta_classifier(self, run, engine="auto", precision="float32"):
        """The run's classifier averaging the views its held-out evidence chose (``Run.tta_choice``): the
        plain image alone where none helped or none were measured. ``batch`` also gives the plain view."""
        from cnnkit.tta import NONE, TTAClassifier

        choice = run.tta_choice
        return TTAClassifier(self.classifier(run, engine, precision), choice.tta if choice else NONE)

    def tta_line(self, run) -> str:
        """One line saying what --tta does for the run, and why."""
        choice = run.tta_choice
        if choice is None:
            return ("TTA: this run records no view evidence (made before cnnkit chose views per run), so --tta "
                    "predicts as without it; re-create the run to let it choose")
        return choice.line()

    def forward(self, run, images, stage: str | None = None, tag: str = "") -> Forward:
        """The forward pass as Keras ops on the symbolic raw pixels ``images``.

        Args:
            stage: a stage whose feature maps to return too (``Forward.maps``, for Grad-CAM).
            tag: a suffix making the graph's layer names unique (an ensemble holds several runs).
        """
        raise NotImplementedError

    def explainer(self, run, layer: str | None = None, batch_size: int = 32):
        """The run's ``cnnkit.saliency.Explainer``: Grad-CAM where it has class scores, else occlusion."""
        raise NotImplementedError

    def mirror_symmetric(self, run) -> bool:
        """Whether the run predicts the same for an image and its mirror image (test-time augmentation
        then needs no mirrored views)."""
        raise NotImplementedError

    def grad_cam(self, run, layer: str):
        """A Grad-CAM explainer through this kind's own ``forward`` (built once), at ``layer``'s feature maps."""
        import keras

        from cnnkit.backbones import get_backbone
        from cnnkit.saliency import GradCamExplainer

        spec = get_backbone(run.model.backbone)
        layer = spec.check_stage(layer)
        inputs = keras.Input((run.image_size, run.image_size, 3), name="image")
        found = self.forward(run, inputs, stage=layer)
        if found.scores is None or any(len(m.shape) != 4 for m, _, _ in found.maps):
            choices = [s for s in spec.layer_choices if s not in ("top", "conv5")]
            raise CnnkitError(f"--layer {layer}: {spec.name}'s last stage is not a feature map here; "
                              f"choose from {', '.join(choices)}")
        model = keras.Model(inputs, [found.scores, found.maps[0][0]])  # every view's maps are rows of one tensor
        views = [(i, mirrored) for i, (_, _, mirrored) in enumerate(found.maps)]  # one image: view i is row i

        def forward(x):
            scores, maps = model(x, training=False)
            return [(maps, row, mirrored) for row, mirrored in views], scores

        return GradCamExplainer(forward, run.class_names, run.image_size, run.crop_pct, layer)

    def describe(self, manifest) -> ModelDescription:
        """The report's "What was run" sentence and table."""
        raise NotImplementedError

    def report_sections(self, manifest, folder: Path) -> list[str]:
        """HTML sections only this kind has (cross-validation, training curves, members)."""
        return []

    def tried(self, run) -> list[TriedRow]:
        """The candidates the run's search scored (none for most kinds)."""
        return []


_KINDS: dict[str, Kind] = {}
_LISTENERS: list[Callable[[], None]] = []


def register_kind(cls: type[Kind]) -> type[Kind]:
    """Class decorator: add a kind to the registry under its ``name`` (its section's ``kind`` value)."""
    if cls.name in _KINDS:
        raise ValueError(f"run kind {cls.name!r} registered twice")
    if cls.section.model_fields["kind"].default != cls.name:
        raise ValueError(f"run kind {cls.name!r}: its section's kind is {cls.section.model_fields['kind'].default!r}")
    _KINDS[cls.name] = cls()
    for listener in _LISTENERS:
        listener()
    return cls


def on_register(listener: Callable[[], None]) -> None:
    """Call ``listener`` after every later registration (the run manifest's schema follows the registry)."""
    _LISTENERS.append(listener)


def get_kind(name: str, where: str | Path | None = None) -> Kind:
    """The registered kind ``name``; a one-line error naming ``where`` for a kind this cnnkit does not know."""
    try:
        return _KINDS[name]
    except KeyError:
        raise CnnkitError(f"{where or 'this run'}: cnnkit cannot use a {name!r} model yet; upgrade cnnkit") from None


def registered_kinds() -> list[Kind]:
    """Every registered kind, in registration order."""
    return list(_KINDS.values())

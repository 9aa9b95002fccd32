"""The backbone registry: one entry per network, describing itself.

An entry knows how to build its network (taking raw RGB pixels), its default
input size and centre-crop share, its input scaling, where its weights come
from, and its named stages: ``conv1``..``conv5`` end the blocks whose outputs
have stride 2, 4, 8, 16 and 32; ``top`` is the pooled final feature map.
Nothing here imports TensorFlow; building a network does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cnnkit.errors import CnnkitError

STAGE_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
STAGE_STRIDES = {"conv1": 2, "conv2": 4, "conv3": 8, "conv4": 16, "conv5": 32}
# A stage whose layer is this token is the network's own output.
MODEL_OUTPUT = "<output>"


@dataclass(frozen=True)
class BackboneSpec:
    """What cnnkit knows about one backbone.

    Attributes:
        name: registry key, e.g. "efficientnet_lite0".
        family: "efficientnet_lite", "keras" or "cnnkit".
        input_size: default square input side in pixels.
        preprocessing: the input scaling built into the model (see Preprocess).
        stages: stage name -> Keras layer name ending it; ``MODEL_OUTPUT`` for
            the model's last layer. Stages a network lacks are absent.
        weights_source: where ImageNet weights come from, in words.
        build_fn: ``(input_size, include_top, weights) -> keras.Model``.
        weights_present_fn: whether ImageNet weights are on disk.
        crop_pct: share of the shorter image side the ImageNet eval crop keeps.
        pretrained: whether ImageNet weights exist at all.
    """

    name: str
    family: str
    input_size: int
    preprocessing: str
    stages: dict[str, str]
    weights_source: str
    build_fn: Callable = field(repr=False)
    weights_present_fn: Callable[[], bool] = field(repr=False)
    crop_pct: float = 0.875
    pretrained: bool = True

    @staticmethod
    def stage_key(layer: str) -> str:
        """The stage whose pooled output a ``--layer`` name means: ``top`` is the pooled conv5."""
        return "conv5" if layer == "top" else layer

    @property
    def layer_choices(self) -> list[str]:
        """Names accepted by ``--layer`` and ``--freeze``."""
        return [s for s in STAGE_NAMES if s in self.stages] + ["top"]

    def check_stage(self, stage: str) -> str:
        """Return ``stage`` if this backbone has it, else raise a clear error."""
        if stage not in self.layer_choices:
            raise CnnkitError(
                f"unknown stage {stage!r} for {self.name}; choose from {', '.join(self.layer_choices)}"
            )
        return stage

    def stage_layer(self, model, stage: str):
        """The Keras layer of ``model`` that ends ``stage`` (conv1..conv5)."""
        self.check_stage(stage)
        name = self.stages.get(stage, MODEL_OUTPUT) if stage != "top" else MODEL_OUTPUT
        return model.layers[-1] if name == MODEL_OUTPUT else model.get_layer(name)

    def weights_present(self) -> bool:
        return self.pretrained and self.weights_present_fn()

    def build(self, weights: str | Path | None = "imagenet", input_size: int | None = None,
              include_top: bool = False):
        """Build the network, taking raw RGB pixels in [0, 255].

        Args:
            weights: "imagenet", a weights file, or ``None`` for random init.
            input_size: square input side; ``None`` for the default.
            include_top: the ImageNet classifier (softmax over 1000 classes)
                instead of the final feature map.

        Raises:
            CnnkitError: the weights are not available, with what to do.
        """
        if weights == "imagenet" and not self.pretrained:
            raise CnnkitError(f"{self.name} has no pretrained weights; use --weights none")
        if weights not in (None, "imagenet") and not Path(weights).exists():
            raise CnnkitError(f"--weights {weights}: no such file")
        return self.build_fn(input_size or self.input_size, include_top, weights)


# Filled by the family modules (efficientnet_lite, keras_apps, small_cnn) as
# they are imported by ``cnnkit.backbones``; this module imports none of them.
_REGISTRY: dict[str, BackboneSpec] = {}
DEFAULT_BACKBONE = "efficientnet_lite0"


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (a family module calls this for each of its networks)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[BackboneSpec]:
    """Every registered backbone, in registration order."""
    return list(_REGISTRY.values())


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry for ``name``.

    Raises:
        CnnkitError: unknown name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CnnkitError(
            f"unknown backbone {name!r}; choose from {', '.join(_REGISTRY)}"
        ) from None

"""Pretrained and from-scratch backbones, with named stages conv1..conv5 and top."""

from cnnkit.backbones.registry import (
    DEFAULT_BACKBONE,
    STAGE_NAMES,
    STAGE_STRIDES,
    BackboneSpec,
    get_backbone,
    list_backbones,
)

# Importing the families registers their networks (each calls ``register``).
from cnnkit.backbones import efficientnet_lite, keras_apps, small_cnn  # noqa: E402,F401

__all__ = [
    "DEFAULT_BACKBONE", "STAGE_NAMES", "STAGE_STRIDES", "BackboneSpec", "get_backbone",
    "list_backbones", "imagenet_class_names",
]


def imagenet_class_names(short: bool = True) -> list[str]:
    """The 1000 ImageNet-1k class names in index order.

    Args:
        short: the first synonym only ("tabby" rather than "tabby, tabby cat").
    """
    from importlib.resources import files

    lines = files("cnnkit").joinpath("resources/imagenet_classes.txt").read_text("utf-8").splitlines()
    return [line.split(",")[0].strip() if short else line for line in lines]

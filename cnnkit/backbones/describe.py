"""Parameter counts and stage feature sizes of registered backbones.

Counting needs each network built once (without weights), which takes a few
seconds for the whole registry, so the numbers are cached per cnnkit and
Keras version under the cache directory.
"""

from __future__ import annotations

import json
from importlib import metadata

from cnnkit.backbones.registry import BackboneSpec, get_backbone, list_backbones
from cnnkit.paths import atomic_write, cache_dir


def _measure(spec: BackboneSpec) -> dict:
    model = spec.build(weights=None)
    stages = {stage: int(spec.stage_layer(model, stage).output.shape[-1])
              for stage in spec.layer_choices if stage != "top"}
    return {"params": int(model.count_params()), "stages": stages}


def describe_backbones(names: list[str] | None = None, prepare: bool = False) -> list[dict]:
    """One dict per backbone: name, input size, params, stage channels, weights status.

    Args:
        names: backbones to describe; ``None`` for all.
        prepare: also convert and cache the offline EfficientNet-Lite weights.
    """
    from cnnkit import __version__

    specs = [get_backbone(n) for n in names] if names else list_backbones()
    if prepare:
        from cnnkit.backbones import efficientnet_lite

        for variant in efficientnet_lite.VARIANTS:
            efficientnet_lite.load_converted(variant)
    cache_file = cache_dir() / f"backbones-{__version__}-keras{metadata.version('keras')}.json"
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    missing = [s for s in specs if s.name not in cached]
    for spec in missing:
        cached[spec.name] = _measure(spec)
    if missing:
        try:
            atomic_write(cache_file, json.dumps(cached))
        except OSError:
            pass
    return [
        {
            "name": s.name, "family": s.family, "input_size": s.input_size,
            "params": cached[s.name]["params"], "stages": cached[s.name]["stages"],
            "layers": s.layer_choices, "preprocessing": s.preprocessing,
            "pretrained": s.pretrained, "weights_on_disk": s.weights_present(),
            "weights_source": s.weights_source,
        }
        for s in specs
    ]

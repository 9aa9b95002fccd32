"""The offline EfficientNet-Lite weights: reading, conversion, and real photos."""

import numpy as np
import pytest

from cnnkit.backbones import efficientnet_lite, get_backbone
from cnnkit.backbones.torch_legacy import read_state_dict
from conftest import PHOTOS


@pytest.fixture(scope="module")
def lite0_state():
    return read_state_dict(efficientnet_lite.package_weights_file("efficientnet_lite0"))


def test_reads_the_packaged_state_dict(lite0_state):
    assert lite0_state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert lite0_state["_fc.weight"].shape == (1000, 1280)
    assert lite0_state["_fc.weight"].dtype == np.float32


def test_block_layout_matches_every_packaged_file():
    for variant in efficientnet_lite.VARIANTS:
        state = read_state_dict(efficientnet_lite.package_weights_file(variant))
        arrays = efficientnet_lite.convert_state_dict(variant, state)
        n_blocks = len(efficientnet_lite.blocks(variant))
        assert f"block{n_blocks - 1}_project_conv/0" in arrays
        assert f"_blocks.{n_blocks}._project_conv.weight" not in state


def _same_pad(x, kernel, stride):
    """TensorFlow 'same' padding: the odd extra pixel goes at the bottom/right."""
    h = x.shape[0]
    out = -(-h // stride)
    total = max((out - 1) * stride + kernel - h, 0)
    before = total // 2
    return np.pad(x, ((before, total - before), (before, total - before), (0, 0))), out


def _conv(x, w, stride):  # w: torch layout (out, in, k, k)
    k = w.shape[-1]
    x, out = _same_pad(x, k, stride)
    y = np.zeros((out, out, w.shape[0]))
    for i in range(k):
        for j in range(k):
            patch = x[i:i + stride * out:stride, j:j + stride * out:stride]
            y += patch @ w[:, :, i, j].T
    return y


def _depthwise(x, w, stride):  # w: (C, 1, k, k)
    k = w.shape[-1]
    x, out = _same_pad(x, k, stride)
    y = np.zeros((out, out, w.shape[0]))
    for i in range(k):
        for j in range(k):
            y += x[i:i + stride * out:stride, j:j + stride * out:stride] * w[:, 0, i, j]
    return y


def _bn(x, state, prefix):
    scale = state[f"{prefix}.weight"] / np.sqrt(state[f"{prefix}.running_var"] + 1e-3)
    return (x - state[f"{prefix}.running_mean"]) * scale + state[f"{prefix}.bias"]


def test_keras_stem_and_first_block_match_a_numpy_forward(lite0_state):
    import keras

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3)).astype(np.float64)
    s = lite0_state
    x = (image - 127.0) / 128.0
    stem = np.clip(_bn(_conv(x, s["_conv_stem.weight"], 2), s, "_bn0"), 0, 6)
    dw = np.clip(_bn(_depthwise(stem, s["_blocks.0._depthwise_conv.weight"], 1), s, "_blocks.0._bn1"), 0, 6)
    block0 = _bn(_conv(dw, s["_blocks.0._project_conv.weight"], 1), s, "_blocks.0._bn2")

    spec = get_backbone("efficientnet_lite0")
    model = spec.build(weights="imagenet", input_size=32)
    probe = keras.Model(model.input, [model.get_layer("stem_relu").output,
                                      spec.stage_layer(model, "conv1").output])
    keras_stem, keras_block0 = probe.predict(image[None].astype(np.float32), verbose=0)
    np.testing.assert_allclose(keras_stem[0], stem, atol=1e-4)
    np.testing.assert_allclose(keras_block0[0], block0, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("photo, expected", [
    ("cat.png", {"tabby", "tiger cat", "Egyptian cat"}),
    ("coffee.png", {"espresso", "cup"}),
    ("rocket.jpg", {"missile", "projectile", "space shuttle"}),
    ("motorcycle.png", {"moped", "motor scooter"}),
])
def test_real_photos_land_in_the_right_imagenet_class(photo, expected, lite0_classifier):
    report = lite0_classifier
    top1 = {p.path.name: p.top[0][0] for p in report.predictions}
    assert top1[photo] in expected


@pytest.fixture(scope="module")
def lite0_classifier():
    from cnnkit.predict import predict_imagenet

    return predict_imagenet([PHOTOS], "efficientnet_lite0", k=5)


def test_converted_weights_are_cached_as_plain_npz():
    efficientnet_lite.load_converted("efficientnet_lite0")
    cached = efficientnet_lite.converted_weights_file("efficientnet_lite0")
    with np.load(cached, allow_pickle=False) as data:
        assert data["stem_conv/0"].shape == (3, 3, 3, 32)

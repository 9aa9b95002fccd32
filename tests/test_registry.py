"""Every registered backbone builds, and its named stages sit at the right strides."""

import pytest

from cnnkit.backbones import STAGE_STRIDES, get_backbone, list_backbones
from cnnkit.errors import CnnkitError

SIZE = 64


@pytest.mark.parametrize("spec", list_backbones(), ids=lambda s: s.name)
def test_stages_have_the_right_stride(spec):
    model = spec.build(weights=None, input_size=SIZE)
    assert model.input_shape == (None, SIZE, SIZE, 3)
    for stage in spec.layer_choices[:-1]:
        height = spec.stage_layer(model, stage).output.shape[1]
        assert height == -(-SIZE // STAGE_STRIDES[stage]), (spec.name, stage, height)


def test_unknown_names_list_the_choices():
    with pytest.raises(CnnkitError, match="choose from .*efficientnet_lite0"):
        get_backbone("resnet9000")
    with pytest.raises(CnnkitError, match="conv6.*conv1, conv2, conv3, conv4, conv5, top"):
        get_backbone("resnet50").check_stage("conv6")
    assert "conv1" not in get_backbone("convnext_tiny").layer_choices


def test_keras_weights_offline_give_one_clear_error(tmp_path, monkeypatch):
    from keras.src.utils import file_utils

    def offline(fname, origin, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(CnnkitError) as info:
        get_backbone("mobilenet_v2").build(weights="imagenet")
    message = str(info.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in message
    assert str(tmp_path / "models") in message and "--weights FILE" in message


def test_models_without_pretrained_weights_say_so():
    with pytest.raises(CnnkitError, match="no pretrained weights"):
        get_backbone("tiny_cnn").build(weights="imagenet")

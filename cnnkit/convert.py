"""Writing a Keras model that takes raw ``uint8`` RGB images as SavedModel, TFLite or ONNX.

One path for `cnnkit export` and for the inference engines (``cnnkit.engines``):
a model is traced once as a ``tf.function`` over a ``uint8`` batch of shape
(None, S, S, 3) that returns a dict of named outputs, and that function is
written in each format.

Why these converters (checked with TensorFlow 2.21 / Keras 3.15):

- SavedModel: Keras' own ``ExportArchive``; the file loads with
  ``tf.saved_model.load`` and needs neither Keras nor cnnkit.
- TFLite: ``tf.lite.TFLiteConverter.from_saved_model`` on that SavedModel, so
  the ``serving_default`` signature and its output names carry over; the file
  runs in the ``ai-edge-litert`` interpreter or ``tf.lite.Interpreter``.
- ONNX: ``tf2onnx.convert.from_function``. Keras' own ``model.export(...,
  format="onnx")`` calls the same tf2onnx function for the TensorFlow backend
  but fixes the input name and dtype from the model and names outputs
  ``output_0``...; calling tf2onnx directly keeps cnnkit's ``image`` input as
  ``uint8`` and its named outputs. ``onnxscript``/``torch.onnx`` routes need
  PyTorch; ``onnx2tf`` converts the other way.

``tflite-support`` (the metadata writer MediaPipe reads) pins protobuf 3.20,
which breaks TensorFlow 2.21; the labels are embedded instead as a plain
``labels.txt`` metadata entry of the TFLite flatbuffer (any flatbuffer reader
of the TFLite schema finds it, e.g. ``tensorflow.lite.tools.flatbuffer_utils``),
and ``labels.txt`` is written beside the file too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError
from cnnkit.options import Quantize

INPUT_NAME = "image"
# TFLite ops that `--quantize int8` keeps in float32 (see write_tflite).
FLOAT_OPS_IN_INT8 = ("ADD", "MEAN", "CONCATENATION", "FULLY_CONNECTED", "SOFTMAX", "LOGISTIC")
ONNX_OPSET = 17
TFLITE_LABELS = "labels.txt"


def serving_function(model, image_size: int, output_names: list[str] | None = None):
    """``model`` as a ``tf.function`` from a ``uint8`` (None, S, S, 3) batch to a dict of outputs.

    A model with one output is named ``probabilities`` unless ``output_names``
    says otherwise; a dict-output model keeps its keys.
    """
    import tensorflow as tf

    spec = tf.TensorSpec((None, image_size, image_size, 3), tf.uint8, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(image):
        outputs = model(image, training=False)
        if isinstance(outputs, dict):
            return dict(outputs)
        if isinstance(outputs, (list, tuple)):
            return dict(zip(output_names, outputs))
        return {(output_names or ["probabilities"])[0]: outputs}

    return serve


def write_savedmodel(model, folder: Path, image_size: int) -> None:
    """A TensorFlow SavedModel with one ``serving_default`` signature: ``image`` -> outputs."""
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    serve = serving_function(model, image_size)
    archive.add_endpoint("serve", serve)
    archive.write_out(str(folder), verbose=False)


def write_onnx(model, path: Path, image_size: int) -> None:
    """An ONNX graph (opset ``ONNX_OPSET``): input ``image`` (uint8 NHWC), the model's named outputs."""
    try:
        import tf2onnx
    except ImportError:
        raise CnnkitError('ONNX needs tf2onnx: pip install "cnnkit[export]"') from None
    import logging

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)  # it logs every rewrite at INFO
    serve = serving_function(model, image_size)
    tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=ONNX_OPSET,
                                  output_path=str(path))


def write_tflite(model, path: Path, image_size: int, quantize: Quantize = Quantize.none,
                 representative: Iterable[np.ndarray] | None = None,
                 labels: list[str] | None = None) -> None:
    """A TFLite flatbuffer, optionally quantized, with the class names embedded as metadata.

    Args:
        quantize: ``none`` (float32), ``float16`` (weights stored as float16),
            ``dynamic`` (weights int8, activations float at run time) or
            ``int8`` (weights and activations int8, calibrated on ``representative``).
        representative: ``uint8`` image batches for the int8 calibration.
        labels: class names, one per output column.
    """
    import tensorflow as tf

    quantize = Quantize.parse(quantize, "--quantize")
    with tempfile.TemporaryDirectory(prefix="cnnkit-savedmodel-") as folder:
        write_savedmodel(model, Path(folder) / "saved_model", image_size)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(folder) / "saved_model"))
        if quantize != Quantize.none:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == Quantize.float16:
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == Quantize.int8:
            if representative is None:
                raise CnnkitError("--quantize int8 needs representative images to calibrate on")
            batches = list(representative)

            def calibration():
                for batch in batches:
                    for image in batch:  # one image per step: the converter's calibration batch is 1
                        yield {INPUT_NAME: image[None]}

            converter.representative_dataset = calibration
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                                   tf.lite.OpsSet.TFLITE_BUILTINS]
            # Selective quantization: convolutions (weights and activations) run in int8; the
            # residual additions, pooling, concatenation and the head stay float32. Measured on a
            # Fashion-MNIST conv4+top logreg run (200 test images): everything int8 agreed with the
            # float model on 73.5 %, float pooling and head 97.5 %, float additions too 98.5 %, for
            # the same file size (4.0 MB). Int8 activations are quantized per tensor, so channels
            # with a small range are lost, and a feature head's standardisation multiplies exactly
            # those by up to thousands.
            options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS_IN_INT8))
            debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=calibration,
                                                                 debug_options=options)
            flatbuffer = debugger.get_nondebug_quantized_model()
        if quantize != Quantize.int8:
            flatbuffer = converter.convert()
    if labels is not None:
        flatbuffer = embed_tflite_labels(flatbuffer, labels)
    Path(path).write_bytes(flatbuffer)


def embed_tflite_labels(flatbuffer: bytes, labels: list[str]) -> bytes:
    """Add the class names as a ``labels.txt`` metadata entry of a TFLite model."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(("\n".join(labels) + "\n").encode("utf-8"), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = TFLITE_LABELS
    entry.buffer = len(model.buffers) - 1
    model.metadata = list(model.metadata or []) + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))

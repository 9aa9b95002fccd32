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


class ConverterMissing(CnnkitError, ImportError):
    """tf2onnx is not installed or does not import: one line for `export`, and an engine ``auto`` passes over."""

# TFLite ops that `--quantize int8` keeps in float32 (see write_tflite).
FLOAT_OPS_IN_INT8 = ("ADD", "MEAN", "CONCATENATION", "FULLY_CONNECTED", "SOFTMAX", "LOGISTIC")
# ... and the tensors whose int8 error exceeds this many quantization steps (RMS; see noisy_int8_tensors),
# measured on the first INT8_DEBUG_IMAGES calibration images.
INT8_MAX_RMSE_PER_SCALE = 0.4
INT8_DEBUG_IMAGES = 50
# ... and the convolutions among those float ones with at least this many weights store them int8 anyway
# (weight-only: dequantized once, on the interpreter's first run; see int8_weights_for_float_convolutions).
INT8_WEIGHT_ONLY_MIN_WEIGHTS = 16_384
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
    except ImportError as error:
        raise ConverterMissing(f"ONNX needs tf2onnx, which does not import ({str(error).splitlines()[0][:160]}): "
                               "pip install tf2onnx onnx") from None
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
            # Selective quantization. The residual additions, pooling, concatenation and the head
            # stay float32 (FLOAT_OPS_IN_INT8): measured on a Fashion-MNIST conv4+top logreg run
            # (200 test images), everything int8 agreed with the float model on 73.5 %, float
            # pooling and head 97.5 %, float additions too 98.5 %. Int8 activations are quantized per
            # tensor, so channels with a small range are lost, and a feature head's standardisation
            # multiplies exactly those by up to thousands.
            options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS_IN_INT8))
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=_debug_dataset(batches, INT8_DEBUG_IMAGES),
                debug_options=options)
            noisy = noisy_int8_tensors(debugger)
            if noisy:
                debugger.options = tf.lite.experimental.QuantizationDebugOptions(
                    denylisted_ops=list(FLOAT_OPS_IN_INT8), denylisted_nodes=noisy)
            flatbuffer = int8_weights_for_float_convolutions(debugger.get_nondebug_quantized_model())
        if quantize != Quantize.int8:
            flatbuffer = converter.convert()
    if labels is not None:
        flatbuffer = embed_tflite_labels(flatbuffer, labels)
    Path(path).write_bytes(flatbuffer)


def _debug_dataset(batches: list[np.ndarray], count: int):
    def images():
        for image in [image for batch in batches for image in batch][:count]:
            yield [image[None]]  # QuantizationDebugger.run() takes a list of the model's inputs

    return images


def noisy_int8_tensors(debugger) -> list[str]:
    """The quantized tensors whose own int8 error is large: to be computed in float32 instead.

    TensorFlow's selective-quantization recipe: the debugger runs each quantized op beside its
    float op on the same input, and ``rmse/scale`` (the RMS difference in units of the output's
    quantization step) is ~0.29 (1/sqrt(12), rounding alone) for a well-quantized tensor; those
    above ``INT8_MAX_RMSE_PER_SCALE`` stay float. Measurements behind the 0.4: docs/int8.md.
    """
    import csv
    import io

    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    dump.seek(0)
    noisy = []
    for row in csv.DictReader(dump):
        scale = float(row["scale"] or 0)
        error = float(row["mean_squared_error"] or "nan")
        if scale > 0 and np.sqrt(error) / scale > INT8_MAX_RMSE_PER_SCALE:
            noisy.append(row["tensor_name"])
    return noisy


def int8_weights_for_float_convolutions(flatbuffer: bytes,
                                        min_weights: int = INT8_WEIGHT_ONLY_MIN_WEIGHTS) -> bytes:
    """Store the float32 weights of a TFLite model's float convolutions as int8 (weight-only).

    Selective int8 quantization (``write_tflite``) keeps the noisiest convolutions in float32, and
    TFLite's converter then keeps their *weights* float32 too, which it has no option against. This
    rewrites the flatbuffer the way TFLite's own weight-only quantization lays it out: each such
    weight tensor becomes int8 with symmetric per-output-channel scales, and a ``DEQUANTIZE`` op
    (version 5: per-channel int8) that the interpreter runs once (on its first run) turns it back
    into the float32 tensor the convolution reads. Convolutions with fewer than ``min_weights``
    weights (the first layers) keep float32, and fully connected layers are left alone; the
    measurements behind both: docs/int8.md.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    builtin = schema.BuiltinOperator
    output_channel_axis = {builtin.CONV_2D: 0, builtin.DEPTHWISE_CONV_2D: 3}  # OHWI and 1HWO layouts
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    if builtin.DEQUANTIZE in codes:
        dequantize = codes.index(builtin.DEQUANTIZE)
    else:
        model.operatorCodes.append(schema.OperatorCodeT())
        dequantize = len(model.operatorCodes) - 1
        model.operatorCodes[dequantize].builtinCode = builtin.DEQUANTIZE
        model.operatorCodes[dequantize].deprecatedBuiltinCode = builtin.DEQUANTIZE
    model.operatorCodes[dequantize].version = max(model.operatorCodes[dequantize].version, 5)
    buffer_users: dict[int, int] = {}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            buffer_users[tensor.buffer] = buffer_users.get(tensor.buffer, 0) + 1
    for graph in model.subgraphs:
        dequantize_ops = []
        for op in graph.operators:
            axis = output_channel_axis.get(codes[op.opcodeIndex])
            if axis is None:
                continue
            weights = graph.tensors[op.inputs[1]]
            buffer = model.buffers[weights.buffer]
            if (weights.type != schema.TensorType.FLOAT32 or buffer.data is None or weights.buffer == 0
                    or buffer_users[weights.buffer] != 1 or int(np.prod(weights.shape)) < min_weights):
                continue
            values = np.frombuffer(bytes(buffer.data), "<f4").reshape(weights.shape)
            others = tuple(i for i in range(values.ndim) if i != axis)
            largest = np.abs(values).max(axis=others, keepdims=True)
            scale = np.where(largest > 0, largest / 127, 1).astype(np.float32)
            buffer.data = np.frombuffer(np.clip(np.round(values / scale), -127, 127).astype(np.int8).tobytes(),
                                        np.uint8)
            weights.type = schema.TensorType.INT8
            weights.quantization = schema.QuantizationParametersT()
            weights.quantization.scale = scale.reshape(-1)
            weights.quantization.zeroPoint = np.zeros(scale.size, np.int64)
            weights.quantization.quantizedDimension = axis
            dequantized = schema.TensorT()
            dequantized.shape = np.array(weights.shape, np.int32)
            dequantized.type = schema.TensorType.FLOAT32
            dequantized.buffer = 0  # buffer 0 is the schema's empty buffer: computed at run time
            name = weights.name.decode() if isinstance(weights.name, bytes) else weights.name
            dequantized.name = name + "/dequantized"
            graph.tensors.append(dequantized)
            dequantize_ops.append(schema.OperatorT())
            dequantize_ops[-1].opcodeIndex = dequantize
            dequantize_ops[-1].inputs = np.array([op.inputs[1]], np.int32)
            dequantize_ops[-1].outputs = np.array([len(graph.tensors) - 1], np.int32)
            op.inputs[1] = len(graph.tensors) - 1
        # Operators run in list order: the weight dequantizations go first.
        graph.operators = dequantize_ops + list(graph.operators)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


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

"""`cnnkit export`: every kind of run as one graph, loaded back by its own runtime and checked."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.errors import CnnkitError
from cnnkit.export import export_run
from cnnkit.extraction import run_extract
from cnnkit.options import ExtractOptions
from conftest import make_class_tree

runner = CliRunner()
TINY = dict(backbone="tiny_cnn", weights="none", image_size=32, engine="tf", cv=3)
HEADS = {
    "logreg": dict(head="logreg", layers="conv4,top"),
    "linear-svm": dict(head="linear-svm", layers="top", flip=True, l2_normalize=True, whiten=True, pca=8),
    "knn": dict(head="knn", layers="conv3,top"),
    "grid-flip": dict(head="logreg", layers="conv3,top", flip=True, grid=3),  # regions put back in place
    "binary-logreg": dict(head="logreg", layers="top"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from cnnkit.options import TrainOptions
    from cnnkit.training import run_training

    root = tmp_path_factory.mktemp("export")
    data = make_class_tree(root / "data", {"a": 9, "b": 9, "c": 9}, size=32)
    binary = make_class_tree(root / "binary", {"x": 8, "y": 8}, size=32)
    made = {name: run_extract(binary if name.startswith("binary") else data, ExtractOptions(**TINY, **options),
                              root / name).run_path
            for name, options in HEADS.items()}
    made["svm"] = run_extract(data, ExtractOptions(**TINY, head="svm"), root / "svm").run_path
    made["logreg-48"] = run_extract(data, ExtractOptions(**{**TINY, "image_size": 48}, layers="conv4,top"),
                                    root / "logreg-48").run_path
    made["network"] = run_training(data, TrainOptions(mode="train", backbone="tiny_cnn", weights="none",
                                                      freeze="none", head_epochs=0, image_size=32, epochs=1,
                                                      batch_size=8, val_split=0.2), root / "network").run_path
    made["network-flip"] = run_training(data, TrainOptions(mode="train", backbone="tiny_cnn", weights="none",
                                                           freeze="none", head_epochs=0, image_size=32, epochs=1,
                                                           batch_size=8, val_split=0.2, flip=True),
                                        root / "network-flip").run_path
    return {"data": data, "root": root, **made}


@pytest.mark.parametrize("kind", [*HEADS, "network", "network-flip"])
@pytest.mark.parametrize("fmt", ["onnx", "tflite", "savedmodel"])
def test_every_exportable_run_agrees_with_its_own_predictions(runs, kind, fmt, tmp_path):
    result = export_run(runs[kind], fmt, tmp_path / "out")
    assert result.check.images >= 16 and result.check.agreement == 1.0
    # float32 graphs: only summation order differs (k-NN: distances by a matrix product).
    assert result.check.max_probability_difference < (5e-3 if kind == "knn" else 1e-4)
    info = json.loads((tmp_path / "out" / "model.json").read_text())
    class_names = ["x", "y"] if kind.startswith("binary") else ["a", "b", "c"]
    assert info["class_names"] == class_names
    assert (tmp_path / "out" / "labels.txt").read_text().split() == class_names
    assert info["input"] == {"name": "image", "dtype": "uint8", "shape": [None, 32, 32, 3],
                             "layout": "NHWC, RGB, raw pixels 0..255"}
    assert info["source_run"]["seal"] == json.loads((runs[kind] / "manifest.json").read_text())["seal"]
    assert (tmp_path / "out" / result.model_file).exists()


def test_an_rbf_svm_head_is_refused_with_the_heads_to_use(runs, tmp_path):
    result = runner.invoke(app, ["export", str(runs["svm"]), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "RBF SVM" in result.stderr and "--head logreg" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_export_that_disagrees_is_not_written_and_exits_1(runs, tmp_path, monkeypatch):
    import cnnkit.export

    real = cnnkit.export.load_exported

    def broken(path, fmt):  # a conversion that mixed up the classes
        run = real(path, fmt)
        return lambda images: run(images)[:, ::-1]

    monkeypatch.setattr(cnnkit.export, "load_exported", broken)
    out = tmp_path / "o"
    result = runner.invoke(app, ["export", str(runs["logreg"]), "-f", "onnx", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "nothing written" in result.stderr and not out.exists()
    assert not list(tmp_path.iterdir())  # no temporary folder left either


def test_bad_requests_are_one_line_errors(runs, tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(app, ["export", str(runs["logreg"]), "-f", "onnx", "-o", str(out), "--quantize", "int8"])
    assert result.exit_code == 2 and "only --format tflite" in result.stderr
    out.mkdir()
    result = runner.invoke(app, ["export", str(runs["logreg"]), "-f", "onnx", "-o", str(out)])
    assert result.exit_code == 2 and "--force" in result.stderr
    result = runner.invoke(app, ["export", str(runs["logreg"]), "-f", "onnx", "-o", str(out), "--force"])
    assert result.exit_code == 2 and "not a cnnkit export" in result.stderr
    with pytest.raises(CnnkitError, match="give --check DATA"):
        export_run(runs["logreg"], "onnx", tmp_path / "o2", check=tmp_path / "missing")


def test_int8_tflite_is_calibrated_smaller_and_carries_its_labels(runs, tmp_path):
    from tensorflow.lite.tools import flatbuffer_utils

    float_export = export_run(runs["network"], "tflite", tmp_path / "float")
    int8_export = export_run(runs["network"], "tflite", tmp_path / "int8", quantize="int8")
    # A tiny network: the flatbuffer's fixed overhead is most of it (EfficientNet-Lite0: docs/benchmarks.md).
    assert int8_export.size_bytes < 0.6 * float_export.size_bytes
    assert int8_export.check.agreement >= 0.95
    model = flatbuffer_utils.read_model(str(tmp_path / "int8" / "model.tflite"))
    entry = next(m for m in model.metadata if m.name == b"labels.txt" or m.name == "labels.txt")
    assert bytes(model.buffers[entry.buffer].data).decode().split() == ["a", "b", "c"]


def test_float_convolutions_of_an_int8_model_get_int8_weights_and_the_same_outputs():
    """The weight-only rewrite: large float conv weights become int8 + DEQUANTIZE, small ones stay float."""
    import keras
    import tensorflow as tf
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    from cnnkit.convert import int8_weights_for_float_convolutions

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)  # 432 weights: stays float
    x = keras.layers.Conv2D(128, 1, activation="relu")(x)  # 2,048
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)  # 1,152
    x = keras.layers.Conv2D(128, 1)(x)  # 16,384
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    original = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    rewritten = int8_weights_for_float_convolutions(original, min_weights=1_000)

    assert len(rewritten) < 0.5 * len(original)
    graph = flatbuffer_utils.convert_bytearray_to_object(bytearray(rewritten)).subgraphs[0]
    int8 = sorted(int(np.prod(t.shape)) for t in graph.tensors if t.type == schema.TensorType.INT8)
    assert int8 == [1_152, 2_048, 16_384]
    images = np.random.default_rng(0).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)

    def outputs(flatbuffer):
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    expected = outputs(original)
    np.testing.assert_allclose(outputs(rewritten), expected, atol=0.02 * np.abs(expected).max())
    assert not np.array_equal(outputs(rewritten), expected)  # the weights really were rounded


def test_check_data_can_be_any_folder_of_images(runs, tmp_path):
    result = runner.invoke(app, ["export", str(runs["knn"]), "-f", "onnx", "-o", str(tmp_path / "o"),
                                 "--check", str(runs["data"] / "b"), "--check-images", "5", "--json"])
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["check"]
    assert check["images"] == 5 and check["agreement"] == 1.0


def test_exports_classify_an_image_without_cnnkit(runs, tmp_path):
    """The README's snippets, run in a process that never imports cnnkit."""
    folders = {fmt: tmp_path / fmt for fmt in ("onnx", "tflite", "savedmodel")}
    for fmt, folder in folders.items():
        export_run(runs["logreg"], fmt, folder)
    image = runs["data"] / "c" / "003.png"
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from PIL import Image

        def pixels(path, size):
            image = Image.open(path).convert("RGB")
            side = min(image.size)
            box = ((image.width - side) // 2, (image.height - side) // 2)
            image = image.crop((*box, box[0] + side, box[1] + side)).resize((size, size), Image.BICUBIC)
            return np.asarray(image, np.uint8)[None]

        top = {{}}
        import onnxruntime as ort
        session = ort.InferenceSession({str(folders["onnx"] / "model.onnx")!r})
        top["onnx"] = session.run(None, {{"image": pixels({str(image)!r}, 32)}})[0].argmax()
        from ai_edge_litert.interpreter import Interpreter
        classify = Interpreter({str(folders["tflite"] / "model.tflite")!r}).get_signature_runner()
        top["tflite"] = classify(image=pixels({str(image)!r}, 32))["probabilities"].argmax()
        import tensorflow as tf
        model = tf.saved_model.load({str(folders["savedmodel"] / "saved_model")!r})
        top["savedmodel"] = model.signatures["serving_default"](image=pixels({str(image)!r}, 32))["probabilities"].numpy().argmax()
        assert not any(name.startswith("cnnkit") for name in sys.modules)
        print(json.dumps({{k: int(v) for k, v in top.items()}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    from cnnkit.predict import predict_run

    expected = predict_run([image], runs["logreg"], k=1).predictions[0].top[0][0]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert {["a", "b", "c"][v] for v in got.values()} == {expected}


def test_an_ensemble_exports_as_one_graph_averaging_its_members(runs, tmp_path):
    """Ensembles are runs whose members are sealed runs inside them; the graph averages them by weight."""
    import shutil

    from cnnkit.export import inference_model
    from cnnkit.kinds.ensemble import EnsembleMember, EnsembleModel
    from cnnkit.runs import RunManifest, load_run, write_run

    members = [load_run(runs["logreg"]), load_run(runs["knn"])]

    def write_files(folder):
        for i, member in enumerate(members):
            shutil.copytree(member.path, folder / "members" / str(i))

    first = members[0].manifest
    manifest = RunManifest(command="ensemble", class_names=first.class_names, image_size=32,
                           preprocessing=first.preprocessing,
                           model=EnsembleModel(members=[EnsembleMember(path=f"members/{i}", seal=m.manifest.seal,
                                                                       weight=w)
                                                        for i, (m, w) in enumerate(zip(members, (1.0, 3.0)))]))
    ensemble = load_run(write_run(tmp_path / "ensemble", manifest, write_files))
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), np.uint8)
    got = np.asarray(inference_model(ensemble)(images)["probabilities"])
    expected = (members[0].classifier()(images) + 3 * members[1].classifier()(images)) / 4
    np.testing.assert_allclose(got, expected, atol=5e-3)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_an_ensemble_of_two_input_sizes_exports_resizing_for_the_smaller_member(runs, fmt, tmp_path):
    """auto's from-scratch plan: a 32 px network and a 48 px feature head; the graph resizes as cnnkit does."""
    from cnnkit.ensemble import make_ensemble
    from cnnkit.runs import load_run

    ensemble = make_ensemble([runs["network"], runs["logreg-48"]], tmp_path / "ensemble", weights=[2, 1])
    assert load_run(ensemble).image_size == 48
    result = export_run(ensemble, fmt, tmp_path / "out")
    assert result.check.images >= 16 and result.check.agreement == 1.0
    assert result.check.max_probability_difference < 1e-3

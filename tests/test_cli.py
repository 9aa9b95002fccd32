"""The command line as a user meets it: exit codes, messages, JSON."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from conftest import PHOTOS, write_bad_files, write_odd_good_files

runner = CliRunner()

_IMPORT_CHECK = """
import sys
from cnnkit.cli import app
try:
    app(sys.argv[1:], standalone_mode=True)
except SystemExit as exit:
    code = exit.code
print("TF_LOADED" if "tensorflow" in sys.modules else "TF_NOT_LOADED", code, file=sys.stderr)
"""


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["predict", "--help"], 0),
    (["predict"], 2),
    (["predict", "x.jpg", "--top-k", "zero"], 2),
    (["no-such-command"], 2),
])
def test_help_and_usage_errors_do_not_import_tensorflow(args, code):
    result = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, *args],
                            capture_output=True, text=True, timeout=60)
    assert f"TF_NOT_LOADED {code}" in result.stderr, result.stderr


_ENTRY_POINT = """
import atexit, sys
atexit.register(lambda: print("ATEXIT", file=sys.stderr))
from cnnkit.cli import main
main()
"""


@pytest.mark.parametrize("args, code, stream, text", [
    (["--help"], 0, "stdout", "Usage"),
    (["no-such-command"], 2, "stderr", "No such command"),
])
def test_the_entry_point_exits_with_the_code_output_flushed_and_atexit_handlers_run(args, code, stream, text):
    """main() leaves without the interpreter's teardown (os._exit), keeping what a normal exit does."""
    result = subprocess.run([sys.executable, "-c", _ENTRY_POINT, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    assert text in getattr(result, stream) and result.stderr.rstrip().endswith("ATEXIT"), result.stderr


def test_predict_json_on_real_photos():
    result = runner.invoke(app, ["predict", str(PHOTOS / "coffee.png"), str(PHOTOS / "cat.png"),
                                 "--json", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["coffee.png", "cat.png"]
    assert rows[0]["top"][0]["label"] == "espresso"
    for row in rows:
        scores = [t["score"] for t in row["top"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)


def test_predict_mixed_folder_names_every_bad_file_without_traceback(tmp_path):
    good = write_odd_good_files(tmp_path / "mixed")
    bad = write_bad_files(tmp_path / "mixed")
    result = runner.invoke(app, ["predict", str(tmp_path / "mixed"), str(tmp_path / "mixed" / "notes.txt"),
                                 "--json"])
    assert result.exit_code == 0
    predicted = sorted(r["path"].rsplit("/", 1)[-1] for r in json.loads(result.stdout))
    assert predicted == good
    for name in bad:
        assert f"{name}: " in result.stderr, name
    assert "Traceback" not in result.output + result.stderr


def test_predict_with_nothing_readable_exits_2(tmp_path):
    write_bad_files(tmp_path)
    result = runner.invoke(app, ["predict", str(tmp_path / "empty.png"), str(tmp_path / "nope.jpg")])
    assert result.exit_code == 2
    assert "empty.png: empty file" in result.stderr and "nope.jpg: no such file" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["predict", str(PHOTOS / "cat.png"), "--backbone", "alexnet"], "'alexnet' is not one of 'efficientnet_lite0'"),
    (["extract", "data", "--pool", "median"], "'median' is not one of 'avg', 'max'"),
    (["finetune", "data", "--freeze", "conv7"], "'conv7' is not one of 'none', 'conv1'"),
    (["train", "data", "--schedule", "sawtooth"], "'sawtooth' is not one of 'exp', 'step'"),
    (["extract"], "Missing argument 'data'"),
])
def test_usage_errors_are_one_line_naming_the_flag(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr and "--help" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_info_json():
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert "efficientnet_lite0" in data["weights_on_disk"]
    assert data["would_use"].startswith(("CPU", "GPU"))


def test_backbones_json_lists_stage_dims():
    result = runner.invoke(app, ["backbones", "efficientnet_lite0", "--json"])
    assert result.exit_code == 0
    (row,) = json.loads(result.stdout)
    assert row["stages"] == {"conv1": 16, "conv2": 24, "conv3": 40, "conv4": 112, "conv5": 1280}
    assert row["params"] == 3_413_024 and row["weights_on_disk"]


def test_extract_predict_evaluate_similar_from_the_command_line(tmp_path, monkeypatch):
    from conftest import make_class_tree

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "cache"))  # "computed" counts only this test's work
    data = make_class_tree(tmp_path / "data", {"a": 6, "b": 6})
    run = tmp_path / "run"
    common = ["--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32"]
    result = runner.invoke(app, ["extract", str(data), "--out", str(run), "--layer", "conv4,top",
                                 "--head", "knn", "--cv", "3", "--json", *common])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"] == ["conv4", "top"] and summary["computed"] == 12

    again = runner.invoke(app, ["extract", str(data), "--out", str(run), *common])
    assert again.exit_code == 2 and "already exists" in again.stderr

    predicted = runner.invoke(app, ["predict", "--model", str(run), str(data / "a"), "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert {r["top"][0]["label"] for r in json.loads(predicted.stdout)} <= {"a", "b"}

    evaluated = runner.invoke(app, ["evaluate", str(run), str(data), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    top1 = {r["path"]: r["top"][0]["label"] for r in json.loads(
        runner.invoke(app, ["predict", "--model", str(run), str(data), "--json"]).stdout)}
    assert metrics["accuracy"] == sum(top1[str(p)] == p.parent.name for p in data.rglob("*.png")) / 12
    assert (run / "eval" / "data" / "confusion.png").exists()

    neighbours = runner.invoke(app, ["similar", str(run), str(data / "b" / "000.png"), "-k", "2", "--json"])
    assert neighbours.exit_code == 0, neighbours.output
    assert len(json.loads(neighbours.stdout)) == 2


def test_extract_bad_flags_are_one_line_errors(tmp_path):
    from conftest import make_class_tree

    data = make_class_tree(tmp_path / "data", {"a": 3, "b": 3})
    for flags, message in ((["--layer", "conv9"], "unknown stage 'conv9'"),
                           (["--head", "forest"], "'--head': Value error, 'forest' is not one of 'logreg'"),
                           (["--pca", "-3"], "--pca '-3'")):
        result = runner.invoke(app, ["extract", str(data), "--out", str(tmp_path / "r"),
                                     "--backbone", "tiny_cnn", "--weights", "none", *flags])
        assert result.exit_code == 2, (flags, result.output)
        assert message in result.stderr and "Traceback" not in result.stderr


def test_train_from_the_command_line_and_bad_flags(tmp_path):
    from conftest import make_class_tree

    data = make_class_tree(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    result = runner.invoke(app, ["train", str(data), "--backbone", "tiny_cnn", "--out", str(tmp_path / "run"),
                                 "--epochs", "2", "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["best_epoch"] >= 1 and summary["diagnosis"]
    bad = runner.invoke(app, ["finetune", str(data), "--freeze", "conv7", "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 2 and "conv7" in bad.stderr and "Traceback" not in bad.stderr

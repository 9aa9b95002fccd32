"""The run contract: every producer's run loads through the typed manifest, and a changed run is refused."""

import json
import os
import stat

import pytest

from cnnkit.errors import CnnkitError
from cnnkit.extraction import run_extract
from cnnkit.options import ExtractOptions
from cnnkit.kinds.feature_head import FeatureHeadModel
from cnnkit.kinds.network import NetworkModel
from cnnkit.runs import FORMAT_VERSION, load_run
from conftest import make_class_tree, reseal

TINY = dict(backbone="tiny_cnn", weights="none", image_size=32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run of each producer on tiny data: extract, train and finetune (the first layers frozen)."""
    from cnnkit.options import TrainOptions
    from cnnkit.training import run_training

    root = tmp_path_factory.mktemp("runs")
    data = make_class_tree(root / "data", {"a": 8, "b": 8}, size=32)
    old = os.umask(0o022)
    try:
        extract = run_extract(data, ExtractOptions(**TINY, layers="conv4,top", cv=3), root / "extract").run_path
        common = dict(backbone="tiny_cnn", image_size=32, epochs=1, batch_size=4, val_split=0.25)
        train = run_training(data, TrainOptions(mode="train", weights="none", freeze="none", head_epochs=0, **common),
                             root / "train").run_path
        finetune = run_training(data, TrainOptions(mode="finetune", freeze="conv4", head_epochs=1,
                                                   **{**common, "backbone": "efficientnet_lite0"}),
                                root / "finetune").run_path
    finally:
        os.umask(old)
    return {"data": data, "extract": extract, "train": train, "finetune": finetune}


def test_every_run_loads_through_the_typed_manifest(runs):
    extract, train, finetune = load_run(runs["extract"]), load_run(runs["train"]), load_run(runs["finetune"])
    assert isinstance(extract.model, FeatureHeadModel) and extract.model.layers == ["conv4", "top"]
    assert isinstance(train.model, NetworkModel) and train.model.feature_layer == "features"
    assert train.model.freeze == "none" and finetune.model.freeze == "conv4" and finetune.model.epochs_run == 2
    assert finetune.manifest.command_line == (f"cnnkit finetune {runs['data']} --image-size 32 --epochs 1 "
                                              "--head-epochs 1 --batch-size 4 --val-split 0.25")
    for run in (extract, train, finetune):
        manifest = run.manifest
        assert manifest.format == FORMAT_VERSION and manifest.seal == manifest.seal_of()
        assert manifest.class_names == ["a", "b"] and manifest.image_size == 32
        assert manifest.data.splits["train"] + manifest.data.splits["val"] == 16
        assert len(manifest.data.fingerprint) == 64 and manifest.data.classes == {"a": 8, "b": 8}
        assert manifest.command_line.startswith(f"cnnkit {manifest.command} ")
        assert "manifest.json" not in manifest.files and manifest.files
    assert load_run(runs["extract"]).manifest.data.fingerprint == load_run(runs["train"]).manifest.data.fingerprint


def test_the_layout_in_the_docstring_is_what_runs_hold(runs):
    import cnnkit.runs

    for name in ("extract", "train", "finetune"):
        for file in load_run(runs[name]).manifest.files:
            assert file.split("/")[0] in cnnkit.runs.__doc__, file


def test_run_folders_follow_the_umask(runs):
    for name in ("extract", "train", "finetune"):
        for path in [runs[name], *runs[name].rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


@pytest.mark.parametrize("name", ["extract", "train"])
def test_editing_any_file_is_refused_at_load(runs, tmp_path, name):
    import shutil

    for file in load_run(runs[name]).manifest.files:
        copy = tmp_path / f"{name}-{file.replace('/', '_')}"
        shutil.copytree(runs[name], copy)
        with (copy / file).open("ab") as handle:
            handle.write(b" ")
        with pytest.raises(CnnkitError, match=f"{file}: was modified after the run was written"):
            load_run(copy)


def test_a_report_added_by_auto_is_sealed_too(runs, tmp_path):
    import shutil

    from cnnkit.extraction import run_extract

    def attach(folder, manifest):
        (folder / "report.md").write_text(f"# report\naccuracy {manifest.metrics['train_accuracy']}\n")

    run = run_extract(runs["data"], ExtractOptions(**TINY, cv=3), tmp_path / "run", attach=[attach]).run_path
    assert "report.md" in load_run(run).manifest.files
    edited = tmp_path / "edited"
    shutil.copytree(run, edited)
    (edited / "report.md").write_text("# report\naccuracy 0.999\n")
    with pytest.raises(CnnkitError, match="report.md: was modified"):
        load_run(edited)


def test_editing_the_manifest_breaks_its_seal(runs, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs["extract"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["class_names"] = ["b", "a"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CnnkitError, match="manifest.json: was modified after the run was written"):
        load_run(copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("class_names"), "field 'class_names': Field required"),
    (lambda m: m.__setitem__("image_size", "big"), "field 'image_size'"),
    (lambda m: m["model"].__setitem__("kind", "forest"), "field 'model'"),
    (lambda m: m["model"].__setitem__("layers", "conv4"), "field 'model.feature_head.layers'"),
    (lambda m: m.__setitem__("surprise", 1), "field 'surprise': Extra inputs are not permitted"),
])
def test_a_manifest_that_does_not_fit_the_schema_names_the_field(runs, tmp_path, edit, message):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs["extract"], copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CnnkitError, match=message.replace("(", r"\(")) as error:
        load_run(copy)
    assert "\n" not in str(error.value)


def test_newer_formats_and_non_runs_are_refused(runs, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs["extract"], copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["format"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CnnkitError, match="written by a newer cnnkit"):
        load_run(copy)
    (copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(CnnkitError, match="not a cnnkit manifest"):
        load_run(copy)
    with pytest.raises(CnnkitError, match="not a cnnkit run"):
        load_run(runs["data"])


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "index/../../outside.txt"])
def test_file_names_outside_the_run_are_refused(runs, tmp_path, name):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs["extract"], copy)
    (tmp_path / "outside.txt").write_text("secret")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    from cnnkit.runs import RunManifest

    forged = RunManifest.model_validate(manifest)
    forged.seal = forged.seal_of()
    (copy / "manifest.json").write_text(forged.to_json())
    with pytest.raises(CnnkitError, match="not a file inside the run"):
        load_run(copy)


def test_a_symlink_pointing_outside_the_run_is_refused_even_when_resealed(runs, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs["extract"], copy)
    secret = tmp_path / "secret.npy"
    shutil.copyfile(copy / "index" / "features.npy", secret)
    (copy / "index" / "features.npy").unlink()
    (copy / "index" / "features.npy").symlink_to(secret)
    reseal(copy)
    with pytest.raises(CnnkitError, match="is a symbolic link"):
        load_run(copy)


def test_a_cnnkit_0_1_run_still_loads(runs, tmp_path):
    """Format 1 (cnnkit 0.1) manifests are read through the upgrade path."""
    import shutil

    from cnnkit.predict import predict_run

    copy = tmp_path / "old"
    shutil.copytree(runs["extract"], copy)
    new = json.loads((copy / "manifest.json").read_text())
    model = new["model"]
    old = {"format": 1, "cnnkit_version": "0.1.0", "created": new["created"], "strategy": "extract",
           "backbone": model["backbone"], "weights": model["weights"], "layers": model["layers"],
           "image_size": 32, "crop_pct": 1.0, "pool": "avg", "flip": False, "preprocessing": "tf",
           "class_names": ["a", "b"], "head": {"kind": model["head"], "pca": model["pca"], "whiten": False,
                                                "l2_normalize": False, "best_params": {}, "cv_folds": 3},
           "feature_dims": model["feature_dims"], "metrics": new["metrics"], "files": new["files"]}
    (copy / "manifest.json").write_text(json.dumps(old))
    run = load_run(copy)
    assert run.model.layers == ["conv4", "top"] and run.manifest.command == "extract"
    assert len(predict_run([runs["data"]], copy).predictions) == 16


@pytest.mark.parametrize("kind, field, old_meaning", [("extract", "grid", 1), ("train", "flip", False)])
def test_a_run_sealed_before_a_field_existed_loads_with_the_fields_old_meaning(runs, tmp_path, kind, field,
                                                                                old_meaning):
    """The seal is checked over the fields as stored: a field the schema gained since is absent, not a forgery."""
    import shutil

    from cnnkit.predict import predict_run
    from cnnkit.runs import seal_of_fields

    copy = tmp_path / kind
    shutil.copytree(runs[kind], copy)
    data = json.loads((copy / "manifest.json").read_text())
    del data["model"][field]
    data["seal"] = seal_of_fields(data)  # as the cnnkit of that time sealed it
    (copy / "manifest.json").write_text(json.dumps(data, indent=2))
    assert getattr(load_run(copy).model, field) == old_meaning
    assert len(predict_run([runs["data"]], copy).predictions) == 16

    data["model"][field] = 2 if field == "grid" else True  # changed after sealing
    (copy / "manifest.json").write_text(json.dumps(data, indent=2))
    with pytest.raises(CnnkitError, match="seal mismatch"):
        load_run(copy)


@pytest.mark.parametrize("path, value", [
    (("image_size",), 100_000),  # a memory bomb: every reader decodes images at this size
    (("image_size",), 32.0),  # a size is a whole number
    (("model", "flip"), "yes"),  # a flag is true or false, not a word a lax reader takes for true
    (("model", "flip"), 1),
    (("model", "epochs_run"), 2.5),
])
def test_a_consistently_sealed_manifest_with_a_field_out_of_range_or_of_the_wrong_type_is_refused(
        runs, tmp_path, path, value):
    import shutil

    from cnnkit.runs import seal_of_fields

    copy = tmp_path / "forged"
    shutil.copytree(runs["train"], copy)
    data = json.loads((copy / "manifest.json").read_text())
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    data["seal"] = seal_of_fields(data)  # a forger recomputes the seal: only the schema stands in the way
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CnnkitError, match=rf"field '[a-z_.]*{path[-1]}'") as refused:
        load_run(copy)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("size", [0, 15, 2049, 10**6, 64.0, True])
def test_an_image_size_outside_16_to_2048_is_refused_by_the_library(size):
    from cnnkit.options import TrainOptions

    with pytest.raises(CnnkitError, match=r"--image-size .* 16 to 2048"):
        TrainOptions(image_size=size)
    with pytest.raises(CnnkitError, match=r"--image-size .* 2048"):
        ExtractOptions(image_size=size)


@pytest.mark.parametrize("command", ["extract", "train", "finetune"])
def test_an_image_size_over_2048_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, command):
    from typer.testing import CliRunner

    from cnnkit.cli import app

    data = make_class_tree(tmp_path / "data", {"a": 3, "b": 3})
    result = CliRunner().invoke(app, [command, str(data), "--image-size", "5000", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--image-size" in result.output and "2048" in result.output
    assert not (tmp_path / "run").exists()


def test_asking_whether_a_forged_feature_head_is_mirror_symmetric_names_its_unknown_backbone(runs, tmp_path):
    # Run.mirror_symmetric (how many TTA views) looks the backbone up in the registry, never imports a name.
    import shutil

    from cnnkit.runs import seal_of_fields

    copy = tmp_path / "forged"
    shutil.copytree(runs["extract"], copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["model"].update(backbone="os.system", flip=True)
    data["seal"] = seal_of_fields(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CnnkitError, match="os.system") as refused:
        load_run(copy).mirror_symmetric
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(strategy="rm -rf /"), "strategy"),  # a strategy is one of the table's cells
    (lambda m: m["model"].update(kind="pickle"), "model"),  # a kind no cnnkit module registered
    (lambda m: m["model"]["tried"].append({"layers": "top", "head": "logreg", "cv_accuracy": "0.9"}), "cv_accuracy"),
    (lambda m: m["model"]["tried"].append({"layers": "top", "head": "logreg", "code": "import os"}), "code"),
])
def test_a_forged_strategy_kind_or_tried_row_is_refused_in_one_line(runs, tmp_path, edit, field):
    """The typed fields of this stop (strategy, the kind's section, the search's rows) read as strictly as the rest."""
    import shutil

    from cnnkit.runs import seal_of_fields

    copy = tmp_path / "forged"
    shutil.copytree(runs["extract"], copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    data["seal"] = seal_of_fields(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CnnkitError, match=rf"field '[a-z_.0-9]*{field}[^']*'") as refused:
        load_run(copy)
    assert "\n" not in str(refused.value)

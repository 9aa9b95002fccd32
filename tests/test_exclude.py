"""`--exclude FILE`: files left out of the data by a doctor's issues.csv or a list, the folder untouched."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.data import load_dataset, load_excluding, read_exclusions
from cnnkit.errors import CnnkitError
from conftest import make_class_tree

runner = CliRunner()
TINY = ["--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32"]


@pytest.fixture
def data(tmp_path):
    return make_class_tree(tmp_path / "data", {"red": 6, "green": 6})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_issues_csv_takes_only_the_rows_marked_exclude(data, tmp_path):
    issues = tmp_path / "issues.csv"
    issues.write_text(
        "kind,score,action,path,other,given,suggested,split,detail\n"
        f"duplicate,1.0,exclude,{data / 'red/000.png'},{data / 'red/001.png'},red,,train,\n"
        f'mislabel,0.9,review,{data / "green/002.png"},,green,red,train,"a ""detail"", with commas"\n'
        f"foreign,0.8,EXCLUDE,{data / 'green/003.png'},,green,,train,\n", encoding="utf-8")
    assert read_exclusions(issues) == {(data / "red/000.png").resolve(), (data / "green/003.png").resolve()}


def test_a_csv_without_an_action_column_takes_every_row(data, tmp_path):
    listed = tmp_path / "bad.csv"
    listed.write_text(f"path,label\n{data / 'red/000.png'},red\n{data / 'red/001.png'},red\n")
    assert read_exclusions(listed) == {(data / "red/000.png").resolve(), (data / "red/001.png").resolve()}


def test_plain_list_skips_comments_and_blank_lines_and_resolves_relative_paths_both_ways(data, tmp_path,
                                                                                         monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    listed = lists / "left_out.txt"
    # red/000.png exists from the current folder (data); beside.png only from the list's own folder.
    (lists / "beside.png").write_bytes(b"")
    listed.write_text("# the blurry ones\n\nred/000.png\n   \n# beside the list:\nbeside.png\n"
                      f"{data / 'green/001.png'}\n")
    monkeypatch.chdir(data)
    assert read_exclusions(listed) == {(data / "red/000.png").resolve(), (lists / "beside.png").resolve(),
                                       (data / "green/001.png").resolve()}


def test_excluding_one_copy_of_a_duplicate_keeps_the_other(data, tmp_path):
    copy = data / "red" / "copy.png"
    copy.write_bytes((data / "red" / "000.png").read_bytes())
    listed = tmp_path / "list.txt"
    listed.write_text(f"{copy}\n{tmp_path / 'not_in_data.png'}\n")
    dataset = load_excluding(data, listed)
    paths = {s.path for s in dataset.samples}
    assert copy not in paths and data / "red" / "000.png" in paths
    assert dataset.excluded == [copy] and dataset.unmatched == 1
    assert len(dataset.samples) == len(load_dataset(data).samples) - 1


def test_exclusions_matching_nothing_in_data_are_refused(data, tmp_path):
    with pytest.raises(CnnkitError, match="none of its 2 paths is in"):
        load_dataset(data, exclude={tmp_path / "a.png", tmp_path / "b.png"})


@pytest.mark.parametrize("content, message", [
    (None, "--exclude {file}: no such file"),
    (b"\xff\xfe\x00not utf-8", "--exclude {file}: not UTF-8"),
    (b"kind,action,file\nx,exclude,a.png\n", "--exclude {file}:1: a CSV without a 'path' column"),
    (b"# nothing\n\n", "--exclude {file}: no paths"),
    (b"{outside}\n", "--exclude {file}: none of its 1 paths is in"),
])
def test_bad_exclusion_files_are_one_line_errors_naming_the_file(data, tmp_path, content, message):
    file = tmp_path / ("issues.csv" if content and b"action" in content else "list.txt")
    if content is not None:
        file.write_bytes(content.replace(b"{outside}", str(tmp_path / "elsewhere.png").encode()))
    before = _snapshot(data)
    result = runner.invoke(app, ["extract", str(data), "--out", str(tmp_path / "run"), *TINY,
                                 "--exclude", str(file)])
    assert result.exit_code == 2, result.output
    assert message.format(file=file) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output, result.stderr
    assert not (tmp_path / "run").exists() and _snapshot(data) == before


def test_extract_leaves_the_excluded_files_out_and_records_them(data, tmp_path, monkeypatch):
    from cnnkit.runs import load_run

    issues = tmp_path / "issues.csv"
    issues.write_text("kind,score,action,path\n"
                      f"foreign,1,exclude,{data / 'red/002.png'}\n"
                      f"foreign,1,exclude,data/green/004.png\n"  # relative to the current folder
                      f"mislabel,1,review,{data / 'green/000.png'}\n")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(data)
    result = runner.invoke(app, ["extract", str(data), "--out", str(tmp_path / "run"), *TINY, "--cv", "2",
                                 "--val-split", "0", "--exclude", str(issues)])
    assert result.exit_code == 0, result.output
    assert "left out 2 file(s) listed in issues.csv" in result.output
    assert _snapshot(data) == before

    run = load_run(tmp_path / "run")  # excluded.txt is checksummed and sealed like every file
    indexed = {Path(p).resolve() for p in json.loads((run.path / "index" / "paths.json").read_text())}
    left_out = {(data / "red/002.png").resolve(), (data / "green/004.png").resolve()}
    assert len(indexed) == 10 and not indexed & left_out and (data / "green/000.png").resolve() in indexed
    assert run.manifest.data.excluded == 2 and "excluded.txt" in run.manifest.files
    assert {Path(line).resolve() for line in (run.path / "excluded.txt").read_text().splitlines()} == left_out
    assert run.manifest.options["exclude"] == str(issues)
    assert run.manifest.command_line.endswith(f"--exclude {issues}")

    quiet = runner.invoke(app, ["extract", str(data), "--out", str(tmp_path / "run2"), *TINY, "--cv", "2",
                                "--val-split", "0", "--exclude", str(issues), "--json"])
    assert quiet.exit_code == 0, quiet.output
    assert json.loads(quiet.stdout)["excluded"] == 2 and "left out" not in quiet.output


def test_a_run_without_exclusions_records_none(data, tmp_path):
    from cnnkit.extraction import ExtractOptions, run_extract

    result = run_extract(data, ExtractOptions(backbone="tiny_cnn", weights="none", image_size=32, cv=2),
                         tmp_path / "run")
    manifest = json.loads((result.run_path / "manifest.json").read_text())
    assert manifest["data"]["excluded"] == 0 and manifest["options"]["exclude"] is None
    assert not (result.run_path / "excluded.txt").exists()


def test_train_leaves_the_excluded_files_out(tmp_path):
    from cnnkit.runs import load_run
    from cnnkit.training import TrainOptions, run_training

    data = make_class_tree(tmp_path / "data", {"a": 8, "b": 8}, size=32)
    listed = tmp_path / "list.txt"
    listed.write_text(f"{data / 'a/000.png'}\n{data / 'b/007.png'}\n")
    said = []
    options = TrainOptions(mode="train", backbone="tiny_cnn", weights="none", freeze="none", image_size=32, epochs=1,
                           head_epochs=0, batch_size=4, val_split=0.25, exclude=str(listed))
    result = run_training(data, options, tmp_path / "run", say=said.append)
    run = load_run(result.run_path)
    assert sum(result.counts.values()) == 14 and run.manifest.data.excluded == 2
    assert (run.path / "excluded.txt").read_text().splitlines() == [str(data / "a/000.png"), str(data / "b/007.png")]
    assert "left out 2 file(s) listed in list.txt" in said
    assert run.manifest.command_line.endswith(f"--exclude {listed}")

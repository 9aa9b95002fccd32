"""`cnnkit label-next`: typical picks to start, the run's doubts after, never an image labelled already."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.errors import CnnkitError
from cnnkit.labelling import CSV_HEADER, copy_picks, label_next
from conftest import make_class_tree, write_bad_files

runner = CliRunner()
POOL_CLASSES = {"red": 6, "green": 6, "blue": 6}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """18 images of three colour classes, nested one folder deep (the pool keeps no labels)."""
    return make_class_tree(tmp_path_factory.mktemp("pool") / "pool", POOL_CLASSES, size=24)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(labelled data, an extract run on it): the same three classes, other images than the pool's."""
    from tiny_runs import extract_run

    root = tmp_path_factory.mktemp("labelled")
    data = make_class_tree(root / "data", {"red": 4, "green": 4, "blue": 4}, size=32)
    return data, extract_run(data, root / "run", cv=2)


def class_of(path: Path) -> str:
    return Path(path).parent.name


def test_cold_start_picks_typical_images_one_per_cluster(pool):
    found = label_next(pool, 3)
    assert found.rule == "typical" and "no run" in found.reason
    assert len(found.picks) == 3 and len({p.path for p in found.picks}) == 3
    assert sorted(class_of(p.path) for p in found.picks) == ["blue", "green", "red"]  # one per colour cluster
    assert all("typical of cluster" in p.why and p.guess is None for p in found.picks)
    assert [p.score for p in found.picks] == sorted((p.score for p in found.picks), reverse=True)
    assert found.pool == found.candidates == 18


def test_labelled_images_are_excluded_by_content_and_duplicates_picked_once(pool, tmp_path):
    labelled = tmp_path / "labelled"
    (labelled / "red").mkdir(parents=True)
    (labelled / "blue").mkdir(parents=True)
    copies = sorted((pool / "red").glob("*.png"))[:3]
    for i, source in enumerate(copies):  # renamed copies: only their content says they are labelled
        shutil.copyfile(source, labelled / "red" / f"copy-{i}.png")
    shutil.copyfile(sorted((pool / "blue").glob("*.png"))[0], labelled / "blue" / "b.png")
    copied_pool = tmp_path / "pool"
    shutil.copytree(pool, copied_pool)
    shutil.copyfile(copied_pool / "green" / "000.png", copied_pool / "green" / "again.png")  # an exact duplicate

    found = label_next(copied_pool, 14, labeled=labelled)
    assert found.already_labelled == 4 and found.duplicates == 1 and found.candidates == 14
    picked = {p.path.name for p in found.picks}
    assert not {p.name for p in copies} & {p.path.name for p in found.picks if class_of(p.path) == "red"}
    assert not ({"000.png", "again.png"} <= {p.path.name for p in found.picks if class_of(p.path) == "green"})
    assert len(picked) <= 14
    with pytest.raises(CnnkitError, match=r"-n 15: .* only 14 image\(s\) left .*4 already labelled, 1 duplicates"):
        label_next(copied_pool, 15, labeled=labelled)


def test_with_a_run_the_least_sure_images_come_first(pool, tiny_run):
    data, run = tiny_run
    found = label_next(pool, 4, model=run)
    assert found.rule == "margin" and found.class_names == ["blue", "green", "red"]
    assert len({p.path for p in found.picks}) == 4
    assert all(p.why.startswith(("the run is unsure: ", "the centre of a region of ")) and " vs " in p.why
               for p in found.picks)
    assert all(p.guess in found.class_names and 0 < p.confidence <= 1 for p in found.picks)
    assert [p.score for p in found.picks] == sorted((p.score for p in found.picks), reverse=True)
    # The same run with the typical rule forced: still the run's guesses beside the picks.
    forced = label_next(pool, 3, model=run, rule="typical")
    assert forced.rule == "typical" and all(p.guess for p in forced.picks)


def test_margin_picks_the_centres_of_doubtful_regions_not_their_most_doubtful_images():
    """Two doubtful groups and a sure one: one pick per doubtful group, the image at its centre, not the
    group's most doubtful image at its edge (the ambiguous images no label makes learnable)."""
    import numpy as np
    from types import SimpleNamespace

    from cnnkit.labelling import margin_picks

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vectors = np.concatenate([c + rng.normal(0, 0.5, (40, 2)) for c in centres]).astype(np.float32)
    doubt = np.r_[np.full(40, 0.8), np.full(40, 0.8), np.full(40, 0.02)]
    edge = int(np.argmax(np.linalg.norm(vectors[:40] - centres[0], axis=1)))
    doubt[edge] = 1.0  # the first group's most doubtful image sits at its edge
    top = 0.5 + (1 - doubt) / 2  # two classes: margin = 2 top - 1 = 1 - doubt
    probabilities = np.stack([top, 1 - top], axis=1).astype(np.float32)
    paths = [Path(f"{i:03d}.png") for i in range(len(vectors))]

    picks = margin_picks(SimpleNamespace(vectors=vectors), paths, 2, probabilities, ["a", "b"], seed=0)
    rows = sorted(int(p.path.stem) for p in picks)
    assert rows[0] < 40 <= rows[1] < 80 and edge not in rows  # one per doubtful group, never the edge
    for row, centre in zip(rows, centres):  # and central: nearer the centre than most of its group
        group = vectors[(row // 40) * 40:(row // 40 + 1) * 40]
        assert np.linalg.norm(vectors[row] - centre) < np.median(np.linalg.norm(group - centre, axis=1)) / 2
    assert all(re.fullmatch(r"the centre of a region of \d+ images \(the run's mean doubt there: 0\.\d\d\); "
                            r"here a 0\.\d\d vs b 0\.\d\d", p.why) for p in picks), [p.why for p in picks]
    assert [round(p.score, 2) for p in picks] == [0.8, 0.8]


def test_a_run_whose_classes_are_not_the_labelled_datas_is_refused(pool, tiny_run, tmp_path):
    _, run = tiny_run
    other = make_class_tree(tmp_path / "other", {"cat": 2, "dog": 2})
    with pytest.raises(CnnkitError, match=r"--model .*its classes \(blue, green, red\) are not those of --labeled"):
        label_next(pool, 2, model=run, labeled=other)


@pytest.mark.parametrize("case", ["empty", "unreadable", "too many", "missing", "margin without run"])
def test_bad_input_is_one_line_and_exit_2(case, pool, tmp_path):
    args = ["label-next", str(pool), "-n", "2"]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        args[1], expected = str(tmp_path / "empty"), "holds no image files"
    elif case == "unreadable":
        write_bad_files(tmp_path / "bad")
        args[1:4], expected = [str(tmp_path / "bad"), "-n", "1"], "can be read"  # one passes the header check
    elif case == "too many":
        args[3], expected = "19", "-n 19: "
    elif case == "missing":
        args[1], expected = str(tmp_path / "nowhere"), "no such folder"
    else:
        args += ["--rule", "margin"]
        expected = "needs a trained run"
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.output
    assert "Traceback" not in result.output


def test_cli_json_out_and_copy_to(pool, tiny_run, tmp_path):
    _, run = tiny_run
    result = runner.invoke(app, ["label-next", str(pool), "-n", "3", "--model", str(run), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 3 and set(rows[0]) >= {"path", "score", "why", "guess", "confidence"}

    out, sorted_dir = tmp_path / "out", tmp_path / "labels" / "unsorted"
    result = runner.invoke(app, ["label-next", str(pool), "-n", "3", "--model", str(run), "--out", str(out),
                                 "--copy-to", str(sorted_dir)])
    assert result.exit_code == 0, result.output
    assert "rule: margin" in result.output and "copied 3 image(s)" in result.output
    with (out / "to_label.csv").open(newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == CSV_HEADER and len(table) == 4 and all(row[4] for row in table[1:])
    page = (out / "report.html").read_text("utf-8")
    assert page.count("data:image/png;base64,") == 3 and "guess:" in page and "http" not in page.split("</style>")[1]
    assert len(list(sorted_dir.iterdir())) == 3 and all((pool / class_of(Path(r[1])) / Path(r[1]).name).exists()
                                                         for r in table[1:])  # copied, not moved
    # A second round into the same folders: our own files are replaced, the copies kept.
    assert runner.invoke(app, ["label-next", str(pool), "-n", "3", "--out", str(out)]).exit_code == 0


def test_out_and_copy_to_never_overwrite_what_is_not_theirs(pool, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "to_label.csv").write_text("my own notes\n")
    result = runner.invoke(app, ["label-next", str(pool), "-n", "2", "--out", str(out)])
    assert result.exit_code == 2 and "not written by label-next" in result.output
    assert (out / "to_label.csv").read_text() == "my own notes\n"

    found = label_next(pool, 2)
    target = tmp_path / "unsorted"
    target.mkdir()
    (target / found.picks[1].path.name).write_bytes(b"someone else's file")
    with pytest.raises(CnnkitError, match="exists there and is another file"):
        copy_picks(found.picks, target)
    assert sorted(p.name for p in target.iterdir()) == [found.picks[1].path.name]  # nothing copied at all
    assert (target / found.picks[1].path.name).read_bytes() == b"someone else's file"


def test_same_names_from_different_folders_are_copied_side_by_side(pool, tmp_path):
    found = label_next(pool, 3)
    copied = copy_picks(found.picks, tmp_path / "unsorted")
    assert len({p.name for p in copied}) == 3 and all(p.is_file() for p in copied)
    again = copy_picks(found.picks, tmp_path / "unsorted")  # the same content already there: kept, no error
    assert again == copied


def test_an_ensembles_probabilities_come_from_its_members_cached_features(pool, tiny_run, tmp_path):
    """The same numbers as the ensemble's own classifier, which decodes and runs every member each time."""
    from cnnkit.ensemble import make_ensemble
    from cnnkit.labelling import run_probabilities
    from cnnkit.runs import load_run
    from tiny_runs import extract_run

    data, run = tiny_run
    other = extract_run(data, tmp_path / "knn", head="knn", cv=2)
    ensemble = load_run(make_ensemble([run, other], tmp_path / "ens", weights=[2, 1]))
    paths = sorted(pool.rglob("*.png"))
    expected = ensemble.classifier().predict_files(paths).probabilities
    assert abs(run_probabilities(ensemble, paths) - expected).max() < 1e-5
    found = label_next(pool, 2, model=ensemble.path)
    assert found.rule == "margin" and all(p.guess for p in found.picks)


@pytest.mark.parametrize("args, code", [(["label-next", "--help"], 0), (["label-next", "pool", "-n", "0"], 2),
                                        (["label-next", "nowhere", "-n", "3"], 2)])
def test_help_usage_errors_and_a_missing_pool_do_not_import_tensorflow(args, code):
    import subprocess
    import sys

    check = ("import sys\nfrom cnnkit.cli import app\ntry:\n    app(sys.argv[1:], standalone_mode=True)\n"
             "except SystemExit as exit:\n    code = exit.code\n"
             "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED', code, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", check, *args], capture_output=True, text=True, timeout=60)
    assert f"TF_NOT_LOADED {code}" in result.stderr, result.stderr


def test_a_runs_training_images_are_left_out_without_labeled(pool, tiny_run, tmp_path):
    data, run = tiny_run
    mixed = tmp_path / "pool"
    shutil.copytree(pool, mixed / "new")
    shutil.copytree(data, mixed / "old")  # the run's own training images, under other paths
    found = label_next(mixed, 18, model=run)
    assert found.already_labelled == 12 and found.candidates == 18
    assert f"the run's training data {data}" in found.labelled_from or str(data.resolve()) in found.labelled_from
    assert not any("old" in p.path.parts for p in found.picks)

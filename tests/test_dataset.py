import pytest

from cnnkit.data import find_images, load_dataset, stratified_split
from cnnkit.errors import CnnkitError
from conftest import make_class_tree, write_bad_files, write_odd_good_files


def test_folder_per_class(class_tree):
    dataset = load_dataset(class_tree)
    assert dataset.class_names == ["cat", "dog"]
    assert list(dataset.splits) == ["train"]
    summary = dataset.summary()
    assert summary.counts == {"cat": 6, "dog": 4}
    assert summary.min == 4 and summary.max == 6 and summary.imbalance == 1.5


def test_train_val_test_layout(tmp_path):
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        make_class_tree(tmp_path / split, {"a": n, "b": n})
    dataset = load_dataset(tmp_path)
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 10, "val": 4, "test": 6}


def test_val_class_missing_from_train_is_an_error(tmp_path):
    make_class_tree(tmp_path / "train", {"a": 2})
    make_class_tree(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(CnnkitError, match="zebra"):
        load_dataset(tmp_path)


def test_csv_with_relative_paths_and_header(class_tree):
    rows = ["path,label"] + [f"{p.parent.name}/{p.name},{p.parent.name}"
                             for p in sorted(class_tree.rglob("*.png"))]
    csv_file = class_tree / "labels.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    dataset = load_dataset(csv_file)
    assert dataset.summary().counts == {"cat": 6, "dog": 4}


def test_bad_files_are_skipped_and_named(class_tree):
    bad = write_bad_files(class_tree / "cat")
    dataset = load_dataset(class_tree)
    skipped = {s.path.name for s in dataset.skipped}
    # Truncated files pass the header check; they are dropped when decoded.
    assert skipped == set(bad) - {"truncated.jpg"}
    assert dataset.summary().counts["cat"] == 6 + 1


def test_strict_makes_bad_files_an_error(class_tree):
    write_bad_files(class_tree / "dog")
    with pytest.raises(CnnkitError, match="--strict"):
        load_dataset(class_tree, strict=True)


def test_odd_but_readable_files_are_kept(tmp_path):
    names = write_odd_good_files(tmp_path / "data" / "x")
    write_odd_good_files(tmp_path / "data" / "y")
    dataset = load_dataset(tmp_path / "data")
    assert not dataset.skipped
    assert dataset.summary().counts == {"x": len(names), "y": len(names)}


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such file"),
    (lambda p: (p.mkdir(), p)[1], "no class folders"),
])
def test_missing_or_empty_source(tmp_path, make, message):
    with pytest.raises(CnnkitError, match=message):
        load_dataset(make(tmp_path / "nothing"))


def test_stratified_split_is_seeded_and_keeps_every_class(tmp_path):
    dataset = load_dataset(make_class_tree(tmp_path / "d", {"a": 10, "b": 5, "c": 1}))
    train, val = stratified_split(dataset.samples, 0.2, seed=3)
    again = stratified_split(dataset.samples, 0.2, seed=3)
    assert (train, val) == again
    assert sorted(s.label for s in val) == [0, 0, 1]
    assert {s.label for s in train} == {0, 1, 2}
    assert not set(train) & set(val)


def test_find_images_expands_folders_globs_and_reports_misses(tmp_path, class_tree):
    paths, problems = find_images([class_tree / "cat", str(class_tree / "dog" / "00*.png"),
                                   tmp_path / "missing.jpg"])
    assert len(paths) == 10
    assert [p.reason for p in problems] == ["no such file"]

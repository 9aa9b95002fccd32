"""Prediction and feature extraction on a local two-node Ray cluster, one worker killed mid-run each time."""

from __future__ import annotations

import builtins
import csv
import json
import os
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from conftest import make_class_tree, write_bad_files

pytestmark = pytest.mark.cluster
runner = CliRunner()
TINY = ["--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32"]
PRINT = builtins.print  # Ray Data must not replace it in the caller's process (cnnkit.cluster.connect)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head and a second node on 127.0.0.1, one CPU each: two workers, as on two machines.

    The nodes' processes take their environment from here: the session's cache, TensorFlow as
    ``auto`` (as ``conftest`` sets for the tests) and the fault injection's marker file (a worker
    kills itself once while the marker is absent).
    """
    # Every address on 127.0.0.1 (Ray's single-machine mode; read when Ray is imported).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="needs the cluster extra: "
                                            "pip install -e '.[cluster]'")
    marker = tmp_path_factory.mktemp("kill") / "killed"
    env = {"CNNKIT_HOME": str(tmp_path_factory.getbasetemp() / "cnnkit_home"), "CNNKIT_ENGINE": "tf",
           "CNNKIT_CLUSTER_KILL_ONCE": str(marker), "RAY_BACKEND_LOG_LEVEL": "fatal",
           "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    ray_cluster = ray_cluster_utils.Cluster(initialize_head=True,
                                            head_node_args={**node, "include_dashboard": False})
    try:
        ray_cluster.add_node(**node)
        ray_cluster.wait_for_nodes()
        yield ray_cluster.address, marker
    finally:
        ray_cluster.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _rows(table) -> list[dict]:
    with open(table, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_on_two_workers_equals_one_process_with_a_worker_killed(cluster, tmp_path):
    from tiny_runs import make_data, train_run

    address, marker = cluster
    data = make_data(tmp_path / "data")
    run = train_run(data, tmp_path / "run")
    write_bad_files(data / "test" / "broken")  # empty, truncated and fake images: rows with an error
    marker.unlink(missing_ok=True)

    result = runner.invoke(app, ["predict", str(data), "--model", str(run), "--cluster", address,
                                 "--workers", "2", "--out", str(tmp_path / "out"), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert marker.exists()  # a worker died with a block computed and not returned; Ray redid it
    summary = json.loads(result.stdout)
    local = runner.invoke(app, ["predict", str(data), "--model", str(run), "-k", "3", "--json"])
    expected = {p["path"]: p["top"] for p in json.loads(local.stdout)}

    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pylist()
    from cnnkit.data import find_images

    paths = [str(p) for p in find_images([data])[0]]
    assert [r["path"] for r in rows] == paths  # every file once, in input order: none lost, none twice
    assert summary["rows"] == len(paths) and summary["errors"] == 3 and summary["workers"] == 2
    errors = {os.path.basename(r["path"]): r["error"] for r in rows if r["error"]}
    assert set(errors) == {"empty.png", "truncated.jpg", "fake.png"} and "empty file" in errors["empty.png"]
    assert set(expected) == set(paths) - {r["path"] for r in rows if r["error"]}
    for row in rows:
        if row["error"]:
            assert row["label_1"] == "" and np.isnan(row["probability_1"])
            continue
        top = expected[row["path"]]
        assert [row[f"label_{i + 1}"] for i in range(3)] == [t["label"] for t in top]
        np.testing.assert_allclose([row[f"probability_{i + 1}"] for i in range(3)], [t["score"] for t in top],
                                   atol=1e-5)
    as_csv = _rows(tmp_path / "out" / "predictions.csv")  # the same table
    assert [r["path"] for r in as_csv] == paths
    assert all(c["label_1"] == r["label_1"] and c["error"] == r["error"] for c, r in zip(as_csv, rows))
    assert builtins.print is PRINT


def test_features_from_the_cluster_merge_into_the_cache(cluster, tmp_path, monkeypatch):
    from cnnkit.features import FeatureCache, FeatureConfig, FeatureExtractor, file_hash

    address, marker = cluster
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "home"))  # this test's cache, read and written here only
    data = make_class_tree(tmp_path / "data", {"a": 10, "b": 10, "c": 10}, size=32)
    marker.unlink(missing_ok=True)
    common = [str(data), "--layer", "conv3,top", "--cv", "3", "--json", *TINY]

    on_cluster = runner.invoke(app, ["extract", *common, "--out", str(tmp_path / "r1"), "--head", "logreg",
                                     "--cluster", address, "--workers", "2"])
    assert on_cluster.exit_code == 0, on_cluster.output
    assert marker.exists()
    assert json.loads(on_cluster.stdout)["computed"] == 30
    again = runner.invoke(app, ["extract", *common, "--out", str(tmp_path / "r2"), "--head", "knn"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["computed"] == 0  # every feature came from the cache

    # The cache holds one row per image, equal to this process's own forward pass.
    config = FeatureConfig("tiny_cnn", "none", 32)
    hashes, arrays = FeatureCache(config).load()
    paths = sorted(data.rglob("*.png"))
    assert sorted(hashes) == sorted(file_hash(p) for p in paths)
    local, kept, _ = FeatureExtractor(config, "tf").extract(paths)
    row = {h: i for i, h in enumerate(hashes)}
    order = [row[file_hash(p)] for p in paths]
    for stage, values in local.items():
        np.testing.assert_allclose(arrays[stage][order], values, atol=1e-5)


def test_without_the_extra_the_flag_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = runner.invoke(app, ["predict", str(tmp_path), "--model", str(tmp_path), "--cluster", "local",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --cluster needs Ray: pip install 'cnnkit[cluster]'"]


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:1", "--cluster 127.0.0.1:1: nothing answers there"),
    ("nowhere", "--cluster nowhere: give local, auto, HOST:PORT or ray://HOST:PORT"),
])
def test_a_bad_address_is_one_line(class_tree, tmp_path, address, message):
    pytest.importorskip("ray", reason="needs the cluster extra")
    result = runner.invoke(app, ["extract", str(class_tree), *TINY, "--cluster", address,
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr

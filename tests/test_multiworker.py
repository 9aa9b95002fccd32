"""Training across several processes with TF_CONFIG: two real workers on 127.0.0.1, each its own process.

Select these with ``-m multiworker`` (or leave them out with ``-m "not multiworker"``).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.runs import load_run
from cnnkit.training import preset, run_training
from conftest import REPO, make_class_tree

pytestmark = pytest.mark.multiworker

# Nothing random but the initialisation and the data order, which are seeded:
# two workers and one process then see the same images in the same steps.
TRAIN_FLAGS = ["--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32", "--batch-size", "8",
               "--lr", "0.05", "--augment", "none", "--erase", "0", "--dropout", "0", "--val-split", "0.25",
               "--deterministic", "--patience", "1000", "--plateau-patience", "0"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class Worker:
    """A `cnnkit` process and the files its output goes to (files, not pipes: nobody blocks on a full pipe)."""

    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def output(self) -> tuple[str, str]:
        return self.stdout.read_text(errors="replace"), self.stderr.read_text(errors="replace")


def _start_workers(logs: Path, *arguments: str, each=lambda index: []) -> list[Worker]:
    """Two `cnnkit` processes, workers 0 and 1 of a TF_CONFIG cluster on 127.0.0.1.

    They get the same ``arguments``, then ``each(index)``; their output goes to ``logs``.
    """
    logs.mkdir(exist_ok=True)
    ports = _free_ports(2)
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                     "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2",
               "PYTHONPATH": str(REPO)}
        stdout, stderr = (logs / f"worker-{index}-{time.monotonic_ns()}.{name}" for name in ("out", "err"))
        with stdout.open("w") as out, stderr.open("w") as err:
            process = subprocess.Popen([sys.executable, "-m", "cnnkit", *arguments, *each(index)], env=env,
                                       cwd=REPO, stdout=out, stderr=err)
        workers.append(Worker(process, stdout, stderr))
    return workers


def _finish(workers: list[Worker], timeout: float = 240) -> list[tuple[int, str, str]]:
    """Wait for every worker; (exit code, stdout, stderr) of each."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in workers:
                other.process.kill()
            raise AssertionError(f"a worker hung: {worker.output()[1][-3000:]}") from None
    return [(worker.process.returncode, *worker.output()) for worker in workers]


@pytest.fixture
def data(tmp_path):
    # 24 images: 18 train (two global batches of 8 and a short one of 2), 6 validation.
    return make_class_tree(tmp_path / "data", {"a": 12, "b": 12}, size=32)


def test_two_workers_train_as_one_process_with_the_same_global_batch(data, tmp_path):
    out = tmp_path / "run"
    results = _finish(_start_workers(tmp_path / "logs", "train", str(data), "--out", str(out), "--epochs", "3",
                                     *TRAIN_FLAGS, "--json"))
    for code, stdout, stderr in results:
        assert code == 0, stderr[-3000:]
        # Nothing from TensorFlow reaches the user (the eager collective's overhead warning was one).
        assert "WARNING" not in stderr and "tensorflow" not in stderr.lower(), stderr[-3000:]
    chief, helper = (json.loads(stdout) for _, stdout, _ in results)
    assert chief["run"] == str(out) and helper["run"] is None
    assert chief["weights_digest"] == helper["weights_digest"]  # the same final weights on both workers

    # Only the chief's run exists; the helper's checkpoints and temporary run are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "logs", "run"]
    run = load_run(out)
    assert run.manifest.options["batch_size"] == 8
    predicted = CliRunner().invoke(app, ["predict", str(data / "a"), "--model", str(out), "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert len(json.loads(predicted.stdout)) == 12

    # One process, the same global batch: the same training within float summation order.
    options = preset("train", backbone="tiny_cnn", weights="none", image_size=32, epochs=3, batch_size=8, lr=0.05,
                     augment="none", erase=0.0, dropout=0.0, val_split=0.25, deterministic=True, patience=1000,
                     plateau_patience=0)
    single = run_training(data, options, tmp_path / "single")
    assert chief["best_epoch"] == single.metrics["best_epoch"]
    two = _history(out)
    np.testing.assert_allclose(two["loss"], single.history["loss"], rtol=1e-3)
    np.testing.assert_allclose(two["val_loss"], single.history["val_loss"], rtol=1e-3)
    np.testing.assert_allclose(two["val_accuracy"], single.history["val_accuracy"])
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((data / "b").iterdir())])
    np.testing.assert_allclose(load_run(out).classifier()(images), load_run(single.run_path).classifier()(images),
                               atol=1e-3)


def _error_line(stderr: str) -> str:
    """cnnkit's one error line (TensorFlow may log its own shutdown after it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _history(run_path):
    from cnnkit.training.loop import read_history

    return read_history(run_path / "history.csv")


def _wait_for_epoch(worker: Worker, epoch: int, timeout: float = 180) -> None:
    """Wait until a worker has reported ``epoch`` on stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.process.poll() is None:
        if f"epoch {epoch:>3}" in worker.output()[1]:
            return
        time.sleep(0.1)
    raise AssertionError(f"worker never reported epoch {epoch}:\n{worker.output()[1][-3000:]}")


@pytest.mark.parametrize("killed", [1, 0], ids=["helper-killed", "chief-killed"])
def test_a_dead_worker_stops_the_other_with_a_clear_error_and_all_resume(data, tmp_path, killed):
    out = tmp_path / "run"
    workers = _start_workers(tmp_path / "logs", "train", str(data), "--out", str(out), "--epochs", "5", *TRAIN_FLAGS)
    # Killed once its second epoch is reported (hence checkpointed), while the other is in the third.
    _wait_for_epoch(workers[killed], 2)
    workers[killed].process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor = workers[1 - killed]
    code, _, stderr = _finish([survivor], timeout=120)[0]
    waited = time.monotonic() - killed_at
    workers[killed].process.wait()
    assert code == 2, stderr[-3000:]
    assert waited < 60, waited
    last = _error_line(stderr)
    assert last.startswith("error: training across 2 workers stopped: a worker failed or became unreachable"), last
    assert 'File "' not in last and "{{node" not in last  # TensorFlow's message, not its traceback
    assert f"--resume {out}" in " ".join(stderr.split())

    if killed == 1:
        return
    # Every worker started again with --resume continues from its last checkpoint to the end
    # (shown once, with the chief killed, as it is the one whose run is written).
    results = _finish(_start_workers(tmp_path / "logs", "train", str(data), "--resume", str(out), "--quiet"))
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    history = _history(out)
    assert history["epoch"] == [0, 1, 2, 3, 4]
    assert load_run(out).manifest.model.epochs_run == 5


def test_workers_that_see_different_data_stop_at_the_start_with_one_line(data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data, other)
    (other / "a" / "000.png").unlink()  # one image fewer: the workers would run different numbers of steps
    workers = _start_workers(tmp_path / "logs", "train", "--out", str(tmp_path / "run"), "--epochs", "2", *TRAIN_FLAGS,
                             each=lambda index: [str(data if index == 0 else other)])
    for code, _, stderr in _finish(workers, timeout=180):
        assert code == 2, (code, stderr[-3000:])
        assert _error_line(stderr).startswith("error: the 2 workers see different data; give every worker the same "
                                              "DATA and options"), stderr[-1000:]
    assert not (tmp_path / "run").exists()

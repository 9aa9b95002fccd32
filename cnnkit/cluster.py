"""Prediction and feature extraction over many images on a Ray cluster (``pip install 'cnnkit[cluster]'``).

cnnkit grows no scheduler of its own: Ray Data splits the list of files into
blocks and feeds them to a pool of actors (``map_batches`` with an actor pool),
one per worker, each of which loads the run or the feature network once. Why
Ray and not Beam or Spark, with the measurements: ``docs/scale.md``.

- **The run reaches every worker by value**: its files travel through Ray's
  object store and each worker loads them with ``load_run``, so the seal and
  every checksum are verified there as everywhere, and no worker needs the
  run on a shared disk. The images must be readable by every worker at the
  path given (a shared file system).
- **One answer per file, in input order**: a worker returns a row for every
  file of its block, with an ``error`` for an unreadable one, never a failed
  job. Ray Data commits a block's rows only when its task returns, restarts
  a killed actor and resubmits its unfinished block, so a dead worker loses
  and duplicates nothing (``tests/test_cluster.py`` kills one mid-run).
- **Features go through the feature cache as a local run's do**: within
  ``on_cluster`` the forward passes of ``compute_features`` (extract, doctor,
  label-next, advise) run on the cluster, while hashing, the cache lookup and
  the locked merge (``FeatureCache.add``) stay in this process: the cache
  file is the one a local run writes, and a later run on the same images
  computes nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data import ImageStream, SkippedFile
from cnnkit.errors import CnnkitError

INSTALL = "pip install 'cnnkit[cluster]'"
# Files per Ray block: the unit that is scheduled, and redone when a worker dies. A few batches, so
# each call decodes ahead (ImageStream's threads) and a restart costs little.
BLOCK_BATCHES = 4
# Fault injection for tests and drills: a worker whose environment names this file creates it and
# kills itself (SIGKILL) with its second block computed but not returned -- once per cluster.
KILL_ONCE = "CNNKIT_CLUSTER_KILL_ONCE"


def import_ray(loopback: bool = False):
    """``ray`` and ``ray.data``, or one line saying how to install them.

    Args:
        loopback: keep every Ray address on 127.0.0.1 (a cluster on this machine only: Ray would
            otherwise advertise the address of the machine's network interface). Read at Ray's import.
    """
    if loopback and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's single-machine mode
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CnnkitError(f"--cluster needs Ray: {INSTALL}") from None
    return ray


@contextmanager
def connect(address: str = "local", workers: int | None = None) -> Iterator[int]:
    """Join a Ray cluster for the block; yields how many workers to use.

    Args:
        address: ``local`` (start Ray on this machine, on 127.0.0.1, with ``workers`` CPUs), ``auto``
            (the cluster this machine joined with ``ray start``), ``HOST:PORT`` (a head's address) or
            ``ray://HOST:10001`` (Ray Client). An already connected process keeps its connection.
        workers: actors in the pool; by default one per node (one for ``local``).
    """
    ray = import_ray(loopback=address == "local")
    if workers is not None and workers < 1:
        raise CnnkitError(f"--workers {workers}: give at least 1")
    # Ray reports usage statistics to its authors unless told not to: a cluster cnnkit starts or joins
    # sends nothing anywhere but to its own nodes.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Data's progress bars would replace builtins.print in this process for good (tqdm_ray); the
    # caller's print stays its own (a loader's refusal named Ray's function after a cluster run).
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
    if not os.environ.get("CNNKIT_DEBUG"):
        # Ray's C++ side logs to stderr (e.g. that Ray Data's actors have arguments in the object store);
        # commands print only cnnkit's own lines. Read when ray.init starts the driver's core worker.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # Ray prints the raylet's error messages (a worker died, and is restarted) on stdout: keep them off
    # stdout, which holds --json output.
    with contextlib.redirect_stdout(sys.stderr), contextlib.ExitStack() as stack:
        if not ray.is_initialized():
            quiet = dict(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
            try:
                if address == "local":
                    ray.init(num_cpus=workers or os.cpu_count() or 1, _node_ip_address="127.0.0.1", **quiet)
                else:
                    check_reachable(address)
                    ray.init(address=address, **quiet)
            except (ConnectionError, ValueError, RuntimeError, TimeoutError) as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise CnnkitError(f"--cluster {address}: cannot connect ({reason}); start a head with "
                                  "`ray start --head` and pass its address, or use --cluster local") from None
            stack.callback(ray.shutdown)
        import logging

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True  # rows come back in input order
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        # One worker per node: each runs its engine on all the node's cores (on this 2-core machine two
        # workers made 124 images/s together, one 164: docs/scale.md).
        yield workers or (1 if address == "local" else max(len(alive), 1))


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One line now for a ``HOST:PORT`` or ``ray://HOST:PORT`` nobody answers (``ray.init`` retries for minutes)."""
    import socket

    if address == "auto":
        return  # ray.init finds the local node's cluster, or says at once that there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise CnnkitError(f"--cluster {address}: give local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise CnnkitError(f"--cluster {address}: nothing answers there ({error.strerror or error}); start a head "
                          "with `ray start --head` and pass the address it prints, or use --cluster local") from None


def _path_blocks(paths: Sequence[Path | str], rows: int):
    """A Ray dataset of ``{"index", "path"}`` rows, ``rows`` files per block."""
    import pyarrow as pa
    import ray.data

    table = pa.table({"index": pa.array(np.arange(len(paths), dtype=np.int64)),
                      "path": pa.array([str(p) for p in paths], pa.string())})
    return ray.data.from_arrow([table.slice(start, rows) for start in range(0, len(paths), rows)])


def _map(dataset, worker_class, workers: int, rows: int, **kwargs):
    """``map_batches`` on a pool of ``workers`` actors, one block per call (Ray Data spreads them over the nodes).

    Ray Data restarts a dead actor and retries its unfinished tasks without limit by default
    (``max_restarts=-1``, ``max_task_retries=-1``); a block's output is used only once its task returned.
    """
    import ray.data

    return dataset.map_batches(worker_class, fn_constructor_kwargs=kwargs, batch_size=rows, batch_format="numpy",
                               compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)


def block_rows(files: int, workers: int, batch_size: int) -> int:
    """Files per block: ``BLOCK_BATCHES`` batches, fewer when that would leave workers idle (4 blocks each)."""
    return max(1, min(BLOCK_BATCHES * batch_size, -(-files // (4 * workers))))


def _maybe_die(calls: int) -> None:
    marker = os.environ.get(KILL_ONCE)
    if not marker or calls < 2:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _errors(paths: Sequence[str], stream: ImageStream) -> list[str]:
    reasons = {str(f.path): f.reason for f in stream.failures}
    return [reasons.get(p, "") for p in paths]


# --- prediction ------------------------------------------------------------------------------------------


def pack_run(path: str | Path) -> dict[str, bytes]:
    """Every file of a run folder, by relative path: what ``_Predictor`` rebuilds the run from."""
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def unpack_run(files: dict[str, bytes], folder: Path) -> Path:
    """Write ``pack_run``'s files under ``folder/run`` (names checked: inside the folder) and return it."""
    root = folder / "run"
    for name, data in files.items():
        target = (root / name).resolve()
        if not target.is_relative_to(root.resolve()):
            raise CnnkitError(f"run file {name!r} points outside the run")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


class _Predictor:
    """A Ray actor: the run loaded once (checked), then blocks of files -> top-k rows."""

    def __init__(self, run_files, k: int, batch_size: int, engine: str, precision: str):
        from cnnkit.runs import load_run

        if not isinstance(run_files, dict):  # an ObjectRef: one copy in the object store for every worker
            import ray

            run_files = ray.get(run_files)
        self.folder = tempfile.TemporaryDirectory(prefix="cnnkit-run-")
        run = load_run(unpack_run(run_files, Path(self.folder.name)))
        self.classifier = run.classifier(engine, precision)
        self.class_names, self.k, self.batch_size, self.calls = run.class_names, k, batch_size, 0

    def __call__(self, batch: dict) -> dict:
        from cnnkit.predict import top_k

        self.calls += 1
        paths = [str(p) for p in batch["path"]]
        c = self.classifier
        stream = ImageStream(paths, c.image_size, c.crop_pct)
        outputs, kept = stream.map_batches(c.batch, self.batch_size)
        k = min(self.k, len(self.class_names))
        labels = np.full((len(paths), k), "", dtype=object)
        scores = np.full((len(paths), k), np.nan)
        if outputs:
            tops = top_k(np.concatenate([o[0] for o in outputs]), self.class_names, k)
            for row, top in zip(kept, tops):
                labels[row] = [label for label, _ in top]
                scores[row] = [score for _, score in top]
        columns = {"path": np.array(paths, dtype=object)}
        for j in range(k):
            columns[f"label_{j + 1}"], columns[f"probability_{j + 1}"] = labels[:, j], scores[:, j]
        columns["error"] = np.array(_errors(paths, stream), dtype=object)
        _maybe_die(self.calls)
        return columns


@dataclass
class ClusterPrediction:
    """What ``predict_on_cluster`` wrote.

    Attributes:
        tables: the CSV and Parquet files (same rows: path, label_i/probability_i for i = 1..k, error).
        rows: files in the table (every input file, readable or not).
        errors: rows with an error.
        seconds: wall time from connecting to the written tables.
        workers: actors in the pool.
        problems: inputs that matched no file (not in the table).
    """

    tables: list[Path]
    rows: int
    errors: int
    seconds: float
    workers: int
    problems: list[SkippedFile] = field(default_factory=list)


def read_file_list(path: str | Path) -> list[Path]:
    """The image paths of a text file, one per line (blank lines and ``#`` comments ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CnnkitError(f"--files {path}: cannot read it ({getattr(error, 'strerror', None) or error}); "
                          "give a text file of image paths, one per line") from None
    return [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def predict_on_cluster(inputs: Sequence[str | Path], run_path: str | Path, out: str | Path, k: int = 5,
                       batch_size: int = 32, address: str = "local", workers: int | None = None,
                       engine: str = "auto", precision: str = "float32", files: str | Path | None = None,
                       progress: Callable[[int, int], None] | None = None) -> ClusterPrediction:
    """Classify image files with a run on a Ray cluster; write ``out/predictions.csv`` and ``.parquet``.

    Each row is what ``predict_run`` gives for that file (the same top-k, probabilities equal to
    float32 rounding), in input order; an unreadable file is a row with ``error`` set.

    Args:
        inputs: files, folders or glob patterns (``find_images``), read here.
        files: a text file of image paths, one per line, added after ``inputs``.
        address, workers: the cluster (``connect``).
    """
    from cnnkit.data import find_images
    from cnnkit.runs import load_run

    import_ray()
    run = load_run(run_path)  # one line here for a bad run, before any worker starts
    paths, problems = find_images(list(inputs)) if inputs else ([], [])
    if files is not None:
        paths += read_file_list(files)
    if not paths:
        raise CnnkitError("no image files to predict: give folders, files or --files LIST")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with connect(address, workers) as pool:
        import ray

        rows = block_rows(len(paths), pool, batch_size)
        result = _map(_path_blocks(paths, rows), _Predictor, pool, rows, run_files=ray.put(pack_run(run.path)),
                      k=k, batch_size=batch_size, engine=str(engine), precision=str(precision))
        written, errors = _write_tables(result.iter_batches(batch_size=None, batch_format="pyarrow"), out,
                                        len(paths), progress)
    if written != len(paths):  # preserve_order and the retries make this impossible; say so if it happens
        raise CnnkitError(f"the cluster returned {written} rows for {len(paths)} files; nothing was written")
    return ClusterPrediction([out / "predictions.csv", out / "predictions.parquet"], written, errors,
                             time.perf_counter() - started, pool, problems)


def _write_tables(batches, out: Path, total: int, progress) -> tuple[int, int]:
    """Stream pyarrow batches into CSV and Parquet files, each published by one ``os.replace``."""
    import pyarrow.csv as csv
    import pyarrow.parquet as pq

    temporary = {name: out / f".{name}.tmp" for name in ("predictions.csv", "predictions.parquet")}
    written = errors = 0
    csv_writer = parquet_writer = None
    try:
        for table in batches:
            if csv_writer is None:
                csv_writer = csv.CSVWriter(temporary["predictions.csv"], table.schema)
                parquet_writer = pq.ParquetWriter(temporary["predictions.parquet"], table.schema)
            csv_writer.write_table(table)
            parquet_writer.write_table(table)
            written += table.num_rows
            errors += sum(1 for e in table.column("error").to_pylist() if e)
            if progress:
                progress(written, total)
    except BaseException:
        for path in temporary.values():  # a failed job leaves no half-written table
            path.unlink(missing_ok=True)
        raise
    finally:
        for writer in (csv_writer, parquet_writer):
            if writer is not None:
                writer.close()
    for name, path in temporary.items():
        os.replace(path, out / name)
    return written, errors


# --- features --------------------------------------------------------------------------------------------


class _Featurizer:
    """A Ray actor: the feature network built once, then blocks of files -> pooled stage features."""

    def __init__(self, config, engine: str, stages: list[str], batch_size: int):
        from cnnkit.features import FeatureExtractor

        self.extractor = FeatureExtractor(config, engine)
        self.stages, self.batch_size, self.calls = stages, batch_size, 0

    def __call__(self, batch: dict) -> dict:
        self.calls += 1
        paths = [str(p) for p in batch["path"]]
        stream = ImageStream(paths, self.extractor.config.image_size, crop_pct=1.0)
        outputs, kept = stream.map_batches(self.extractor, self.batch_size)
        ok = np.zeros(len(paths), bool)
        ok[kept] = True
        columns = {"index": np.asarray(batch["index"]), "ok": ok,
                   "error": np.array(_errors(paths, stream), dtype=object)}
        for s in self.stages:
            rows = np.concatenate([o[s] for o in outputs]) if outputs else np.zeros((0, 0), np.float32)
            full = np.zeros((len(paths), rows.shape[1] if len(rows) else 0), np.float32)
            full[kept] = rows
            columns[f"stage_{s}"] = full
        _maybe_die(self.calls)
        return columns


class ClusterExtractor:
    """``FeatureExtractor``'s interface (``stages``, ``extract``, ``extract_stages``) with the forward
    passes on the cluster ``connect`` joined; what ``on_cluster`` hands ``compute_features``."""

    def __init__(self, config, engine: str = "auto", workers: int = 1):
        from cnnkit.backbones import get_backbone
        from cnnkit.engines import check_engine

        self.config = config.resolved()
        self.engine = check_engine(engine, self.config.precision)
        self.stages = [s for s in get_backbone(self.config.backbone).layer_choices if s != "top"]
        self.workers = workers

    def extract(self, paths: Sequence[Path], batch_size: int = 32, progress=None):
        return self.extract_stages(paths, self.stages, batch_size, progress)

    def extract_stages(self, paths: Sequence[Path], stages: Sequence[str], batch_size: int = 32,
                       progress=None) -> tuple[dict[str, np.ndarray], np.ndarray, list[SkippedFile]]:
        """(features, kept, failures) as ``FeatureExtractor.extract_stages`` returns them."""
        if not paths:
            return {s: np.zeros((0, 0), np.float32) for s in stages}, np.zeros(0, np.int64), []
        rows = block_rows(len(paths), self.workers, batch_size)
        result = _map(_path_blocks(paths, rows), _Featurizer, self.workers, rows, config=self.config,
                      engine=str(self.engine), stages=list(stages), batch_size=batch_size)
        parts: dict[str, list[np.ndarray]] = {s: [] for s in stages}
        kept, failures, done = [], [], 0
        if progress:
            progress(0, len(paths))
        for batch in result.iter_batches(batch_size=None, batch_format="numpy"):
            ok = np.asarray(batch["ok"], bool)
            kept.append(np.asarray(batch["index"], np.int64)[ok])
            for s in stages:
                parts[s].append(np.asarray(batch[f"stage_{s}"], np.float32)[ok])
            failures += [SkippedFile(Path(paths[int(i)]), str(e))
                         for i, e, good in zip(batch["index"], batch["error"], ok) if not good]
            done += len(ok)
            if progress:
                progress(done, len(paths))
        kept_rows = np.concatenate(kept) if kept else np.zeros(0, np.int64)
        if done != len(paths) or len(np.unique(kept_rows)) != len(kept_rows):
            raise CnnkitError(f"the cluster returned {done} rows for {len(paths)} files; nothing was cached")
        if not len(kept_rows):
            return {s: np.zeros((0, 0), np.float32) for s in stages}, kept_rows, failures
        return {s: np.concatenate(parts[s]) for s in stages}, kept_rows, failures


@contextmanager
def on_cluster(address: str = "local", workers: int | None = None):
    """Within the block, every forward pass of ``compute_features`` runs on the cluster (see the module doc)."""
    from cnnkit.features import extracting_with

    with connect(address, workers) as pool, \
            extracting_with(lambda config, engine: ClusterExtractor(config, engine, pool)):
        yield pool

"""What every command shares: consoles, option types, error handling.

This package is the only place that prints. TensorFlow is never imported at
module level here: ``cnnkit --help`` and usage errors must stay fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cnnkit.backbones import DEFAULT_BACKBONE, list_backbones
from cnnkit.choices import Choice
from cnnkit.errors import CnnkitError
from cnnkit.options import Engine, Precision

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# The registry's names as a fixed choice, so `--help` lists them.
Backbone = Choice("Backbone", {spec.name: spec.name for spec in list_backbones()})
DEFAULT = Backbone(DEFAULT_BACKBONE)

BackboneOption = Annotated[
    Backbone, typer.Option("--backbone", "-b", metavar="NAME",
                           help=f"Backbone: {', '.join(b.value for b in Backbone)} (see `cnnkit backbones`).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
EngineOption = Annotated[Engine, typer.Option(
    "--engine", help="What runs the network: TensorFlow, ONNX Runtime, OpenVINO, or auto (the fastest usable "
                     "one, measured once per network and machine; $CNNKIT_ENGINE fixes it). Every engine gives "
                     "the same answers.")]
PrecisionOption = Annotated[Precision, typer.Option(
    "--precision", help="Arithmetic of the network: float32 (the same answers on every engine and export), or "
                        "bfloat16 (OpenVINO on CPUs with AMX or AVX-512-BF16: about 2x faster, changes some "
                        "predictions).")]
ExcludeOption = Annotated[str | None, typer.Option(
    "--exclude", metavar="FILE", show_default=False,
    help="Leave out the files listed in FILE: an issues.csv of `cnnkit doctor` (its rows marked exclude) or one "
         "path per line. The folder is not touched; the run records what was left out.")]
TTAOption = Annotated[bool, typer.Option(
    "--tta", help="Test-time augmentation. With --model or a RUN: average the views the run chose on its own "
    "held-out images when it was made (mirror, zoom: whole image + centre and corner crops at 90%, or both), or "
    "none where none helped; a note says which. Without --model: 12 views (87.5% crops, mirrored). Up to 12x "
    "slower.")]

ClusterOption = Annotated[str | None, typer.Option(
    "--cluster", metavar="ADDRESS", show_default=False,
    help="Run the forward passes on a Ray cluster (pip install 'cnnkit[cluster]'): 'local' (Ray on this machine), "
         "'auto' (the cluster this machine joined with `ray start`), HOST:PORT of a head, or ray://HOST:10001.")]
WorkersOption = Annotated[int | None, typer.Option(
    "--workers", min=1, show_default=False,
    help="With --cluster: workers, each loading the model once (default: one per node; 'local' is one node).")]


@contextlib.contextmanager
def features_on(cluster: str | None, workers: int | None):
    """With ``--cluster``, every feature computed within the block runs on that cluster (``cnnkit.cluster``)."""
    if cluster is None:
        if workers is not None:
            usage_error("--workers goes with --cluster ADDRESS")
        yield
        return
    from cnnkit.cluster import on_cluster

    with on_cluster(cluster, workers):
        yield


def usage_error(message: str) -> None:
    """One red line on stderr and exit code 2, for flags that do not go together."""
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


def quiet_output() -> None:
    """Keep the libraries' log lines and warnings off the terminal; cnnkit's own notes print as one line each.

    - TensorFlow logs oneDNN and CPU-feature notices from C++ while it is imported, before its
      log level applies, so the process's stderr is pointed at a temporary file while it is
      imported (replayed only if the import fails); later C++ lines (``failed call to cuInit``
      on a machine with an NVIDIA driver and no usable GPU) are held back by
      ``TF_CPP_MIN_LOG_LEVEL=3`` unless the user set it; its Python logger keeps errors only.
      Nothing is imported here: a hook on the import system does this the moment something
      first imports TensorFlow, so a command that never needs it never pays its start-up time.
    - Python warnings of the libraries go to the ``py.warnings`` logger, which prints nothing
      unless ``CNNKIT_DEBUG`` is set.
    - The ``cnnkit`` logger (an engine's fallback, ``cnnkit.engines.note``) prints ``note: ...``.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    debug = bool(os.environ.get("CNNKIT_DEBUG"))
    logging.captureWarnings(not debug)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.propagate = debug
    if not warnings_log.handlers:
        warnings_log.addHandler(logging.NullHandler())
    notes = logging.getLogger("cnnkit")
    if not any(isinstance(h, _NoteHandler) for h in notes.handlers):
        notes.addHandler(_NoteHandler())
        notes.propagate = False
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowFinder())


class _NoteHandler(logging.Handler):
    """Prints each record of the ``cnnkit`` logger as one yellow ``note:`` line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"[yellow]note:[/yellow] {escape(record.getMessage())}", soft_wrap=True)


class _QuietTensorFlowFinder:
    """Finds ``tensorflow`` as usual and wraps its loader in ``_QuietLoader``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        import tempfile

        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
                if not os.environ.get("CNNKIT_DEBUG"):
                    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing, deprecation notices
            except BaseException:
                os.dup2(saved, 2)
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))
                raise
            finally:
                os.dup2(saved, 2)
                os.close(saved)

    def __getattr__(self, name):  # is_package, get_resource_reader, ...: the real loader's
        return getattr(self.loader, name)


def warn(message: str) -> None:
    # Messages carry file names: escaped, a name like "[/b].png" prints as itself.
    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def report_skipped(skipped, quiet: bool = False) -> None:
    """One warning line per unreadable file, then a count."""
    for item in skipped:
        warn(f"{item.path}: {item.reason} (skipped)")
    if skipped and not quiet:
        warn(f"{len(skipped)} file(s) skipped")


def progress_line(row) -> str:
    """One line for a finished training epoch (a dict) or a scored (layers, head) candidate (a ``TriedRow``)."""
    if isinstance(row, dict):
        return (f"[dim]{row['phase']:>8}[/dim] epoch {row['epoch']:>3}  loss {row.get('loss', 0):.4f}  "
                f"acc {row.get('accuracy', 0):.3f}  val_loss {row.get('val_loss', 0):.4f}  "
                f"[bold]val_acc {row.get('val_accuracy', 0):.3f}[/bold]  lr {row.get('learning_rate', 0):.2g}  "
                f"{row['seconds']:.0f}s  {row['images_per_s']:.0f} img/s")
    score = f"cv accuracy {row.cv_accuracy:.3f}" if row.cv_accuracy is not None else escape(row.error or "-")
    return f"tried {escape(row.layers)} + {row.head}: {score}"


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def user_errors():
    """A CnnkitError becomes one red line and exit code 2, an OSError one line and 1, Ctrl-C 130."""
    try:
        yield
    except CnnkitError as error:
        err_console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        raise typer.Exit(code=130) from None
    except OSError as error:  # a full disk, a folder we may not write: the job failed, say where
        where = f"{error.filename}: " if error.filename else ""
        err_console.print(f"[red]error:[/red] {escape(where + (error.strerror or str(error)))}", soft_wrap=True)
        raise typer.Exit(code=1) from None


@contextlib.contextmanager
def progress_bar(quiet: bool):
    """A Rich progress bar on stderr with images/s and ETA (disabled when quiet).

    It appears only once work starts (``progress_callback``'s first call), so a
    command that fails early prints its one error line and nothing else.
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
        TimeRemainingColumn(), console=err_console, disable=quiet,
    )
    try:
        yield progress
    finally:
        if progress.live.is_started:
            progress.stop()


def progress_callback(progress, description: str):
    """A library progress function ``(done, total)`` that drives a Rich task."""
    import time

    state: dict = {}

    def update(done: int, total: int) -> None:
        # The task and its clock start at the library's first call, after the
        # model is built, so a bad flag never leaves an empty bar behind.
        if not state:
            if not progress.live.is_started and not progress.disable:
                progress.start()
            state["task"] = progress.add_task(description, total=total, rate="")
            state["start"] = time.perf_counter()
        elapsed = time.perf_counter() - state["start"]
        rate = f"{done / elapsed:,.1f} img/s" if elapsed > 0 and done else ""
        progress.update(state["task"], completed=done, total=total, rate=rate)

    return update

"""What every command shares: consoles, option types, error handling.

This package is the only place that prints. TensorFlow is never imported at
module level here: ``cnnkit --help`` and usage errors must stay fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cnnkit.backbones import DEFAULT_BACKBONE, list_backbones
from cnnkit.choices import Choice
from cnnkit.errors import CnnkitError

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
TTAOption = Annotated[bool, typer.Option(
    "--tta", help="Test-time augmentation: average the probabilities of 12 views per image (whole image + "
    "centre and four corner crops at 87.5%, each also mirrored); 12x slower.")]


def quiet_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up chatter kept off the terminal.

    TensorFlow logs oneDNN and CPU-feature notices from C++ before its log
    level applies, so the process's stderr is pointed at a temporary file
    during the import; the file is replayed only if the import fails.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "tensorflow" in sys.modules:
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
            import keras  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def warn(message: str) -> None:
    # Messages carry file names: escaped, a name like "[/b].png" prints as itself.
    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def report_skipped(skipped, quiet: bool = False) -> None:
    """One warning line per unreadable file, then a count."""
    for item in skipped:
        warn(f"{item.path}: {item.reason} (skipped)")
    if skipped and not quiet:
        warn(f"{len(skipped)} file(s) skipped")


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


def progress_bar(quiet: bool):
    """A Rich progress bar on stderr with images/s and ETA (disabled when quiet)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
        TimeRemainingColumn(), console=err_console, disable=quiet,
    )


def progress_callback(progress, description: str):
    """A library progress function ``(done, total)`` that drives a Rich task."""
    import time

    state: dict = {}

    def update(done: int, total: int) -> None:
        # The task and its clock start at the library's first call, after the
        # model is built, so a bad flag never leaves an empty bar behind.
        if not state:
            state["task"] = progress.add_task(description, total=total, rate="")
            state["start"] = time.perf_counter()
        elapsed = time.perf_counter() - state["start"]
        rate = f"{done / elapsed:,.1f} img/s" if elapsed > 0 and done else ""
        progress.update(state["task"], completed=done, total=total, rate=rate)

    return update

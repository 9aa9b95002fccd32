"""The ``cnnkit`` command: one module per verb, each a thin layer over the library."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape
from typer.core import TyperGroup

from cnnkit.cli import (advise, backbones, doctor, ensemble, evaluate, explain, export, extract, finetune, info,
                        label_next, predict, similar)
from cnnkit.cli._common import err_console


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad flag value, a missing argument) as one red line naming the flag, exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            err_console.print("[red]interrupted[/red]")
            sys.exit(130)
        except typer.TyperException as error:  # click's usage errors, as Typer exports them
            path = error.ctx.command_path if getattr(error, "ctx", None) else "cnnkit"
            message = error.format_message() if hasattr(error, "format_message") else str(error)
            err_console.print(f"[red]error:[/red] {escape(message)} (see '{path} --help')", soft_wrap=True)
            sys.exit(getattr(error, "exit_code", 2))
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/red]")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="cnnkit",
    cls=_OneLineErrors,
    help="Transfer learning for image classification: pretrained CNN features, "
    "fine-tuning and training, with the strategy picked from your data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
for module in (advise, info, backbones, predict, explain, extract, finetune, evaluate, similar, ensemble, export,
               label_next, doctor):
    module.register(app)


def main() -> None:
    """Console-script entry point (``cnnkit``, ``python -m cnnkit``)."""
    try:
        app()
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            _exit_now(done.code or 0)
        raise


def _exit_now(code: int) -> None:
    """Leave the process without the interpreter's teardown, when that is safe; else return.

    Freeing scikit-learn's, SciPy's and matplotlib's modules one object at a time
    at exit costs ~0.4 s, a sixth of a cached `extract` rerun, and buys nothing:
    the command has finished and every file it wrote is closed (cnnkit writes
    with ``with`` / ``Path.write_*`` and publishes runs by rename). What a normal
    exit would still do is kept: the ``atexit`` handlers run, and stdout and
    stderr are flushed. A normal exit is taken instead while another non-daemon
    thread runs (Python would wait for it), under a profiler, tracer or debugger
    (they write their results at exit), or when flushing fails (a closed pipe:
    Python's own handling then applies).
    """
    import atexit
    import contextlib
    import os
    import threading

    if (sys.gettrace() or sys.getprofile() or not hasattr(atexit, "_run_exitfuncs")
            or any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate())):
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    atexit._run_exitfuncs()
    with contextlib.suppress(OSError, ValueError):  # what a handler printed; the pipe was fine just now
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)

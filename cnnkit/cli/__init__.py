"""The ``cnnkit`` command: one module per verb, each a thin layer over the library."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape
from typer.core import TyperGroup

from cnnkit.cli import advise, backbones, ensemble, evaluate, explain, export, extract, finetune, info, predict, similar
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
for module in (advise, info, backbones, predict, explain, extract, finetune, evaluate, similar, ensemble, export):
    module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()

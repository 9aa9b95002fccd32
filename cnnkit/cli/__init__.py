"""The ``cnnkit`` command: one module per verb, each a thin layer over the library."""

from __future__ import annotations

import typer

from cnnkit.cli import advise, backbones, evaluate, extract, finetune, info, predict, similar

app = typer.Typer(
    name="cnnkit",
    help="Transfer learning for image classification: pretrained CNN features, "
    "fine-tuning and training, with the strategy picked from your data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
for module in (advise, info, backbones, predict, extract, finetune, evaluate, similar):
    module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()

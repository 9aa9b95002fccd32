"""`cnnkit backbones`: the registry, with input sizes, parameters, stages and weights."""

from __future__ import annotations

from typing import Annotated

import typer

from cnnkit.cli._common import JsonOption, console, print_json, quiet_output, user_errors


def backbones(
    name: Annotated[str | None, typer.Argument(help="Show one backbone only.", show_default=False)] = None,
    prepare: Annotated[bool, typer.Option("--prepare", help="Convert and cache the offline EfficientNet-Lite weights now.")] = False,
    json_output: JsonOption = False,
) -> None:
    """List the backbones: input size, parameters, stages conv1..conv5 with feature dims, weights."""
    quiet_output()
    with user_errors():
        from cnnkit.backbones.describe import describe_backbones

        rows = describe_backbones([name] if name else None, prepare=prepare)
    if json_output:
        print_json(rows)
        return
    from rich.table import Table

    table = Table()
    for column in ("backbone", "input", "params", "stages (channels)", "preprocess", "weights"):
        table.add_column(column)
    for row in rows:
        stages = " ".join(f"{stage}:{dim}" for stage, dim in row["stages"].items())
        weights = "[green]on disk[/green]" if row["weights_on_disk"] else (
            "[dim]none[/dim]" if not row["pretrained"] else "[yellow]download[/yellow]")
        table.add_row(row["name"], str(row["input_size"]), f"{row['params'] / 1e6:.1f}M", stages,
                      row["preprocessing"], weights)
    console.print(table)
    console.print("[dim]weights: 'on disk' works offline; 'download' needs internet once "
                  "(Keras cache) or --weights FILE.[/dim]")


def register(app) -> None:
    app.command()(backbones)

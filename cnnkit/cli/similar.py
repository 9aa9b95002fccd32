"""`cnnkit similar RUN IMAGE`: the nearest training images by feature."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.options import Engine, Precision

from cnnkit.cli._common import (EngineOption, JsonOption, PrecisionOption, console, print_json, quiet_output,
                                user_errors)


def similar(
    run: Annotated[Path, typer.Argument(help="A run folder.", show_default=False)],
    image: Annotated[Path, typer.Argument(help="The query image.", show_default=False)],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="How many neighbours.")] = 5,
    engine: EngineOption = Engine.auto,
    precision: PrecisionOption = Precision.float32,
    json_output: JsonOption = False,
) -> None:
    """List the training images most similar to IMAGE (cosine similarity of the run's features)."""
    quiet_output()
    from cnnkit.similarity import similar_images

    with user_errors():
        neighbours = similar_images(run, image, k, engine, precision)
    if json_output:
        print_json([n.__dict__ for n in neighbours])
        return
    from rich.table import Table

    table = Table(title=escape(f"nearest to {image}"))
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("class")
    table.add_column("image", overflow="fold")
    for rank, n in enumerate(neighbours, start=1):
        table.add_row(str(rank), f"{n.score:.3f}", escape(n.label), escape(n.path))
    console.print(table)


def register(app) -> None:
    app.command()(similar)

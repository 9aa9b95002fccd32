"""`cnnkit ensemble RUN RUN... --out RUN`: a run that averages other runs' probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.cli._common import (JsonOption, QuietOption, console, print_json, progress_bar, progress_callback,
                                quiet_output, user_errors)


def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run folders with the same classes.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The ensemble run to write.")] = Path("runs/ensemble"),
    weights: Annotated[str | None, typer.Option("--weights", "-w", help="One positive weight per run, e.g. 2,1 (default: equal).")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Labelled images to score the ensemble on (their test split if any); shown in its report.")] = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it is an existing run.")] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Combine runs into one that averages their class probabilities (members are copied into it)."""
    if data is not None:
        quiet_output()
    from cnnkit.ensemble import make_ensemble, parse_weights

    with user_errors(), progress_bar(quiet or json_output) as progress:
        written = make_ensemble(runs, out, parse_weights(weights, len(runs)), force, data=data,
                                progress=progress_callback(progress, "scoring"))
    from cnnkit.runs import read_manifest

    accuracy = read_manifest(written).metrics.get("data_accuracy")
    if json_output:
        print_json({"run": str(written), "members": [str(r) for r in runs], "data_accuracy": accuracy})
        return
    if quiet:
        return
    if accuracy is not None:
        console.print(f"accuracy on {escape(str(data))}: [bold green]{accuracy:.3f}[/bold green]")
    console.print(escape(f"ensemble of {len(runs)} runs written to {written} (report: {written / 'report.html'})"))


def register(app) -> None:
    app.command()(ensemble)

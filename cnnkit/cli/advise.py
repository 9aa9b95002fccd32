"""`cnnkit advise DATA` and `cnnkit auto DATA`: pick the strategy by measurement, and run it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.options import Engine

from cnnkit.cli._common import (DEFAULT, BackboneOption, EngineOption, ExcludeOption, JsonOption, QuietOption,
                                console, err_console, print_json, progress_line, quiet_output, user_errors)

Data = Annotated[Path, typer.Argument(help="Folder of class subfolders (optionally train/ val/ test/), or a CSV of path,label.", show_default=False)]
LittleData = Annotated[int | None, typer.Option(help="Override: images per class below which data is 'little'.")]
Shift = Annotated[float | None, typer.Option(help="Override: domain-shift score above which the domain is 'different'.")]
Confidence = Annotated[float | None, typer.Option(help="Override: ImageNet top-1 confidence below which the domain is 'different'.")]
Budget = Annotated[float, typer.Option(min=1.0, help="Minutes the whole job should take; sets the training epochs.")]


def _thresholds(little_data, shift, confidence):
    from dataclasses import replace

    from cnnkit.advise import Thresholds

    changes = {k: v for k, v in (("little_data", little_data), ("shift", shift), ("confidence", confidence))
               if v is not None}
    return replace(Thresholds(), **changes)


def _print_advice(advice, ran: bool = False) -> None:
    from rich.table import Table

    table = Table(title="measurements", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    ipc = advice.images_per_class
    table.add_row("images per class", f"min {ipc['min']:g}, median {ipc['median']:g} "
                  f"({ipc['classes']:g} classes, {ipc['total']:g} images)")
    table.add_row("image side (median)", f"{advice.image_side:g} px")
    shift = advice.similarity.get("shift", {})
    if shift:
        table.add_row("domain shift", f"{shift['mean']:.3f}  (" + ", ".join(
            f"{k} {v:.2f}" for k, v in shift.items() if k != "mean") + ")")
    confidence = advice.similarity.get("imagenet_classifier")
    if confidence:
        table.add_row("ImageNet top-1 confidence", f"{confidence['top1']:.3f}")
    for stage, accuracy in advice.probes.items():
        table.add_row(f"linear probe {stage}", f"{accuracy:.3f}")
    console.print(table)
    console.print(f"cell: [bold]{advice.cell['data']} data, {advice.cell['domain']} domain[/bold] -> "
                  f"strategy [bold green]{advice.strategy}[/bold green]")
    for reason in advice.reasons:
        console.print(f"  - {escape(reason)}")
    console.print(f"{'ran' if ran else 'run'}: [bold]{escape(advice.plan.command_line)}[/bold]", soft_wrap=True)


def advise(
    data: Data,
    backbone: BackboneOption = DEFAULT,
    per_class: Annotated[int, typer.Option(min=2, help="Images per class in the measurement sample.")] = 20,
    budget: Budget = 10.0,
    little_data: LittleData = None,
    shift: Shift = None,
    confidence: Confidence = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
    engine: EngineOption = Engine.auto,
    json_output: JsonOption = False,
) -> None:
    """Measure data size and similarity to ImageNet, pick the table's cell, say why and what to run."""
    quiet_output()
    from cnnkit.advise import advise as measure

    with user_errors():
        advice = measure(data, str(backbone), per_class, thresholds=_thresholds(little_data, shift, confidence),
                         seed=seed, budget_minutes=budget, engine=engine)
    if json_output:
        print_json(advice.to_dict())
    else:
        _print_advice(advice)


def auto(
    data: Data,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")] = Path("runs/auto"),
    backbone: BackboneOption = DEFAULT,
    budget: Budget = 10.0,
    little_data: LittleData = None,
    shift: Shift = None,
    confidence: Confidence = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling, splits and training.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace --out if it is an existing run.")] = False,
    exclude: ExcludeOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Advise, run the chosen strategy, evaluate, and write a report of what was measured, tried and chosen."""
    quiet_output()
    from cnnkit.auto import run_auto

    def say(message):
        if not (quiet or json_output):
            err_console.print(f"[cyan]{escape(message)}[/cyan]", soft_wrap=True)

    def warn(message):
        if not json_output:
            err_console.print(f"[yellow]warning: {escape(message)}[/yellow]", soft_wrap=True)

    def report(row):
        if not (quiet or json_output):
            err_console.print(progress_line(row), soft_wrap=True)

    with user_errors():
        result = run_auto(data, out, str(backbone), budget, _thresholds(little_data, shift, confidence), seed,
                          force, say, report, exclude=exclude, warn=warn)
    if json_output:
        print_json({"run": str(result.run_path), "report": str(result.report_path),
                    "strategy": str(result.advice.strategy), "cell": result.advice.cell,
                    "plan": result.plan.to_dict(), "tried": [t.model_dump(exclude_none=True) for t in result.tried], "metrics": result.metrics,
                    "seconds": result.seconds, "checks": result.checks})
        return
    if quiet:
        return
    _print_advice(result.advice, ran=True)
    for key in ("cv_accuracy", "val_accuracy", "test_accuracy"):
        if result.metrics.get(key) is not None:
            console.print(f"{key.replace('_', ' ')}: [bold green]{result.metrics[key]:.3f}[/bold green]")
    console.print(escape(f"model: {result.run_path}   reports: {result.run_path / 'report.html'}, "
                         f"{result.report_path}   ({result.seconds:.0f} s)"))


def register(app) -> None:
    app.command()(advise)
    app.command()(auto)

"""`cnnkit evaluate RUN DATA`: accuracy, per-class report and confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.choices import Choice
from cnnkit.options import Engine, Precision
from cnnkit.cli._common import (BatchSizeOption, EngineOption, JsonOption, PrecisionOption, QuietOption, console,
                                print_json,
                                progress_bar, progress_callback, quiet_output, report_skipped,
                                TTAOption, user_errors)


class Split(Choice):
    train = "train"
    val = "val"
    test = "test"


def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder.", show_default=False)],
    data: Annotated[Path, typer.Argument(help="Labelled images: class folders or a CSV.", show_default=False)],
    split: Annotated[Split | None, typer.Option(help="Which split of DATA (default: test if DATA has it, else all).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write metrics.json, confusion.json/png and report.html (default RUN/eval/<DATA name>).")] = None,
    batch_size: BatchSizeOption = 32,
    engine: EngineOption = Engine.auto,
    precision: PrecisionOption = Precision.float32,
    tta: TTAOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Score a trained run on labelled images and write the confusion matrix."""
    quiet_output()
    from cnnkit.evaluation import evaluate_run
    from cnnkit.reporting import write_evaluation_report
    from cnnkit.runs import load_run

    with user_errors(), progress_bar(quiet or json_output) as progress:
        loaded = load_run(run)
        evaluation = evaluate_run(loaded, data, split and str(split), batch_size,
                                  progress_callback(progress, "evaluating"), engine, tta=True if tta else None,
                                  precision=precision)
        written = write_evaluation_report(evaluation, out or run / "eval" / (data.stem or "data"), loaded)
    report_skipped(evaluation.skipped, quiet)
    result = evaluation.to_dict()
    result["written_to"] = str(written)
    if json_output:
        print_json(result)
        return
    if quiet:
        return
    from rich.table import Table

    table = Table(title=escape(f"{run} on {data}: {result['images']} images"))
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in result["per_class"].items():
        table.add_row(escape(name), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    console.print(table)
    line = f"accuracy [bold green]{result['accuracy']:.3f}[/bold green]"
    if "accuracy_without_tta" in result:
        line += f" with TTA ({result['tta_views']} views), {result['accuracy_without_tta']:.3f} without"
    if "top5_accuracy" in result:
        line += f"   top-5 {result['top5_accuracy']:.3f}"
    console.print(line)
    console.print(escape(f"confusion matrix: {written / 'confusion.png'}, {written / 'confusion.json'}"))
    console.print(escape(f"report: {written / 'report.html'}"))


def register(app) -> None:
    app.command()(evaluate)

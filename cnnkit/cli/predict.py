"""`cnnkit predict IMAGE...`: top-k classes for image files, folders or globs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.options import Engine, Precision

from cnnkit.cli._common import (DEFAULT, BackboneOption, BatchSizeOption, EngineOption, JsonOption, PrecisionOption,
                                QuietOption, console,
                                print_json, progress_bar, progress_callback, quiet_output,
                                report_skipped, TTAOption, user_errors, warn)


def predict(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.", show_default=False)],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="A trained run directory (from extract, finetune, train, ensemble).")] = None,
    backbone: BackboneOption = DEFAULT,
    weights: Annotated[str, typer.Option(help="'imagenet' or a weights file for --backbone.")] = "imagenet",
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes shown per image.")] = 5,
    batch_size: BatchSizeOption = 32,
    engine: EngineOption = Engine.auto,
    precision: PrecisionOption = Precision.float32,
    tta: TTAOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Name what is in each image: the backbone's own ImageNet classifier, or a trained --model."""
    quiet_output()
    with user_errors(), progress_bar(quiet or json_output) as progress:
        update = progress_callback(progress, "predicting")
        from cnnkit.predict import predict_imagenet, predict_run
        from cnnkit.tta import TTA

        views = TTA() if tta else None
        if model is not None:
            report = predict_run(images, model, top_k, batch_size, progress=update, engine=engine, tta=tta or None,
                                 precision=precision)
        else:
            report = predict_imagenet(images, str(backbone), top_k, batch_size, weights, progress=update,
                                      engine=engine, tta=views, precision=precision)
    report_skipped(report.failures, quiet=True)
    if json_output:
        print_json([p.to_dict() for p in report.predictions])
    elif not quiet and report.predictions:
        _print_table(report.predictions, top_k)
    if report.failures and not quiet:
        warn(f"{len(report.failures)} input(s) skipped, {len(report.predictions)} predicted")
    if not report.predictions:
        raise typer.Exit(code=2)


def _print_table(predictions, top_k: int) -> None:
    from rich.table import Table

    table = Table(title=None, show_lines=False)
    table.add_column("image", overflow="fold", min_width=24)
    table.add_column("top-1", style="bold green")
    table.add_column("score", justify="right")
    if top_k > 1:
        table.add_column(f"next {top_k - 1}", style="dim")
    for prediction in predictions:
        (label, score), rest = prediction.top[0], prediction.top[1:]
        row = [escape(str(prediction.path)), escape(label), f"{score:.3f}"]
        if top_k > 1:
            row.append(escape(", ".join(f"{l} {s:.2f}" for l, s in rest)))
        table.add_row(*row)
    console.print(table)


def register(app) -> None:
    app.command()(predict)

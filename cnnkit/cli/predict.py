"""`cnnkit predict IMAGE...`: top-k classes for image files, folders or globs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.options import Engine, Precision

from cnnkit.cli._common import (DEFAULT, BackboneOption, BatchSizeOption, ClusterOption, EngineOption, JsonOption,
                                PrecisionOption, QuietOption, WorkersOption, console, usage_error,
                                print_json, progress_bar, progress_callback, quiet_output,
                                report_skipped, TTAOption, user_errors, warn)


def predict(
    images: Annotated[list[str] | None, typer.Argument(help="Image files, folders or glob patterns.", show_default=False)] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="A trained run directory (from extract, finetune, train, ensemble).")] = None,
    backbone: BackboneOption = DEFAULT,
    weights: Annotated[str, typer.Option(help="'imagenet' or a weights file for --backbone.")] = "imagenet",
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes shown per image.")] = 5,
    batch_size: BatchSizeOption = 32,
    engine: EngineOption = Engine.auto,
    precision: PrecisionOption = Precision.float32,
    tta: TTAOption = False,
    files: Annotated[Path | None, typer.Option("--files", metavar="LIST", show_default=False, help="A text file of image paths, one per line (millions are fine with --cluster).")] = None,
    cluster: ClusterOption = None,
    workers: WorkersOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False, help="With --cluster: the folder for predictions.csv and predictions.parquet (path, label_i, probability_i, error).")] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Name what is in each image: the backbone's own ImageNet classifier, or a trained --model."""
    quiet_output()
    if not images and files is None:
        usage_error("give IMAGE... (files, folders or glob patterns) or --files LIST")
    if cluster is not None:
        return _predict_on_cluster(images or [], model, files, cluster, workers, out, top_k, batch_size, engine,
                                   precision, tta, json_output, quiet)
    if workers is not None or out is not None:
        usage_error(f"{'--workers' if workers is not None else '--out'} goes with --cluster ADDRESS")
    with user_errors(), progress_bar(quiet or json_output) as progress:
        update = progress_callback(progress, "predicting")
        from cnnkit.predict import predict_imagenet, predict_run
        from cnnkit.tta import TTA

        views = TTA() if tta else None
        if files is not None:
            from cnnkit.cluster import read_file_list

            images = [*(images or []), *map(str, read_file_list(files))]
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


def _predict_on_cluster(images, model, files, cluster, workers, out, top_k, batch_size, engine, precision, tta,
                        json_output, quiet) -> None:
    for problem, flag in ((model is None, "--model RUN"), (out is None, "--out DIR")):
        if problem:
            usage_error(f"--cluster needs {flag}")
    if tta:
        usage_error("--tta does not run on --cluster: drop one of them")
    with user_errors(), progress_bar(quiet or json_output) as progress:
        from cnnkit.cluster import predict_on_cluster

        result = predict_on_cluster(images, model, out, top_k, batch_size, cluster, workers, engine, precision,
                                    files, progress=progress_callback(progress, "predicting"))
    report_skipped(result.problems, quiet=True)
    summary = {"tables": [str(t) for t in result.tables], "rows": result.rows, "errors": result.errors,
               "workers": result.workers, "seconds": round(result.seconds, 2)}
    if json_output:
        print_json(summary)
    elif not quiet:
        console.print(f"{result.rows} rows ({result.errors} with an error) by {result.workers} worker(s) in "
                      f"{result.seconds:.1f}s: {escape(str(result.tables[0]))}, {escape(str(result.tables[1]))}",
                      soft_wrap=True)


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

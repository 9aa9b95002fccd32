"""`cnnkit extract DATA`: pretrained features -> PCA -> SVM / k-NN / logistic head."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.cli._common import (Backbone, BackboneOption, BatchSizeOption, ClusterOption, EngineOption, ExcludeOption,
                                JsonOption, PrecisionOption, QuietOption, WorkersOption, console, features_on,
                                print_json, progress_bar, progress_callback, progress_line, quiet_output,
                                report_skipped, user_errors)
from cnnkit.options import MAX_GRID, MAX_IMAGE_SIZE, ExtractOptions, Head, Pool

_D = ExtractOptions()


def extract(
    data: Annotated[Path, typer.Argument(help="Folder of class subfolders (optionally train/ val/ test/), or a CSV of path,label.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")] = Path("runs/extract"),
    backbone: BackboneOption = Backbone(_D.backbone),
    layer: Annotated[str, typer.Option("--layer", "-l", help="Stage(s) to take pooled features from: conv1..conv5, top, a list like conv4,top, or 'auto' (the best of conv3, conv4, top, conv4,top and conv3,conv4,top by cross-validation).")] = _D.layers,
    head: Annotated[Head, typer.Option(help="Classifier: logistic regression, RBF SVM, linear SVM, k-NN, or auto (logreg or svm by cross-validation).")] = _D.head,
    head_param: Annotated[float | None, typer.Option(help="Fix the head's hyper-parameter (C of logreg and the SVMs, k of k-NN) instead of choosing it by cross-validation.")] = _D.head_param,
    pca: Annotated[str, typer.Option(help="PCA components: a number, 'auto' (picked by cross-validation) or 'none'.")] = str(_D.pca),
    whiten: Annotated[bool, typer.Option(help="Whiten the PCA components.")] = _D.whiten,
    l2: Annotated[bool, typer.Option("--l2", help="L2-normalise each feature vector before scaling.")] = _D.l2_normalize,
    pool: Annotated[Pool, typer.Option(help="Global pooling of each stage.")] = _D.pool,
    flip: Annotated[bool, typer.Option(help="Average the features of each image and its mirror image.")] = _D.flip,
    grid: Annotated[int, typer.Option(min=1, max=MAX_GRID, help="Pool every stage but the last over a grid of N x N regions instead of the whole map: keeps where things are, for aligned images (centred objects, scans).")] = _D.grid,
    cv: Annotated[int, typer.Option(min=2, help="Cross-validation folds for the hyper-parameters.")] = _D.cv,
    val_split: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of train held out for validation when DATA has no val/ (0: none).")] = _D.val_split,
    image_size: Annotated[int | None, typer.Option(min=32, max=MAX_IMAGE_SIZE, help="Input size in pixels (default: the backbone's).")] = _D.image_size,
    weights: Annotated[str, typer.Option(help="'imagenet', 'none' or a weights file.")] = _D.weights,
    batch_size: BatchSizeOption = _D.batch_size,
    seed: Annotated[int, typer.Option(help="Seed for the split and cross-validation.")] = _D.seed,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature cache.")] = not _D.use_cache,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable image (exit 2).")] = _D.strict,
    exclude: ExcludeOption = _D.exclude,
    engine: EngineOption = _D.engine,
    precision: PrecisionOption = _D.precision,
    force: Annotated[bool, typer.Option(help="Replace --out if it is an existing run.")] = False,
    cluster: ClusterOption = None,
    workers: WorkersOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Use a pretrained CNN as a fixed feature extractor and fit a classical head on its features."""
    quiet_output()
    from cnnkit.extraction import run_extract

    with user_errors(), progress_bar(quiet or json_output) as progress, features_on(cluster, workers):
        # The flags whose names are not the fields' (--layer, --l2, --no-cache); the rest by name.
        given = {**locals(), "backbone": str(backbone), "layers": layer, "l2_normalize": l2, "use_cache": not no_cache}
        options = ExtractOptions(**{f.name: given[f.name] for f in fields(ExtractOptions)})
        result = run_extract(data, options, out, force, progress=progress_callback(progress, "features"),
                             report=None if quiet or json_output else lambda row: progress.console.print(
                                 progress_line(row), soft_wrap=True))
    report_skipped(result.skipped, quiet)
    if exclude and not (quiet or json_output):
        from cnnkit.data import left_out_line

        console.print(escape(left_out_line(result.dataset, exclude)), soft_wrap=True)
    summary = {
        "run": str(result.run_path), "backbone": str(backbone), "layers": result.layers,
        "feature_dims": result.feature_dims, "head": result.head, "best_params": result.fitted.best_params,
        "images": result.counts, "excluded": len(result.dataset.excluded), "computed": result.computed, "seconds": result.seconds, **result.metrics,
        "tried": [t.model_dump(exclude_none=True) for t in result.tried],
    }
    if json_output:
        print_json(summary)
    elif not quiet:
        _print_summary(summary)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_summary(s: dict) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("features", f"{s['backbone']} {','.join(s['layers'])} ({s['feature_dims']} dims); "
                  f"{s['computed']} image(s) through the network, the rest from cache")
    table.add_row("images", ", ".join(f"{k} {v}" for k, v in s["images"].items()))
    if s["tried"]:
        best = max((t["cv_accuracy"] for t in s["tried"] if t.get("cv_accuracy") is not None), default=None)
        table.add_row("searched", f"{len(s['tried'])} (layers, head) pairs by cross-validation; best {_fmt(best)}")
    table.add_row("head", f"{s['head']} {s['best_params']}")
    table.add_row("cv accuracy", _fmt(s["cv_accuracy"]))
    table.add_row("train accuracy", _fmt(s["train_accuracy"]))
    for name in ("val", "test"):
        if f"{name}_accuracy" in s:
            table.add_row(f"{name} accuracy", f"[bold green]{_fmt(s[f'{name}_accuracy'])}[/bold green]")
    table.add_row("time", f"features {s['seconds']['features']:.1f}s, head {s['seconds']['head']:.1f}s")
    table.add_row("saved", escape(s["run"]))
    console.print(table)


def register(app) -> None:
    app.command()(extract)

"""`cnnkit doctor DATA`: what is wrong with a dataset before it is trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.cli._common import (ClusterOption, WorkersOption, features_on, Backbone, BackboneOption, BatchSizeOption, EngineOption, JsonOption, PrecisionOption,
                                QuietOption, console, print_json, progress_bar, progress_callback,
                                quiet_output, user_errors)
from cnnkit.options import MAX_GRID, MAX_IMAGE_SIZE, Engine, Precision

# DoctorOptions' defaults that --help shows, written out so that `--help` imports no numpy (tests/test_doctor.py
# checks they agree). The thresholds' defaults (None here) are the library's, whatever it settles on.
DEFAULTS = {"backbone": "efficientnet_lite0", "weights": "imagenet", "batch_size": 32, "seed": 0}


def doctor(
    data: Annotated[Path, typer.Argument(
        help="Folder of class subfolders (optionally train/ val/ test/), or a CSV of path,label.",
        show_default=False)],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write issues.csv (for --exclude) and report.html (galleries of the findings) here: a "
                            "new or empty folder, or an earlier doctor output.", show_default=False)] = None,
    backbone: BackboneOption = Backbone(DEFAULTS["backbone"]),
    layers: Annotated[str | None, typer.Option(
        "--layers", "--layer", "-l", help="Stage(s) whose features the label-error check reads: conv1..conv5, top, "
                                          "or a list like conv4,top (default: conv4,top).",
        show_default=False)] = None,
    grid: Annotated[int | None, typer.Option(min=1, max=MAX_GRID, show_default=False,
                                             help="Pool every stage but the last over N x N regions (default: 3).")
                    ] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", show_default=False,
                                              help="Average the features of each image and its mirror image "
                                                   "(default: on).")] = None,
    image_size: Annotated[int | None, typer.Option(min=32, max=MAX_IMAGE_SIZE,
                                                   help="Input size in pixels (default: the backbone's).")] = None,
    weights: Annotated[str, typer.Option(help="'imagenet', 'none' or a weights file.")] = DEFAULTS["weights"],
    folds: Annotated[int | None, typer.Option(min=2, show_default=False,
                                              help="Folds of the out-of-fold probabilities (label errors).")
                     ] = None,
    neighbours: Annotated[int | None, typer.Option(min=1, show_default=False,
                                                   help="Nearest images each image is compared with.")] = None,
    outlier_z: Annotated[float | None, typer.Option(min=0.0, show_default=False,
                                                    help="Flag an image as an outlier from this robust z-score "
                                                         "of its distance to its nearest images.")] = None,
    threshold: Annotated[list[str] | None, typer.Option(
        "--threshold", metavar="GROUP.NAME=VALUE", show_default=False,
        help="Set one threshold (repeatable), e.g. properties.dark=30, copies.gap=0.1, leaks.tried=0.99: groups "
             "copies (near-duplicates within a split), leaks (held-out images) and properties. The defaults "
             "and the experiments behind them: docs/doctor.md.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the folds and of the neighbour index.")] = DEFAULTS["seed"],
    batch_size: BatchSizeOption = DEFAULTS["batch_size"],
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature cache.")] = False,
    engine: EngineOption = Engine.auto,
    precision: PrecisionOption = Precision.float32,
    cluster: ClusterOption = None,
    workers: WorkersOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Check DATA before training: leaks into val/test, duplicates, likely label errors, outliers, bad images.

    Prints a one-screen summary: counts per kind, each with its action and what to do.

    `--json` prints the whole diagnosis instead, and nothing else.

    `--out DIR` writes DIR/issues.csv (one row per finding) and DIR/report.html.

    DIR must be new, empty, or hold only an earlier doctor's issues.csv and report.html (replaced).

    Any other file there is refused (exit 2) before any work, and nothing is written.

    Then `cnnkit auto DATA --exclude DIR/issues.csv` trains without the rows marked exclude.
    """
    quiet_output()
    with user_errors():
        from cnnkit.doctor import DoctorOptions, diagnose, with_thresholds
        from cnnkit.reporting.doctor_report import check_out

        given = dict(backbone=str(backbone), layers=layers, grid=grid, flip=flip, image_size=image_size,
                     weights=weights, engine=engine, precision=precision, batch_size=batch_size, folds=folds,
                     seed=seed, neighbours=neighbours, outlier_z=outlier_z, use_cache=not no_cache)
        options = with_thresholds(DoctorOptions(**{k: v for k, v in given.items() if v is not None or k == "image_size"}),
                                  threshold or [])
        if out is not None:
            check_out(out)
        with progress_bar(quiet or json_output) as progress, features_on(cluster, workers):
            progress.live.transient = True  # gone when done: an error stays the one line it is
            diagnosis = diagnose(data, options, progress_callback(progress, "features"), stage_names(progress))
        written = []
        if out is not None:
            from cnnkit.reporting.doctor_report import write_outputs

            written = write_outputs(diagnosis, out)
    if json_output:
        print_json(diagnosis.to_dict())
        return
    print_summary(diagnosis, data, out, written, quiet)


def stage_names(progress):
    """A ``say`` for ``diagnose``: each stage's name as the (transient) progress line's description."""
    def say(message: str) -> None:
        for task in progress.tasks:
            progress.update(task.id, description=escape(message))

    return say


def print_summary(diagnosis, data: Path, out: Path | None, written: list[Path], quiet: bool) -> None:
    from rich.table import Table

    from cnnkit.reporting.doctor_report import advice, ordered_kinds

    cache = (f"{diagnosis.computed} new to the feature cache" if diagnosis.computed else "features from the cache")
    took = diagnosis.seconds.get("total", sum(diagnosis.seconds.values()))
    console.print(f"[bold]{escape(diagnosis.source)}[/bold]: {diagnosis.images} files, "
                  f"{len(diagnosis.class_names)} classes; {cache}; {took:.1f}s", soft_wrap=True)
    if not quiet:
        splits = sorted(diagnosis.counts, key=lambda s: (["train", "val", "test", s].index(s), s))
        classes = Table(title="images per class", title_justify="left")
        classes.add_column("class")
        for split in splits:
            classes.add_column(split, justify="right")
        for name in diagnosis.class_names:
            classes.add_row(escape(name), *(str(diagnosis.counts[split].get(name, 0)) for split in splits))
        console.print(classes)
    imbalance = diagnosis.imbalance
    if diagnosis.counts.get("train"):
        console.print("imbalance (largest / smallest training class): "
                      + ("a class has no training images" if imbalance == float("inf") else f"{imbalance:.1f}"))
    kinds = ordered_kinds(diagnosis)
    if not kinds:
        console.print("[green]nothing found[/green]")
    else:
        action = {kind: diagnosis.of_kind(kind)[0].action for kind in kinds}
        excluded = sum(1 for f in diagnosis.findings if f.action == "exclude")
        files = len({f.path for f in diagnosis.findings if f.action == "exclude"})
        if quiet:
            console.print("found: " + ", ".join(f"{len(diagnosis.of_kind(kind))} {kind}" for kind in kinds))
        else:
            table = Table(title=f"findings: {len(diagnosis.findings)} ({excluded} to exclude, {files} files)",
                          title_justify="left")
            table.add_column("kind")
            table.add_column("count", justify="right")
            table.add_column("action")
            table.add_column("what to do")
            for kind in kinds:
                colour = "red" if action[kind] == "exclude" else "yellow"
                table.add_row(escape(kind), str(len(diagnosis.of_kind(kind))), f"[{colour}]{action[kind]}[/{colour}]",
                              escape(advice(kind, action[kind])))
            console.print(table)
    for note in diagnosis.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    for path in written:
        console.print(f"wrote {escape(str(path))}", soft_wrap=True)
    if out is not None:
        console.print(f"next: cnnkit auto {escape(str(data))} --exclude {escape(str(Path(out) / 'issues.csv'))}",
                      soft_wrap=True)
    elif kinds:
        console.print(f"next: cnnkit doctor {escape(str(data))} --out DIR (issues.csv and report.html), then "
                      f"cnnkit auto {escape(str(data))} --exclude DIR/issues.csv", soft_wrap=True)
    else:
        console.print(f"next: cnnkit auto {escape(str(data))}", soft_wrap=True)


def register(app) -> None:
    app.command()(doctor)

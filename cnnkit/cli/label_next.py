"""`cnnkit label-next POOL -n N`: which images to label next, with or without a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.options import Engine

from cnnkit.cli._common import (ClusterOption, WorkersOption, features_on, BackboneOption, DEFAULT, EngineOption, JsonOption, QuietOption, console, print_json,
                                progress_bar, progress_callback, quiet_output, report_skipped, user_errors)


def label_next(
    pool: Annotated[Path, typer.Argument(help="A folder of unlabelled images (searched recursively).",
                                         show_default=False)],
    n: Annotated[int, typer.Option("-n", "--count", min=1, help="How many images to pick.")] = 100,
    model: Annotated[Path | None, typer.Option(
        "--model", "-m", help="A trained run: pick where it is least sure, one image per doubtful region "
                              "(else typical, diverse ones).",
        show_default=False)] = None,
    labeled: Annotated[Path | None, typer.Option(
        "--labeled", help="The labelled data (default: the run's training data): never picked again, "
                          "recognised by content.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write to_label.csv and report.html (a contact sheet) here; nothing else in the "
                            "folder is touched.", show_default=False)] = None,
    copy_to: Annotated[Path | None, typer.Option(
        "--copy-to", help="Copy the picked images here (e.g. DIR/unsorted) to sort into class folders; "
                          "never moves, never overwrites.", show_default=False)] = None,
    rule: Annotated[str, typer.Option(
        "--rule", help="auto (typical without a run, margin with one), or force typical, margin, random.")
    ] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the clustering and of random picks.")] = 0,
    backbone: BackboneOption = DEFAULT,
    engine: EngineOption = Engine.auto,
    quiet: QuietOption = False,
    cluster: ClusterOption = None,
    workers: WorkersOption = None,
    json_output: JsonOption = False,
) -> None:
    """Pick the N images of POOL worth labelling next: typical, diverse ones to start, then the run's doubts.

    The loop: `cnnkit label-next POOL -n 100 --copy-to LABELS/unsorted`, sort them into class folders
    LABELS/<class>/, `cnnkit auto LABELS --out RUN`, then `cnnkit label-next POOL -n 100 --model RUN`.
    """
    quiet_output()
    from cnnkit.labelling import label_next as pick

    with user_errors():
        from cnnkit.labelling import check_destinations

        check_destinations(out, copy_to)
        with progress_bar(quiet or json_output) as progress, features_on(cluster, workers):
            progress.live.transient = True  # gone when done: an error stays the one line it is
            found = pick(pool, n, model, labeled, rule, str(backbone), engine, seed,
                         progress_callback(progress, "features"))
        report_skipped(found.failures, quiet)
        written = []
        if out is not None:
            from cnnkit.labelling import write_outputs

            written = write_outputs(found, out)
        copied = []
        if copy_to is not None:
            from cnnkit.labelling import copy_picks

            copied = copy_picks(found.picks, copy_to)
    if json_output:
        print_json([{"path": str(p.path), "score": p.score, "why": p.why,
                     **({"guess": p.guess, "confidence": p.confidence} if p.guess is not None else {})}
                    for p in found.picks])
        return
    console.print(f"rule: [bold]{found.rule}[/bold] -- {escape(found.reason)}", soft_wrap=True)
    left_out = [f"{count} {what}" for count, what in ((found.already_labelled, "already labelled"),
                                                       (found.duplicates, "duplicate(s)")) if count]
    console.print(f"pool: {found.pool} images, {found.candidates} to pick from"
                  + (f" ({', '.join(left_out)} left out)" if left_out else "")
                  + (f"; {found.computed} new to the feature cache" if found.computed else "; features from the cache"))
    if found.labelled_from:
        console.print(f"labelled: {escape(found.labelled_from)}", soft_wrap=True)
    if not quiet:
        from rich.table import Table

        table = Table()
        table.add_column("#", justify="right")
        table.add_column("score", justify="right")
        if found.class_names:
            table.add_column("guess")
        table.add_column("why")
        table.add_column("image", overflow="fold")
        for rank, p in enumerate(found.picks, start=1):
            guess = [f"{escape(p.guess)} {p.confidence:.2f}"] if found.class_names else []
            table.add_row(str(rank), f"{p.score:.3f}", *guess, escape(p.why), escape(str(p.path)))
        console.print(table)
    for path in written:
        console.print(f"wrote {escape(str(path))}")
    if copy_to is not None:
        console.print(f"copied {len(copied)} image(s) to {escape(str(copy_to))}: sort them into class folders, "
                      "then `cnnkit auto`")


def register(app) -> None:
    app.command(name="label-next")(label_next)

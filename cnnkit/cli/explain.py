"""`cnnkit explain IMAGE...`: where the model looks (Grad-CAM; occlusion for k-NN and RBF-SVM heads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.choices import Choice
from cnnkit.cli._common import (DEFAULT, BackboneOption, JsonOption, QuietOption, console, print_json,
                                progress_bar, progress_callback, quiet_output, report_skipped, user_errors,
                                warn)


class Stage(Choice):
    """A named stage whose feature maps Grad-CAM weighs."""

    conv1 = "conv1"
    conv2 = "conv2"
    conv3 = "conv3"
    conv4 = "conv4"
    conv5 = "conv5"
    top = "top"


def explain(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.", show_default=False)],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="A run folder (default: the backbone's own ImageNet classifier).")] = None,
    class_name: Annotated[str | None, typer.Option("--class", "-c", help="The class to explain, by name or index (default: the predicted class).")] = None,
    layer: Annotated[Stage | None, typer.Option("--layer", "-l", help="The stage whose feature maps are weighed (default: the last; a feature-head run: its deepest stage).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <stem>.png (overlay) and <stem>.npy (heat map in the image's own pixel grid, 0..1).")] = Path("explain"),
    backbone: BackboneOption = DEFAULT,
    weights: Annotated[str, typer.Option(help="'imagenet' or a weights file for --backbone (without --model).")] = "imagenet",
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Show where the model looks: a Grad-CAM heat map per image (occlusion for k-NN and RBF-SVM heads)."""
    quiet_output()
    from cnnkit.explain import explain as run_explain

    with user_errors(), progress_bar(quiet or json_output) as progress:
        explanations, skipped = run_explain(images, model, class_name, layer and str(layer), out, str(backbone),
                                            weights, progress_callback(progress, "explaining"))
    report_skipped(skipped, quiet=True)
    if json_output:
        print_json([e.to_dict() for e in explanations])
    elif not quiet:
        for e in explanations:
            console.print(escape(f"{e.path}: {e.label} {e.score:.3f} ({e.method}, {e.layer}) -> {e.overlay_path}, "
                                 f"{e.heatmap_path}"), soft_wrap=True)
    if skipped and not quiet:
        warn(f"{len(skipped)} input(s) skipped, {len(explanations)} explained")
    if not explanations:
        raise typer.Exit(code=2)


def register(app) -> None:
    app.command()(explain)

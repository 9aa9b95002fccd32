"""`cnnkit export RUN --format savedmodel|tflite|onnx --out PATH`: a run as one portable model file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.cli._common import JsonOption, console, err_console, print_json, quiet_output, user_errors
from cnnkit.options import ExportFormat, Quantize


def export(
    run: Annotated[Path, typer.Argument(help="A run folder.", show_default=False)],
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="File format.")],  # noqa: A002
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write: the model, labels.txt, model.json.")],
    quantize: Annotated[Quantize, typer.Option(help="TFLite post-training quantization (int8: calibrated on the run's training images).")] = Quantize.none,
    check: Annotated[Path | None, typer.Option(help="Images to compare the export with the run on (default: the run's data, its test split if any).")] = None,
    check_images: Annotated[int, typer.Option(min=1, help="How many images to compare on.")] = 200,
    min_agreement: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Least top-1 agreement with the run (default 0.99; dynamic 0.97, int8 0.95).")] = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it is an earlier export.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Write a run as SavedModel, TFLite or ONNX: raw uint8 RGB in, class probabilities out, checked against the run."""
    quiet_output()
    from cnnkit.export import ExportCheckError, export_run

    with user_errors():
        try:
            result = export_run(run, format, out, quantize, check, check_images, min_agreement, force)
        except ExportCheckError as error:  # the job ran and failed its check: exit 1, not a usage error
            err_console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
            raise typer.Exit(code=1) from None
    c = result.check
    summary = {"out": str(result.out), "format": result.format, "quantize": result.quantize,
               "file": str(result.out / result.model_file), "size_bytes": result.size_bytes,
               "check": c.__dict__, "seconds": result.seconds}
    if json_output:
        print_json(summary)
        return
    console.print(escape(f"wrote {result.out / result.model_file} ({result.size_bytes / 1e6:.2f} MB), "
                         f"labels.txt, model.json"))
    line = (f"top-1 agreement with `cnnkit predict --model {run}`: [bold green]{c.agreement:.1%}[/bold green] "
            f"of {c.images} images; largest probability difference {c.max_probability_difference:.2e}")
    console.print(line)
    if c.accuracy_exported is not None:
        console.print(f"accuracy on those images: export {c.accuracy_exported:.3f}, run {c.accuracy_run:.3f}")


def register(app) -> None:
    app.command()(export)

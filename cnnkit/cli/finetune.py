"""`cnnkit finetune DATA --freeze conv4` and `cnnkit train DATA`: training networks."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnnkit.cli._common import (Backbone, BackboneOption, ExcludeOption, JsonOption, QuietOption, console,
                                err_console, print_json, progress_line, quiet_output, report_skipped, user_errors)
from cnnkit.options import (FINETUNE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, TRAIN, Augment, BatchNorm, Device, Freeze,
                            Optimizer, Schedule, TrainOptions, preset)

Epochs = Annotated[int, typer.Option(min=1, help="Epochs of the main phase.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per step (the notes: 32-256).")]
Lr = Annotated[float, typer.Option("--lr", min=0.0, help="Base learning rate.")]
OptimizerOption = Annotated[Optimizer, typer.Option("--optimizer", help="sgd (with --momentum), adam or adamw.")]
Momentum = Annotated[float, typer.Option(min=0.0, max=1.0, help="SGD momentum.")]
ScheduleOption = Annotated[Schedule, typer.Option("--schedule", help="Rate decay per epoch: exp (x0.97), step (/10 at 1/2, 3/4), inv (1/t), cosine, constant.")]
Warmup = Annotated[int, typer.Option(min=0, help="Epochs of linear warm-up.")]
WeightDecay = Annotated[float, typer.Option(min=0.0, help="Weight decay (L2).")]
Dropout = Annotated[float, typer.Option(min=0.0, max=0.9, help="Dropout before the classifier.")]
AugmentOption = Annotated[Augment, typer.Option("--augment", help="none, light (flip, crop) or strong (+ rotation, colour jitter).")]
Erase = Annotated[float, typer.Option(min=0.0, max=1.0, help="Probability of random erasing: a random rectangle of each training image filled with noise (0: off).")]
Flip = Annotated[bool, typer.Option("--flip/--no-flip", help="The trained model averages each image with its mirror image when it predicts (twice the inference work).")]
LabelSmoothing = Annotated[float, typer.Option(min=0.0, max=0.5, help="Label smoothing.")]
ValSplit = Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of train held out for validation when DATA has no val/.")]
Patience = Annotated[int, typer.Option(min=1, help="Stop after this many epochs without a better validation accuracy.")]
PlateauPatience = Annotated[int, typer.Option(min=0, help="Divide the rate by 10 after this many epochs without a better validation accuracy (0: never).")]
TimeLimitOption = Annotated[float | None, typer.Option("--time-limit", min=0.1, help="Minutes the command may train for: the epochs are cut to what fits, measured as it trains, and the schedule ends on time.", show_default=False)]
Seed = Annotated[int, typer.Option(help="Seed for the split, initialisation, data order and augmentation.")]
Deterministic = Annotated[bool, typer.Option(help="Deterministic TensorFlow ops (slower).")]
DeviceOption = Annotated[Device, typer.Option("--device", help="auto, cpu or gpu (mixed precision; several GPUs are mirrored).")]
Tensorboard = Annotated[bool, typer.Option(help="Write TensorBoard logs into the work folder.")]
Sanity = Annotated[bool, typer.Option(help="First overfit two batches; the loss must fall near zero.")]
ImageSize = Annotated[int | None, typer.Option(min=MIN_IMAGE_SIZE, max=MAX_IMAGE_SIZE, help="Input size in pixels (default: the backbone's).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")]
Resume = Annotated[Path | None, typer.Option(help="Continue an interrupted run (its folder) from its last epoch.")]
Force = Annotated[bool, typer.Option(help="Replace --out if it is an existing run.")]
Strict = Annotated[bool, typer.Option(help="Stop at the first unreadable image (exit 2).")]
Data = Annotated[Path, typer.Argument(help="Folder of class subfolders (optionally train/ val/ test/), or a CSV of path,label.", show_default=False)]


def options_from(mode: str, parameters: dict) -> TrainOptions:
    """The command's parameters that are ``TrainOptions`` fields, over the mode's preset (``cnnkit.options``).

    The options are listed once, in the command's signature; a field the command has no flag for
    (``train``'s freeze, head epochs and BatchNorm mode) keeps the preset's value.
    """
    names = {f.name for f in fields(TrainOptions)}
    return preset(mode, **{name: str(value) if name == "backbone" else value
                           for name, value in parameters.items() if name in names})


def _run(data, options, out, force, resume, json_output, quiet):
    quiet_output()
    from cnnkit.training import run_training

    if resume is not None:
        out = resume
    rows = []

    def report(row):
        rows.append(row)
        if not (quiet or json_output):
            err_console.print(progress_line(row))

    def say(message):
        if not (quiet or json_output):
            err_console.print(f"[cyan]{escape(message)}[/cyan]", soft_wrap=True)

    with user_errors():
        # With --resume, the options come from the run's checkpoint.
        result = run_training(data, options, out, force=force, resume=resume is not None, report=report,
                              say=say)
    report_skipped(result.skipped, quiet)
    summary = {"run": str(result.run_path) if result.run_path else None, "interrupted": result.interrupted,
               "images": result.counts,
               **result.metrics, "diagnosis": result.diagnosis, "sanity": result.sanity,
               "weights_digest": result.weights_digest}
    if json_output:
        print_json(summary)
    elif not quiet:
        for line in result.diagnosis:
            console.print(f"[yellow]diagnosis:[/yellow] {escape(line)}")
        line = f"best val accuracy [bold green]{summary['val_accuracy'] or 0:.3f}[/bold green] (epoch {summary['best_epoch']})"
        if summary.get("test_accuracy") is not None:
            line += f", test accuracy [bold green]{summary['test_accuracy']:.3f}[/bold green]"
        console.print(line)
        if result.run_path is None:
            console.print("this worker is not the chief: the chief saved the run")
        else:
            console.print(escape(f"saved {result.run_path}")
                          + (" (interrupted; continue with --resume)" if result.interrupted else ""))
    if result.interrupted:
        raise typer.Exit(code=130)


def finetune(
    data: Data,
    out: Out = Path("runs/finetune"),
    backbone: BackboneOption = Backbone(FINETUNE.backbone),
    freeze: Annotated[Freeze, typer.Option(help="Freeze the stem through this stage; none trains every layer.")] = FINETUNE.freeze,
    epochs: Epochs = FINETUNE.epochs,
    head_epochs: Annotated[int, typer.Option(min=0, help="Epochs training only the new head first (0: skip).")] = FINETUNE.head_epochs,
    batch_size: BatchSize = FINETUNE.batch_size,
    lr: Lr = FINETUNE.lr,
    finetune_lr_scale: Annotated[float, typer.Option(min=0.0, help="The unfrozen stages train at --lr times this, after the head phase.")] = FINETUNE.finetune_lr_scale,
    optimizer: OptimizerOption = FINETUNE.optimizer,
    momentum: Momentum = FINETUNE.momentum,
    schedule: ScheduleOption = FINETUNE.schedule,
    warmup: Warmup = FINETUNE.warmup,
    weight_decay: WeightDecay = FINETUNE.weight_decay,
    dropout: Dropout = FINETUNE.dropout,
    augment: AugmentOption = FINETUNE.augment,
    erase: Erase = FINETUNE.erase,
    flip: Flip = FINETUNE.flip,
    batchnorm: Annotated[BatchNorm, typer.Option("--batchnorm", help="BatchNorm of the unfrozen stages: frozen (ImageNet statistics, inference mode) or train (batch statistics).")] = FINETUNE.batchnorm,
    label_smoothing: LabelSmoothing = FINETUNE.label_smoothing,
    val_split: ValSplit = FINETUNE.val_split,
    patience: Patience = FINETUNE.patience,
    plateau_patience: PlateauPatience = FINETUNE.plateau_patience,
    time_limit: TimeLimitOption = FINETUNE.time_limit,
    image_size: ImageSize = FINETUNE.image_size,
    weights: Annotated[str, typer.Option(help="'imagenet' or a weights file.")] = FINETUNE.weights,
    seed: Seed = FINETUNE.seed,
    deterministic: Deterministic = FINETUNE.deterministic,
    device: DeviceOption = FINETUNE.device,
    tensorboard: Tensorboard = FINETUNE.tensorboard,
    sanity: Sanity = FINETUNE.sanity,
    resume: Resume = None,
    force: Force = False,
    strict: Strict = FINETUNE.strict,
    exclude: ExcludeOption = FINETUNE.exclude,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Replace the classifier, freeze the stages up to --freeze, train the rest (head first)."""
    _run(data, options_from("finetune", locals()), out, force, resume, json_output, quiet)


def train(
    data: Data,
    out: Out = Path("runs/train"),
    backbone: BackboneOption = Backbone(TRAIN.backbone),
    weights: Annotated[str, typer.Option(help="'imagenet' (start from pretrained weights), 'none' (from scratch) or a file.")] = TRAIN.weights,
    epochs: Epochs = TRAIN.epochs,
    batch_size: BatchSize = TRAIN.batch_size,
    lr: Lr = TRAIN.lr,
    optimizer: OptimizerOption = TRAIN.optimizer,
    momentum: Momentum = TRAIN.momentum,
    schedule: ScheduleOption = TRAIN.schedule,
    warmup: Warmup = TRAIN.warmup,
    weight_decay: WeightDecay = TRAIN.weight_decay,
    dropout: Dropout = TRAIN.dropout,
    augment: AugmentOption = TRAIN.augment,
    erase: Erase = TRAIN.erase,
    flip: Flip = TRAIN.flip,
    label_smoothing: LabelSmoothing = TRAIN.label_smoothing,
    val_split: ValSplit = TRAIN.val_split,
    patience: Patience = TRAIN.patience,
    plateau_patience: PlateauPatience = TRAIN.plateau_patience,
    time_limit: TimeLimitOption = TRAIN.time_limit,
    image_size: ImageSize = TRAIN.image_size,
    seed: Seed = TRAIN.seed,
    deterministic: Deterministic = TRAIN.deterministic,
    device: DeviceOption = TRAIN.device,
    tensorboard: Tensorboard = TRAIN.tensorboard,
    sanity: Sanity = TRAIN.sanity,
    resume: Resume = None,
    force: Force = False,
    strict: Strict = TRAIN.strict,
    exclude: ExcludeOption = TRAIN.exclude,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train every layer: from pretrained weights, or from scratch (default: the compact small_resnet)."""
    _run(data, options_from("train", locals()), out, force, resume, json_output, quiet)


def register(app) -> None:
    app.command()(finetune)
    app.command()(train)

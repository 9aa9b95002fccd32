"""`auto`: advise, run the chosen strategy, evaluate, and report what was measured, tried and chosen."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.advise import Advice, Thresholds, advise
from cnnkit.data import load_dataset
from cnnkit.errors import CnnkitError

STAGE_CANDIDATES = ("conv3", "conv4", "top", "conv4,top", "conv3,conv4,top")


@dataclass
class AutoResult:
    advice: Advice
    run_path: Path
    tried: list[dict] = field(default_factory=list)
    chosen: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    report_path: Path | None = None


def _choose_linear(dataset, advice: Advice, backbone: str, seed: int, say) -> tuple[list[dict], dict]:
    """Pick stage(s) and head by cross-validation; features come from one forward pass and the cache.

    Every candidate stage set is scored with a logistic head, then the best set
    also with an RBF SVM (no PCA in the search, to keep it quick).
    """
    from cnnkit.backbones import get_backbone
    from cnnkit.extraction import ExtractOptions, run_extract

    choices = get_backbone(backbone).layer_choices
    candidates = ["top"] if advice.strategy == "linear-top" else [
        c for c in STAGE_CANDIDATES if all(part in choices for part in c.split(","))]
    tried: list[dict] = []

    def score(layers: str, head: str) -> None:
        options = ExtractOptions(backbone=backbone, layers=layers, head=head, seed=seed, val_split=0.0, pca=None)
        try:
            result = run_extract(dataset.source, options, dataset=dataset)
        except CnnkitError as error:  # e.g. too few images per class for this head
            tried.append({"layers": layers, "head": head, "error": str(error)})
            return
        tried.append({"layers": layers, "head": head, "cv_accuracy": result.metrics["cv_accuracy"],
                      "best_params": result.fitted.best_params})
        say(f"tried {layers} + {head}: cv accuracy {result.metrics['cv_accuracy'] or 0:.3f}")

    for layers in candidates:
        score(layers, "logreg")
    scored = [t for t in tried if t.get("cv_accuracy") is not None]
    if not scored:
        return tried, {"layers": advice.layer or "top", "head": "logreg"}
    score(max(scored, key=lambda t: t["cv_accuracy"])["layers"], "svm")
    scored = [t for t in tried if t.get("cv_accuracy") is not None]
    return tried, max(scored, key=lambda t: t["cv_accuracy"])


def run_auto(data: str | Path, out: str | Path, backbone: str = "efficientnet_lite0",
             budget_minutes: float = 10.0, thresholds: Thresholds | None = None, seed: int = 0,
             force: bool = False, say: Callable[[str], None] | None = None,
             report: Callable[[dict], None] | None = None) -> AutoResult:
    """Measure, choose, run, evaluate and report.

    Args:
        budget_minutes: a soft limit: probes are sampled and the number of
            training epochs is set from the measured speed to fit it.
    """
    from cnnkit.runs import check_destination

    say = say or (lambda message: None)
    started = time.perf_counter()
    out = Path(out)
    check_destination(out, force)
    dataset = load_dataset(data)
    say("measuring the data")
    advice = advise(data, backbone, thresholds=thresholds, seed=seed, dataset=dataset)
    say(f"cell: {advice.cell['data']} data, {advice.cell['domain']} domain -> {advice.strategy}")

    tried: list[dict] = []
    if advice.strategy in ("linear-top", "linear-stages"):
        from cnnkit.extraction import ExtractOptions, run_extract

        tried, best = _choose_linear(dataset, advice, backbone, seed, say)
        # Little data: the final head learns from every training image; its
        # cross-validated accuracy is the estimate (and test/ is scored if present).
        options = ExtractOptions(backbone=backbone, layers=best["layers"], head=best["head"], seed=seed,
                                 val_split=0.0)
        result = run_extract(data, options, out, force, dataset=dataset)
        chosen = {"strategy": advice.strategy, "command": "extract", "layers": best["layers"],
                  "head": best["head"],
                  "equivalent": f"cnnkit extract {data} --backbone {backbone} --layer {best['layers']} "
                                f"--head {best['head']} --val-split 0"}
        metrics, run_path = result.metrics, result.run_path
    else:
        from cnnkit.training import TrainOptions, run_training

        remaining = budget_minutes * 60 - (time.perf_counter() - started)
        train_images = len(dataset.splits["train"])
        if advice.strategy == "train-scratch":
            side = max(int(advice.image_side), 28)
            options = TrainOptions(mode="train", backbone="small_resnet", weights="none", image_size=side,
                                   epochs=15, batch_size=128, lr=0.1, schedule="cosine", warmup=1,
                                   weight_decay=5e-4, val_split=0.1, seed=seed, patience=8)
            rate = 600.0  # images/s of small_resnet training on two CPU cores (bench/)
        else:
            options = TrainOptions(mode="finetune", backbone=backbone, freeze=advice.freeze, epochs=10,
                                   head_epochs=2, seed=seed)
            # Training a few stages costs about three forward passes per image.
            rate = max((advice.forward_images_per_s or 30.0) / 3.0, 1.0)
        epoch_seconds = train_images / rate
        options.epochs = int(np.clip(remaining * 0.8 / epoch_seconds - options.head_epochs, 1, options.epochs))
        say(f"about {epoch_seconds:.0f}s per epoch: {options.epochs} epoch(s) fit the budget")
        result = run_training(data, options, out, force=force, report=report, progress=say, dataset=dataset)
        chosen = {"strategy": advice.strategy, "command": options.mode, "freeze": options.freeze,
                  "backbone": options.backbone, "epochs": options.epochs,
                  "equivalent": f"cnnkit {options.mode} {data} --backbone {options.backbone} "
                                + (f"--freeze {options.freeze} " if options.mode == "finetune" else "")
                                + f"--epochs {options.epochs}"}
        metrics, run_path = result.metrics, result.run_path

    auto = AutoResult(advice, run_path, tried, chosen, metrics, time.perf_counter() - started)
    auto.report_path = write_report(auto)
    return auto


def write_report(result: AutoResult) -> Path:
    """report.md and auto.json beside the model in the run folder."""
    advice = result.advice
    lines = [
        "# cnnkit auto report", "",
        f"Run: `{result.run_path}`, {result.seconds:.0f} s in all.", "",
        "## Measured", "",
        "| measurement | value |", "|---|---|",
        f"| images per class (min / median) | {advice.images_per_class['min']:g} / "
        f"{advice.images_per_class['median']:g} |",
        f"| classes / images | {advice.images_per_class['classes']:g} / {advice.images_per_class['total']:g} |",
        f"| median image side | {advice.image_side:g} px |",
    ]
    shift = advice.similarity.get("shift", {})
    if shift:
        lines.append(f"| domain shift (mean KL at BatchNorm layers) | {shift.get('mean', 0):.3f} |")
    confidence = advice.similarity.get("imagenet_classifier")
    if confidence:
        lines.append(f"| ImageNet classifier mean top-1 | {confidence['top1']:.3f} |")
    for stage, accuracy in advice.probes.items():
        lines.append(f"| linear probe {stage} (CV accuracy) | {accuracy:.3f} |")
    lines += ["", "## Chosen", "",
              f"Cell: **{advice.cell['data']} data, {advice.cell['domain']} domain** -> "
              f"strategy **{advice.strategy}**.", ""]
    lines += [f"- {reason}" for reason in advice.reasons]
    if result.tried:
        lines += ["", "## Tried", "", "| layers | head | CV accuracy |", "|---|---|---|"]
        for t in result.tried:
            score = f"{t['cv_accuracy']:.3f}" if t.get("cv_accuracy") is not None else t.get("error", "-")
            lines.append(f"| {t['layers']} | {t['head']} | {score} |")
    lines += ["", "## Result", "", f"Model: {json.dumps(result.chosen)}", ""]
    for key, value in result.metrics.items():
        if isinstance(value, float):
            lines.append(f"- {key.replace('_', ' ')}: {value:.3f}")
    lines += ["", f"Equivalent command: `{result.chosen.get('equivalent', advice.command)}`", ""]
    path = result.run_path / "report.md"
    path.write_text("\n".join(lines))
    (result.run_path / "auto.json").write_text(json.dumps(
        {"advice": advice.to_dict(), "tried": result.tried, "chosen": result.chosen,
         "metrics": result.metrics, "seconds": result.seconds}, indent=2, default=str))
    return path

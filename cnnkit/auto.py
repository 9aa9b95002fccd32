"""`auto`: advise, carry out its plan, and report what was measured, tried and chosen.

The run auto writes is the plan's run, with ``report.md`` and ``auto.json``
added before it is sealed (so they are checksummed like every other file).
When the plan searched stages and heads (little data) and averaging the two
best candidates' probabilities scores better by cross-validation than the
best alone, the run is replaced by the ensemble of both (``ensemble_check``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.advise import Advice, Thresholds, advise
from cnnkit.backbones.registry import DEFAULT_BACKBONE
from cnnkit.data import load_dataset


@dataclass
class AutoResult:
    advice: Advice
    run_path: Path
    tried: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def plan(self):
        return self.advice.plan

    @property
    def report_path(self) -> Path:
        return self.run_path / "report.md"


def run_auto(data: str | Path, out: str | Path, backbone: str = DEFAULT_BACKBONE,
             budget_minutes: float = 10.0, thresholds: Thresholds | None = None, seed: int = 0,
             force: bool = False, say: Callable[[str], None] | None = None,
             report: Callable[[dict], None] | None = None) -> AutoResult:
    """Measure, plan, run, evaluate and report.

    Args:
        budget_minutes: the time to aim for: probes are sampled, and the plan's
            training epochs are sized from the measured speed to fit it.
    """
    from cnnkit.runs import check_destination

    say = say or (lambda message: None)
    started = time.perf_counter()
    out = Path(out)
    check_destination(out, force)
    dataset = load_dataset(data)
    say("measuring the data")
    advice = advise(data, backbone, thresholds=thresholds, seed=seed, dataset=dataset, budget_minutes=budget_minutes)
    say(f"cell: {advice.cell['data']} data, {advice.cell['domain']} domain -> {advice.strategy}")
    say(f"running: {advice.plan.command_line}")

    found: dict = {"tried": [], "ensemble": None}

    def attach_report(folder: Path, manifest) -> None:
        tried = manifest.model.tried if manifest.model.kind == "feature_head" else found["tried"]
        result = AutoResult(advice, out, tried, manifest.metrics, time.perf_counter() - started)
        (folder / "report.md").write_text(render_report(result, found["ensemble"]), encoding="utf-8")
        (folder / "auto.json").write_text(json.dumps(
            {"advice": advice.to_dict(), "tried": tried, "metrics": manifest.metrics, "seconds": result.seconds,
             "ensemble": found["ensemble"]}, indent=2, default=str), encoding="utf-8")

    result = advice.plan.run(out, force, dataset=dataset, attach=[attach_report], report=report, progress=say)
    found["tried"] = getattr(result, "tried", [])
    found["ensemble"] = ensemble_check(advice.plan, dataset, found["tried"])
    if found["ensemble"] and found["ensemble"]["helps"]:
        say("averaging the two best candidates scores better by cross-validation: writing their ensemble")
        ensemble_best_two(advice.plan, dataset, out, found["ensemble"]["candidates"][1], [attach_report])
        from cnnkit.runs import load_run

        return AutoResult(advice, out, found["tried"], load_run(out).manifest.metrics, time.perf_counter() - started)
    return AutoResult(advice, result.run_path, found["tried"], result.metrics, time.perf_counter() - started)


def ensemble_check(plan, dataset, tried: list[dict]) -> dict | None:
    """Whether averaging the two best (stages, head) candidates beats the best alone, by cross-validation.

    Both are scored on the same stratified folds of the training images (from
    the feature cache: no forward pass), without PCA as in the search. Only
    for extract plans that searched; ``None`` otherwise or when the classes are
    too small to cross-validate.
    """
    scored = sorted((t for t in tried if t.get("cv_accuracy") is not None), key=lambda t: -t["cv_accuracy"])
    if plan.command != "extract" or len(scored) < 2:
        return None
    from cnnkit.backbones import get_backbone
    from cnnkit.data import split_dataset
    from cnnkit.ensemble import cv_ensemble
    from cnnkit.features import FeatureConfig, compute_features, parse_layers
    from cnnkit.heads import fit_head

    options, spec = plan.options, get_backbone(plan.options.backbone)
    train = split_dataset(dataset, options.val_split, options.seed)["train"]
    table = compute_features([s.path for s in train], FeatureConfig(options.backbone, options.weights,
                             options.image_size, options.pool, options.flip), options.batch_size, options.use_cache)
    labels = np.array([train[i].label for i in table.kept])
    candidates = scored[:2]
    features = [table.select(parse_layers(spec, c["layers"])) for c in candidates]
    fitted = [fit_head(x, labels, c["head"], None, options.whiten, options.l2_normalize, options.cv, options.seed)
              for x, c in zip(features, candidates)]
    if min(f.cv_folds for f in fitted) < 2:
        return None
    scores = cv_ensemble([f.pipeline for f in fitted], features, labels, fitted[0].cv_folds, options.seed)
    return {"candidates": [{"layers": c["layers"], "head": c["head"]} for c in candidates], **scores,
            "helps": scores["ensemble"] > max(scores["members"])}


def ensemble_best_two(plan, dataset, out: Path, second: dict, attach) -> Path:
    """Replace the plan's run at ``out`` by the ensemble of it and the ``second`` candidate's run."""
    import shutil
    import tempfile
    from dataclasses import replace

    from cnnkit.ensemble import make_ensemble
    from cnnkit.extraction import run_extract

    # Beside --out, named like publish_folder's builds so a killed job's leftover is cleaned up.
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        options = replace(plan.options, layers=second["layers"], head=second["head"])
        member = run_extract(plan.data, options, scratch / "second", dataset=dataset,
                             strategy=str(plan.strategy)).run_path
        return make_ensemble([out, member], out, force=True, attach=attach)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def render_report(result: AutoResult, ensemble: dict | None = None) -> str:
    """report.md: what was measured, the cell and why, what was tried, and the result."""
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
    if ensemble:
        first, second = ensemble["candidates"]
        verdict = "it does, so the run is their ensemble" if ensemble["helps"] else "it does not"
        lines += ["", f"Averaging the two best ({first['layers']} {first['head']}: {ensemble['members'][0]:.3f}, "
                      f"{second['layers']} {second['head']}: {ensemble['members'][1]:.3f}) scores "
                      f"{ensemble['ensemble']:.3f} by cross-validation on the same folds: {verdict}."]
    lines += ["", "## Result", ""]
    for key, value in result.metrics.items():
        if isinstance(value, float):
            lines.append(f"- {key.replace('_', ' ')}: {value:.3f}")
    lines += ["", f"Equivalent command: `{advice.plan.command_line}`", ""]
    return "\n".join(lines)

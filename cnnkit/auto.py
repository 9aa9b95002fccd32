"""`auto`: advise, carry out its plan, and report what was measured, tried and chosen.

The run auto writes is the plan's run, with ``report.md`` and ``auto.json``
added before it is sealed (so they are checksummed like every other file).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path


from cnnkit.advise import Advice, Thresholds, advise
from cnnkit.backbones.registry import DEFAULT_BACKBONE
from cnnkit.data import left_out_line, load_excluding
from cnnkit.doctor.quick import QuickCheck, quick_checks
from cnnkit.kinds import TriedRow
from cnnkit.plan import Plan, tried_in


@dataclass
class AutoResult:
    advice: Advice
    run_path: Path
    tried: list[TriedRow] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    checks: dict = field(default_factory=dict)

    @property
    def plan(self):
        return self.advice.plan

    @property
    def report_path(self) -> Path:
        return self.run_path / "report.md"

    def to_dict(self) -> dict:
        """``auto.json``: the advice, what was tried, the metrics and the seconds taken."""
        return {"advice": self.advice.to_dict(), "tried": [t.model_dump(exclude_none=True) for t in self.tried],
                "metrics": self.metrics, "seconds": self.seconds, "checks": self.checks}


def run_auto(data: str | Path, out: str | Path, backbone: str = DEFAULT_BACKBONE,
             budget_minutes: float = 10.0, thresholds: Thresholds | None = None, seed: int = 0,
             force: bool = False, say: Callable[[str], None] | None = None,
             report: Callable[[dict], None] | None = None, exclude: str | Path | None = None,
             warn: Callable[[str], None] | None = None) -> AutoResult:
    """Measure, plan, run, evaluate and report.

    Args:
        budget_minutes: the time to aim for: probes are sampled, and the plan's
            training epochs are sized from the measured speed to fit it.
        exclude: a file listing images to leave out (``cnnkit.data.exclude``): advice and plan see
            the dataset without them, and the plan's options carry it so its command line reproduces it.
        warn: where the data checks' one-line warnings go (default: ``say``).
    """
    from cnnkit.runs import check_destination

    say = say or (lambda message: None)
    started = time.perf_counter()
    out = Path(out)
    check_destination(out, force)
    dataset = load_excluding(data, exclude)
    if exclude:
        say(left_out_line(dataset, exclude))
    say("checking the data (unreadable files, duplicates, test images copied into train)")
    checks = quick_checks(dataset)
    for line in checks.warnings():
        (warn or say)(line)
    say("measuring the data")
    advice = advise(data, backbone, thresholds=thresholds, seed=seed, dataset=dataset, budget_minutes=budget_minutes)
    if exclude:
        advice.plan = _with_exclude(advice.plan, str(exclude))
    say(f"cell: {advice.cell['data']} data, {advice.cell['domain']} domain -> {advice.strategy}")
    say(f"running: {advice.plan.command_line}")

    def attach_report(folder: Path, manifest) -> None:
        from cnnkit.runs import open_unsealed

        tried = tried_in(open_unsealed(folder, manifest))
        result = AutoResult(advice, out, tried, manifest.metrics, time.perf_counter() - started, checks.to_dict())
        (folder / "report.md").write_text(render_report(result), encoding="utf-8")
        (folder / "auto.json").write_text(json.dumps(result.to_dict(), indent=2, default=str), encoding="utf-8")

    result = advice.plan.run(out, force, dataset=dataset, attach=[attach_report], report=report, say=say)
    return AutoResult(advice, result.run_path, list(result.tried), result.metrics,
                      time.perf_counter() - started, checks.to_dict())


def _with_exclude(plan: Plan, exclude: str) -> Plan:
    """``plan`` whose options (its members', for an ensemble) record ``--exclude``: the dataset it is given
    already leaves the files out; the option makes the recorded command lines do the same."""
    if plan.options is not None:
        return replace(plan, options=replace(plan.options, exclude=exclude))
    return replace(plan, members=[_with_exclude(member, exclude) for member in plan.members])


def render_report(result: AutoResult) -> str:
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
    checks = QuickCheck(**{k: [tuple(x) for x in v] for k, v in result.checks.items()}) if result.checks else None
    lines += ["", "## Data checks", ""]
    if checks is None or checks.clean:
        lines.append("No unreadable files, exact duplicates or test images copied into train.")
    else:
        lines += [f"- **{line}**" for line in checks.warnings()]
        lines += [f"  - leak: `{a}` = `{b}`" for a, b in checks.leaks[:20]]
    lines += ["", "## Chosen", "",
              f"Cell: **{advice.cell['data']} data, {advice.cell['domain']} domain** -> "
              f"strategy **{advice.strategy}**.", ""]
    lines += [f"- {reason}" for reason in advice.reasons]
    if result.tried:
        lines += ["", "## Tried", "", "| layers | head | CV accuracy |", "|---|---|---|"]
        for t in result.tried:
            score = f"{t.cv_accuracy:.3f}" if t.cv_accuracy is not None else (t.error or "-")
            lines.append(f"| {t.layers} | {t.head} | {score} |")
    lines += ["", "## Result", ""]
    for key, value in result.metrics.items():
        if isinstance(value, float):
            lines.append(f"- {key.replace('_', ' ')}: {value:.3f}")
    lines += ["", f"Equivalent command: `{advice.plan.command_line}`", ""]
    return "\n".join(lines)

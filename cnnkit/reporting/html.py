"""report.html: one self-contained page about a run, rendered from the run folder alone.

It reads only files of the run (the manifest, history.csv, report.json,
plots/, auto.json, skipped.json, members/*/manifest.json and the evidence
folders ``heldout/<split>/`` of ``cnnkit.reporting.evidence``) and needs no
TensorFlow: matplotlib draws what no file holds yet (the learning rate).
Every image is inlined as a base64 ``data:`` URI and the page carries a
Content-Security-Policy that allows nothing else, so it opens offline, can be
mailed as one file and never fetches anything. Every string that came from a
user (file and class names, paths) is HTML-escaped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from string import Template

from cnnkit.kinds import get_kind
from cnnkit.reporting.markup import esc, figure, image_tag, number, read_json, table

REPORT = "report.html"


# ------------------------------------------------------------------ sections


def header(manifest, name: str) -> str:
    kind = manifest.model.kind.replace("_", " ")
    strategy = f", strategy <b>{esc(manifest.strategy)}</b>" if manifest.strategy else ""
    return (f"<h1>cnnkit {esc(manifest.command)}: {esc(name)}</h1>"
            f'<p class="sub">{esc(kind)} run{strategy}; written {esc(manifest.created or "now")} by cnnkit '
            f"{esc(manifest.cnnkit_version or '')}; {len(manifest.class_names)} classes, input "
            f"{manifest.image_size} px</p>"
            f"<pre>{esc(manifest.command_line)}</pre>")


def metric_cards(metrics: dict) -> str:
    cards = [f'<div class="card"><div class="v">{esc(number(v))}</div><div class="k">{esc(k.replace("_", " "))}</div></div>'
             for k, v in metrics.items() if v is not None]
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def model_section(manifest) -> str:
    described = get_kind(manifest.model.kind).describe(manifest)
    options = {k: v for k, v in manifest.options.items() if v is not None}
    return (f"<h2>What was run</h2><p>{esc(described.what)}</p>"
            + table(["", ""], described.rows)
            + "<details><summary>all options</summary>"
            + table(["option", "value"], sorted((k, json.dumps(v) if not isinstance(v, str) else v)
                                                for k, v in options.items()))
            + "</details>")


def why_section(folder: Path) -> str:
    """auto's measurements, the table's cell and the reasons (auto.json), if the run was made by `auto`."""
    auto = read_json(folder / "auto.json")
    if not isinstance(auto, dict) or not isinstance(auto.get("advice"), dict):
        return ""
    advice = auto["advice"]
    cell = advice.get("cell") or {}
    parts = [f"<h2>Why this strategy</h2><p><code>auto</code> measured the data and chose the cell <b>{esc(cell.get('data'))} "
             f"data, {esc(cell.get('domain'))} domain</b> of the notes' table: strategy "
             f"<b>{esc(advice.get('strategy'))}</b>.</p>"]
    reasons = advice.get("reasons") or []
    if reasons:
        parts.append("<ul>" + "".join(f"<li>{esc(r)}</li>" for r in reasons) + "</ul>")
    probes = advice.get("probes") or {}
    if probes:
        parts.append(table(["linear probe", "CV accuracy"], [(k, number(v)) for k, v in probes.items()],
                           [False, True]))
    return "".join(parts)


def data_section(manifest, folder: Path) -> str:
    data = manifest.data
    if data is None:
        return ""
    parts = [f"<h2>Data</h2><p>From <code>{esc(data.source)}</code>: "
             + ", ".join(f"{esc(k)} {v}" for k, v in data.splits.items())
             + f" images; {data.skipped} file(s) skipped.</p>"]
    if data.classes:
        counts = list(data.classes.values())
        parts.append(table(["class", "images"], list(data.classes.items()), [False, True]))
        if counts and max(counts) > 2 * max(min(counts), 1):
            parts.append('<p class="note">The classes are imbalanced (largest more than twice the smallest); '
                         "heads weigh classes against it, and per-class recall below tells how it went.</p>")
    skipped = read_json(folder / "skipped.json", [])
    if skipped:
        shown = skipped[:50]
        parts.append("<h3>Skipped files</h3>" + table(["file", "why"], [(s["path"], s["reason"]) for s in shown]))
        if len(skipped) > len(shown):
            parts.append(f"<p>... and {len(skipped) - len(shown)} more (skipped.json).</p>")
    return "".join(parts)










def evaluation_section(folder: Path, title: str) -> str:
    """Scores, confusion matrix, per-class table, mistakes and overlays of one evidence folder."""
    metrics = read_json(folder / "metrics.json")
    if not isinstance(metrics, dict):
        return ""
    parts = [f"<h2>{esc(title)}</h2>"]
    cards = {"accuracy": metrics.get("accuracy"), "top-5 accuracy": metrics.get("top5_accuracy"),
             "images": metrics.get("images"), "skipped": metrics.get("skipped")}
    if "accuracy_without_tta" in metrics:
        cards = {"accuracy with TTA": metrics.get("accuracy"), "accuracy without TTA": metrics.get(
            "accuracy_without_tta"), "TTA views": metrics.get("tta_views"), **{k: v for k, v in cards.items()
                                                                                if k != "accuracy"}}
    parts.append(metric_cards(cards))
    if isinstance(metrics.get("tta"), str):
        parts.append(f"<p>{esc(metrics['tta'])}</p>")
    per_class = metrics.get("per_class") or {}
    parts.append('<div class="grid">')
    parts.append(figure(folder / "confusion.png", "Confusion matrix: true classes down, predictions across.",
                        "wide"))
    if per_class:
        rows = [(name, number(r.get("precision")), number(r.get("recall")), number(r.get("f1")), r.get("support"))
                for name, r in per_class.items()]
        parts.append("<div>" + table(["class", "precision", "recall", "F1", "images"], rows,
                                     [False, True, True, True, True]) + "</div>")
    parts.append("</div>")
    mistakes = read_json(folder / "mistakes.json", []) or []
    if mistakes:
        items = []
        for entry in mistakes:
            tag = image_tag(folder / entry["thumbnail"], Path(entry["path"]).name) if entry.get("thumbnail") else ""
            items.append(f"<figure>{tag}<figcaption><b>{esc(entry['predicted'])}</b> {entry['score']:.2f}<br>"
                         f"true: {esc(entry['true'])}<br><span class=\"mono\">{esc(Path(entry['path']).name)}"
                         "</span></figcaption></figure>")
        parts.append("<h3>The most confident mistakes</h3>"
                     f'<div class="grid gallery">{"".join(items)}</div>')
    overlays = read_json(folder / "gradcam.json")
    if isinstance(overlays, dict) and overlays.get("error"):
        parts.append(f'<p class="note">No heat maps: {esc(overlays["error"])}</p>')
    elif overlays:
        method = overlays[0].get("method", "grad-cam")
        items = [figure(folder / entry["overlay"], f"{Path(entry['path']).name}: {entry['method']} at "
                        f"{entry['layer']}") for entry in overlays]
        what = ("Grad-CAM: where the class score's gradient weighs the feature maps most" if "grad-cam" in method
                else "Occlusion sensitivity (the head has no useful gradient): how much covering each region "
                     "lowers the class probability")
        parts.append(f"<h3>Where the model looks</h3><p>{esc(what)}. A few held-out images: the most "
                     "confident mistakes first, then confident right answers.</p>"
                     f'<div class="grid overlays">{"".join(items)}</div>')
    return "".join(parts)


def views_section(folder: Path) -> str:
    """The test-time views measured on the run's held-out images (``tta.json``) and what --tta uses."""
    from cnnkit.tta import CHOICE_FILE, TTAChoice

    try:  # the file this run is writing, read through the same strict schema as Run.tta_choice
        choice = TTAChoice.model_validate_json((folder / CHOICE_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return ""
    rows = [(s.name, s.views, number(s.accuracy), number(s.log_loss), s.fixed, s.broken) for s in choice.scores]
    best = next(i for i, s in enumerate(choice.scores) if s.name == choice.chosen)
    return ("<h2>Test-time augmentation</h2><p>Each view set's score on the run's held-out images, and how "
            "many of the plain image's wrong answers it fixed and right ones it broke (highlighted: what "
            f"<code>--tta</code> averages). {esc(choice.line())}.</p>"
            + table(["views", "forward passes", "accuracy", "log loss", "fixed", "broken"], rows,
                    [False, True, True, True, True, True], best))


def evidence_folders(folder: Path) -> list[tuple[str, Path]]:
    """The run's own evidence folders, test before validation."""
    found = []
    for split, title in (("test", "Test images"), ("val", "Validation images"), ("data", "Evaluation data"),
                         ("cv", "Training images, cross-validated (each predicted by the head refitted without "
                                "its fold)")):
        if (folder / "heldout" / split / "metrics.json").is_file():
            found.append((title, folder / "heldout" / split))
    return found


def render(folder: Path, manifest, extra: Sequence[tuple[str, Path]] = (), name: str | None = None) -> str:
    """The whole page for the run in ``folder`` described by ``manifest``, with ``extra`` evidence folders first."""
    from importlib.resources import files

    if name is None:  # the folder may be the hidden one a run is built in: name it by its data
        name = Path(manifest.data.source).name if manifest.data else f"{len(manifest.options.get('members', []))} runs"
    body = [header(manifest, name), metric_cards(manifest.metrics)]
    for title, evidence in extra:
        body.append(evaluation_section(evidence, title))
    body += [why_section(folder), model_section(manifest), data_section(manifest, folder),
             *get_kind(manifest.model.kind).report_sections(manifest, folder), views_section(folder)]
    for title, evidence in evidence_folders(folder):
        body.append(evaluation_section(evidence, title))
    body.append("<footer>Written by cnnkit. This page is self-contained: every image is inside it, and it "
                "loads nothing from anywhere.</footer>")
    template = Template(files("cnnkit").joinpath("resources/report.html").read_text("utf-8"))
    return template.substitute(title=esc(f"cnnkit {manifest.command}: {name}"), body="\n".join(s for s in body if s))


def write_report(folder: Path, manifest) -> None:
    """The attach hook: ``report.html`` in a run being written (see ``cnnkit.runs.Attachment``)."""
    (Path(folder) / REPORT).write_text(render(Path(folder), manifest), encoding="utf-8")

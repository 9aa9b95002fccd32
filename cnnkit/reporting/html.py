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

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from string import Template

REPORT = "report.html"


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def image_tag(path: Path, alt: str, width: int | None = None) -> str:
    """An <img> with the PNG at ``path`` inlined; empty when the file is absent."""
    if not path.is_file():
        return ""
    return png_tag(path.read_bytes(), alt, width)


def png_tag(data: bytes, alt: str, width: int | None = None) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    size = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}"{size}>'


def figure(path: Path, caption: str, css: str = "") -> str:
    tag = image_tag(path, caption)
    if not tag:
        return ""
    return f'<figure class="{css}">{tag}<figcaption>{esc(caption)}</figcaption></figure>'


def table(headers: Sequence[str], rows: Sequence[Sequence], numeric: Sequence[bool] | None = None,
          best: int | None = None) -> str:
    numeric = numeric or [False] * len(headers)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers) if any(headers) else ""
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="num">{esc(c)}</td>' if n else f"<td>{esc(c)}</td>"
                        for c, n in zip(row, numeric))
        body.append(f'<tr class="best">{cells}</tr>' if i == best else f"<tr>{cells}</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return default


def read_history(path: Path) -> dict[str, list]:
    """history.csv (Keras' CSVLogger) as columns; numbers where they parse."""
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                columns.setdefault(key, []).append(value)
    return columns


def learning_rate_png(history: dict[str, list]) -> bytes | None:
    """The learning rate per epoch, log scale, as PNG bytes (None without a rate column)."""
    key = next((k for k in ("learning_rate", "lr") if history.get(k)), None)
    if key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r for r in history[key] if isinstance(r, float)]
    if not rates:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(rates) + 1), rates, marker="o")
    if min(rates) > 0:
        ax.set_yscale("log")
    phases = history.get("phase", [])
    for i in range(1, len(phases)):
        if phases[i] != phases[i - 1]:
            ax.axvline(i + 0.5, color="gray", linestyle=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def png_bytes(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes (for inlining), closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


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
    m = manifest.model
    if m.kind == "feature_head":
        rows = [("backbone", f"{m.backbone} ({m.weights} weights)"), ("stages", ", ".join(m.layers)),
                ("pooling", m.pool + (f", {m.grid} x {m.grid} regions below the last stage" if m.grid > 1 else "")
                 + (", flip-averaged" if m.flip else "")),
                ("head", m.head), ("PCA", f"{m.pca}{' whitened' if m.whiten else ''}"),
                ("L2-normalised", "yes" if m.l2_normalize else "no"),
                ("chosen by cross-validation", ", ".join(f"{k}={v}" for k, v in m.best_params.items()) or "-"),
                ("CV folds", m.cv_folds), ("feature dimensions", m.feature_dims)]
        what = ("A pretrained network as a fixed feature extractor: pooled activations of the stages below, "
                "then a classical head fitted on them (the notes' first level of use).")
    elif m.kind == "network":
        rows = [("backbone", f"{m.backbone} ({m.weights} weights)"),
                ("frozen through", m.freeze),
                ("predicts", "averaged with the mirror image (--flip)" if m.flip else "the image as given"),
                ("epochs run", m.epochs_run), ("best epoch", m.best_epoch),
                ("interrupted", "yes (resumable with --resume)" if m.interrupted else "no")]
        what = ("Fine-tuning: a new classifier on the pretrained network, the stages up to the frozen one kept "
                "fixed, the rest trained." if manifest.command == "finetune" else
                "Training every layer of the network.")
    else:
        rows = [("members", len(m.members))]
        what = "An ensemble: the weighted mean of its members' class probabilities."
    options = {k: v for k, v in manifest.options.items() if v is not None}
    return (f"<h2>What was run</h2><p>{esc(what)}</p>"
            + table(["", ""], [(k, v) for k, v in rows])
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
    ensemble = auto.get("ensemble")
    if isinstance(ensemble, dict) and len(ensemble.get("candidates") or []) == 2:
        (first, second), members = ensemble["candidates"], ensemble.get("members") or [None, None]
        verdict = "it did, so this run is their ensemble" if ensemble.get("helps") else "it did not"
        parts.append(f"<p>Would averaging the two best candidates help? {esc(first['layers'])} {esc(first['head'])} "
                     f"({number(members[0])}) and {esc(second['layers'])} {esc(second['head'])} "
                     f"({number(members[1])}) averaged scored {number(ensemble.get('ensemble'))} by "
                     f"cross-validation on the same folds: {verdict}.</p>")
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


def cv_section(manifest) -> str:
    m = manifest.model
    if m.kind != "feature_head":
        return ""
    tried = [t for t in m.tried if isinstance(t, dict)]
    if not tried:
        return ("<h2>Cross-validation</h2><p>One configuration was fitted; "
                f"its {m.cv_folds}-fold CV accuracy is {esc(number(manifest.metrics.get('cv_accuracy')))}.</p>")
    scored = [t.get("cv_accuracy") if isinstance(t.get("cv_accuracy"), float) else -1.0 for t in tried]
    best = max(range(len(tried)), key=lambda i: scored[i])
    rows = [(t.get("layers"), t.get("head"), number(t.get("cv_accuracy")) if t.get("cv_accuracy") is not None
             else t.get("error", "-"), ", ".join(f"{k}={v}" for k, v in (t.get("best_params") or {}).items()))
            for t in tried]
    chart = cv_png([f"{t.get('layers')} {t.get('head')}" for t in tried], scored, best)
    chart = f"<figure>{png_tag(chart, 'CV accuracy of each candidate')}<figcaption>CV accuracy of each " \
            "candidate (green: chosen).</figcaption></figure>" if chart else ""
    return ("<h2>What was tried (cross-validation)</h2><p>Each stage set and head scored by stratified "
            "cross-validation on the training images; the best (highlighted) was fitted on all of them.</p>"
            + '<div class="grid"><div>'
            + table(["stages", "head", "CV accuracy", "best parameters"], rows, [False, False, True, False], best)
            + f"</div>{chart}</div>")


def cv_png(labels: Sequence[str], scores: Sequence[float], best: int) -> bytes | None:
    """Horizontal bars of each candidate's CV accuracy, the chosen one green (None if none scored)."""
    if not any(s >= 0 for s in scores):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 0.45 * len(labels) + 1.0))
    values = [max(s, 0.0) for s in scores]
    colours = ["#2e9d4a" if i == best else "#7a8fa6" for i in range(len(labels))]
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    low = min(v for v in values if v > 0) if any(v > 0 for v in values) else 0.0
    ax.set_xlim(max(0.0, low - 0.1), 1.0)
    ax.set_xlabel("CV accuracy")
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:.3f}", va="center", fontsize=8)
    return png_bytes(fig)


def training_section(manifest, folder: Path) -> str:
    if manifest.model.kind != "network":
        return ""
    report = read_json(folder / "report.json", {}) or {}
    history = read_history(folder / "history.csv")
    mode = manifest.command
    parts = ["<h2>Training</h2>"]
    diagnosis = report.get("diagnosis") or []
    if diagnosis:
        parts.append(f"<h3>Diagnosis ({esc(mode)} run)</h3><ul>"
                     + "".join(f"<li>{esc(d)}</li>" for d in diagnosis) + "</ul>")
    sanity = report.get("sanity")
    if isinstance(sanity, dict):
        verdict = "passed" if sanity.get("passed") else "FAILED"
        parts.append(f'<p class="{"ok" if sanity.get("passed") else "note"}">Sanity check {verdict}: the loss on two '
                     f"batches fell from {number(sanity.get('initial_loss'))} to {number(sanity.get('final_loss'), 4)} "
                     f"in {esc(sanity.get('steps'))} steps.</p>")
    figures = [figure(folder / "plots" / "loss.png", "Loss per epoch: too noisy means a bigger batch; "
                      "rising means too high a learning rate."),
               figure(folder / "plots" / "accuracy.png", "Train vs validation accuracy: a big gap means "
                      "overfitting (more regularization), no gap means too little capacity.")]
    rate = learning_rate_png(history)
    if rate:
        figures.append(f"<figure>{png_tag(rate, 'learning rate')}<figcaption>Learning rate per epoch (dotted: "
                       "phase change; drops: the schedule and the /10 on plateaus).</figcaption></figure>")
    figures.append(figure(folder / "plots" / "update_ratio.png", "Update/weight ratio per stage; the notes' "
                          "rule of thumb is about 1e-3 (dashed)."))
    figures.append(figure(folder / "plots" / "first_layer_filters.png", "First-layer filters: smooth, "
                          "structured filters are healthy; noisy ones mean too little regularization."))
    parts.append('<div class="grid">' + "".join(f for f in figures if f) + "</div>")
    if history.get("loss"):
        keys = [k for k in ("phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
                            "seconds", "images_per_s") if k in history]
        rows = [[number(history[k][i], 4) if isinstance(history[k][i], float) else history[k][i] for k in keys]
                for i in range(len(history["loss"]))]
        parts.append("<details><summary>history.csv</summary>"
                     + table(["epoch", *keys], [[i + 1, *r] for i, r in enumerate(rows)],
                             [True] + [k != "phase" for k in keys]) + "</details>")
    return "".join(parts)


def ensemble_section(manifest, folder: Path) -> str:
    m = manifest.model
    if m.kind != "ensemble":
        return ""
    rows = []
    for i, member in enumerate(m.members):
        data = read_json(folder / member.path / "manifest.json", {}) or {}
        model = data.get("model") or {}
        metrics = data.get("metrics") or {}
        what = model.get("kind", "?")
        if model.get("kind") == "feature_head":
            what = f"feature head: {model.get('backbone')} {','.join(model.get('layers') or [])} + {model.get('head')}"
        elif model.get("kind") == "network":
            what = f"{data.get('command')}: {model.get('backbone')}, frozen through {model.get('freeze')}"
        rows.append((i, member.path, what, f"{member.weight:.3f}", number(metrics.get("cv_accuracy")),
                     number(metrics.get("val_accuracy")), number(metrics.get("test_accuracy")),
                     member.seal[:12]))
    return ("<h2>Members</h2><p>Each member is a sealed copy inside this run, pinned by its seal; the ensemble "
            "averages their probabilities with these weights.</p>"
            + table(["#", "folder", "model", "weight", "CV", "validation", "test", "seal"], rows,
                    [True, False, False, True, True, True, True, False]))


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
    body += [why_section(folder), model_section(manifest), data_section(manifest, folder), cv_section(manifest),
             ensemble_section(manifest, folder), training_section(manifest, folder)]
    for title, evidence in evidence_folders(folder):
        body.append(evaluation_section(evidence, title))
    body.append("<footer>Written by cnnkit. This page is self-contained: every image is inside it, and it "
                "loads nothing from anywhere.</footer>")
    template = Template(files("cnnkit").joinpath("resources/report.html").read_text("utf-8"))
    return template.substitute(title=esc(f"cnnkit {manifest.command}: {name}"), body="\n".join(s for s in body if s))


def write_report(folder: Path, manifest) -> None:
    """The attach hook: ``report.html`` in a run being written (see ``cnnkit.runs.Attachment``)."""
    (Path(folder) / REPORT).write_text(render(Path(folder), manifest), encoding="utf-8")

"""HTML building blocks of cnnkit's reports: escaping, inline images, tables, and the charts no file holds.

Every section of ``report.html`` -- the page's own (``cnnkit.reporting.html``)
and each run kind's (``cnnkit.kinds``) -- is built from these. Images are
inlined as base64 ``data:`` URIs; every string that came from a user (file and
class names, paths) goes through ``esc``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path


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

"""label-next's ``report.html``: a contact sheet of the images to label, one self-contained page.

Each picked image as a thumbnail (inlined PNG, like every cnnkit report: the page
loads nothing and can be mailed as one file), with its rank, file, why it was
picked and -- where there is a run -- the run's current guess and confidence, so a
person can label from the page alone. Built from ``cnnkit.reporting.markup`` and the
page template of ``report.html`` (``cnnkit/resources/report.html``); needs no
TensorFlow.
"""

from __future__ import annotations

import io
from pathlib import Path
from string import Template

from cnnkit.reporting.markup import esc, png_tag, table

THUMBNAIL_SIDE = 160


def thumbnail_png(path: Path, side: int = THUMBNAIL_SIDE) -> bytes | None:
    """A PNG of the image shrunk to fit ``side`` x ``side`` (small images enlarged, pixels kept sharp); ``None``
    where the file cannot be shown. Opened as every reader of a user's image is (``cnnkit.data.images.open_image``:
    the six formats' decoders only, the declared size checked before any pixel exists)."""
    from PIL import Image

    from cnnkit.data.images import open_image

    try:
        with open_image(path) as image:
            image = image.convert("RGB")
            scale = side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            buffer = io.BytesIO()
            image.resize(size, resample).save(buffer, "PNG")
            return buffer.getvalue()
    except Exception:  # noqa: BLE001 - as in cnnkit.data.images: on a file not ours to trust, any error means "cannot show"
        return None


def pick_figure(rank: int, pick) -> str:
    data = thumbnail_png(Path(pick.path))
    image = png_tag(data, f"#{rank} {Path(pick.path).name}") if data else "<p>(cannot show this image)</p>"
    guess = (f"<br><b>guess: {esc(pick.guess)}</b> {pick.confidence:.2f}" if pick.guess is not None else "")
    return (f"<figure>{image}<figcaption><b>#{rank}</b> <code>{esc(Path(pick.path).name)}</code>{guess}"
            f"<br>{esc(pick.why)}</figcaption></figure>")


def render_sheet(found, marker: str = "") -> str:
    """The page for a ``cnnkit.labelling.LabelNext`` result; ``marker`` (a meta tag) goes first in the body."""
    from importlib.resources import files

    title = f"cnnkit label-next: {len(found.picks)} images to label"
    counts = [("images in the pool", found.pool), ("left to pick from", found.candidates),
              ("already labelled (by content)", found.already_labelled), ("duplicates", found.duplicates),
              ("unreadable", len(found.failures))]
    body = [marker,
            f"<h1>{esc(title)}</h1>",
            f'<p class="sub">Rule <b>{esc(found.rule)}</b>: {esc(found.reason)}.</p>',
            table(["", ""], [(k, v) for k, v in counts if v or k.startswith(("images", "left"))], [False, True]),
            "<p>Label them in this order (best first): sort each file into a folder named after its class, "
            "then run <code>cnnkit auto</code> on the folder of class folders. The same list is in "
            "<code>to_label.csv</code>.</p>",
            '<div class="grid gallery">' + "".join(pick_figure(rank, pick)
                                                   for rank, pick in enumerate(found.picks, start=1)) + "</div>",
            "<h2>Files</h2>",
            table(["#", "file", "why"] + (["guess", "confidence"] if found.class_names else []),
                  [[rank, str(p.path), p.why] + ([p.guess, f"{p.confidence:.2f}"] if found.class_names else [])
                   for rank, p in enumerate(found.picks, start=1)]),
            "<footer>Written by cnnkit label-next. This page is self-contained: every image is inside it, and "
            "it loads nothing from anywhere.</footer>"]
    template = Template(files("cnnkit").joinpath("resources/report.html").read_text("utf-8"))
    return template.substitute(title=esc(title), body="\n".join(part for part in body if part))

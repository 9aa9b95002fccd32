"""doctor's ``report.html``: what is wrong with a dataset, one self-contained page.

A table of the findings per kind (count, action, what to do), then a gallery per kind with
inlined thumbnails (PNG, at most ``THUMBNAIL_SIDE`` px, like every cnnkit report: the page loads
nothing and can be mailed as one file): the two files of a pair side by side (a leak's training
file and the held-out file it copies, a duplicate and its original), a suspected label error with
its given and suggested class and score, outliers and the worst images of each property kind.
Each gallery shows at most ``GALLERY_CAP`` items and says how many more ``issues.csv`` holds.
Unreadable files are listed by name. Any kind is shown, known to ``ADVICE`` or not. Built from
``cnnkit.reporting.markup`` and the page template of ``report.html``; needs no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from string import Template

from cnnkit.reporting.label_sheet import thumbnail_png
from cnnkit.reporting.markup import esc, png_tag, table

THUMBNAIL_SIDE = 96
GALLERY_CAP = 60
MARKER = "<!-- written by cnnkit doctor -->"

# One line per kind: what to do about its findings. A kind not here gets its action's line.
ADVICE = {
    "unreadable": "cannot be decoded: re-export or delete them; training skips them anyway",
    "leak": "a training image that copies a val/test image: exclude it, or the test score is inflated",
    "held-out-label": "a held-out image whose label looks wrong: fix its label, or the test score misleads",
    "exact-duplicate": "the same bytes twice: exclude the copy (and check both carry the same label)",
    "label-error": "probably in the wrong class folder: move it to the suggested class, or exclude it",
    "outlier": "unlike every other image: check it belongs in the dataset at all",
    "blank": "near-constant image: usually a failed capture or export; exclude it",
    "near-duplicate": "a re-encoded, resized or shifted copy: exclude it so it is not counted twice",
    "dark": "very dark: fine if real data looks like this, else fix the exposure",
    "light": "very light: fine if real data looks like this, else fix the exposure",
    "blurry": "little fine detail: fine if real data looks like this",
    "tiny": "very small image: upscaled for the network, little to learn from",
    "odd-aspect": "unusual shape: squashed to a square for the network; consider cropping",
    "grey-as-colour": "grey stored as colour: harmless, worth knowing if the rest is colour",
}
ACTION_ADVICE = {"exclude": "`--exclude issues.csv` leaves these out of training",
                 "review": "worth a look; not wrong in itself"}


def advice(kind: str, action: str) -> str:
    return ADVICE.get(kind) or ACTION_ADVICE.get(action, "see issues.csv")


def ordered_kinds(diagnosis) -> list[str]:
    """The kinds found, in the order of ``cnnkit.doctor.KINDS`` (most serious first), unknown ones last."""
    from cnnkit.doctor import KINDS

    found = list(dict.fromkeys(f.kind for f in diagnosis.findings))
    known = [kind for kind in KINDS if kind in found]
    return known + [kind for kind in found if kind not in known]


def _image(path: str, alt: str) -> str:
    data = thumbnail_png(Path(path), THUMBNAIL_SIDE)
    return png_tag(data, alt) if data else f"<p>(cannot show {esc(Path(path).name)})</p>"


def _short(path: str) -> str:
    """The file's split and class folders and its name: enough to find it, short enough for a caption."""
    return "/".join(Path(path).parts[-3:])


def finding_figure(finding) -> str:
    """A thumbnail (two, side by side, for a pair) and a caption: file(s), score, classes, detail."""
    images = _image(finding.path, _short(finding.path))
    names = f"<code>{esc(_short(finding.path))}</code>"
    if finding.other:
        images = (f'<div style="display:flex;gap:0.3em">{images}{_image(finding.other, _short(finding.other))}'
                  "</div>")
        names += f" &amp; <code>{esc(_short(finding.other))}</code>"
    classes = ""
    if finding.given and finding.suggested:
        classes = f"<br><b>{esc(finding.given)} &rarr; {esc(finding.suggested)}</b>"
    elif finding.given:
        classes = f"<br>class {esc(finding.given)}"
    split = f" ({esc(finding.split)})" if finding.split else ""
    detail = f"<br>{esc(finding.detail)}" if finding.detail else ""
    return (f'<figure title="{esc(finding.path)}">{images}<figcaption>{names}{split}'
            f"<br>score {finding.score:.3f}{classes}{detail}</figcaption></figure>")


def kind_section(kind: str, findings: list, action: str) -> str:
    shown = findings[:GALLERY_CAP]
    more = len(findings) - len(shown)
    head = (f'<h2 id="{esc(kind)}">{esc(kind)}: {len(findings)} ({esc(action)})</h2>'
            f'<p class="sub">{esc(advice(kind, action))}.</p>')
    if kind == "unreadable":
        body = table(["file", "why"], [(f.path, f.detail) for f in shown])
    else:
        body = '<div class="grid">' + "".join(finding_figure(f) for f in shown) + "</div>"
    tail = f"<p>... and {more} more in <code>issues.csv</code>.</p>" if more else ""
    return head + body + tail


def render_report(diagnosis, marker: str = MARKER) -> str:
    """The page for a ``cnnkit.doctor.Diagnosis``; ``marker`` goes first in the body."""
    from importlib.resources import files

    kinds = ordered_kinds(diagnosis)
    actions = {kind: next(f.action for f in diagnosis.findings if f.kind == kind) for kind in kinds}
    title = f"cnnkit doctor: {diagnosis.source}"
    excluded = sum(1 for f in diagnosis.findings if f.action == "exclude")
    splits = sorted(diagnosis.counts, key=lambda s: (["train", "val", "test", s].index(s), s))
    count_rows = [[name] + [diagnosis.counts[split].get(name, 0) for split in splits]
                  for name in diagnosis.class_names]
    imbalance = diagnosis.imbalance
    body = [marker,
            f"<h1>{esc(title)}</h1>",
            f'<p class="sub">{diagnosis.images} files, {len(diagnosis.class_names)} classes, '
            f"{len(diagnosis.findings)} findings ({excluded} marked exclude).</p>",
            "<h2>Findings per kind</h2>",
            table(["kind", "count", "action", "what to do"],
                  [(kind, len(diagnosis.of_kind(kind)), actions[kind], advice(kind, actions[kind]))
                   for kind in kinds], [False, True, False, False])
            if kinds else '<p class="ok">Nothing found.</p>',
            "".join(f'<p class="note">{esc(note)}</p>' for note in diagnosis.notes),
            "<h2>Classes</h2>",
            table(["class"] + splits, count_rows, [False] + [True] * len(splits)),
            f"<p>Imbalance of the training split (largest / smallest class): "
            f"{'-' if imbalance == float('inf') else f'{imbalance:.1f}'}</p>",
            *(kind_section(kind, diagnosis.of_kind(kind), actions[kind]) for kind in kinds),
            "<footer>Written by cnnkit doctor. Every finding is a row of <code>issues.csv</code>; "
            "<code>cnnkit auto DATA --exclude issues.csv</code> trains without the rows marked exclude. "
            "This page is self-contained: every image is inside it, and it loads nothing from anywhere.</footer>"]
    template = Template(files("cnnkit").joinpath("resources/report.html").read_text("utf-8"))
    return template.substitute(title=esc(title), body="\n".join(part for part in body if part))


CSV_NAME = "issues.csv"
REPORT_NAME = "report.html"


def check_out(out: str | Path) -> None:
    """Refuse, before any work, an ``--out`` doctor may not write into.

    ``out`` may be missing, empty, or an earlier doctor output: a folder holding nothing but an
    ``issues.csv`` with doctor's header and a ``report.html`` with doctor's marker (those two are
    then replaced). Anything else -- a file, a folder with other files -- is refused in one line.
    """
    from cnnkit.doctor import CSV_COLUMNS
    from cnnkit.errors import CnnkitError

    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise CnnkitError(f"--out {out}: is a file; give a new or empty folder")
    for entry in sorted(out.iterdir()):
        if entry.name == CSV_NAME and entry.is_file() and _first_line(entry) == ",".join(CSV_COLUMNS):
            continue
        if entry.name == REPORT_NAME and entry.is_file() and MARKER in _head(entry):
            continue
        raise CnnkitError(f"--out {out}: holds {entry.name}, which doctor did not write; refusing to write "
                          "there -- give a new or empty folder")


def _head(path: Path) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return handle.read(1 << 16)
    except OSError:
        return ""


def _first_line(path: Path) -> str:
    return (_head(path).splitlines() or [""])[0].lstrip("\ufeff").strip()


def write_outputs(diagnosis, out: str | Path) -> list[Path]:
    """``issues.csv`` (``Diagnosis.write_csv``) and ``report.html`` in ``out``, each written atomically."""
    from cnnkit.paths import atomic_write

    out = Path(out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = atomic_write(out / CSV_NAME, diagnosis.write_csv)
    report_path = atomic_write(out / REPORT_NAME, render_report(diagnosis))
    return [csv_path, report_path]

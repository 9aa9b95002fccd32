"""`--exclude FILE`: the files to leave out of a dataset, without touching its folder.

FILE is either the ``issues.csv`` that `cnnkit doctor` writes (its rows whose
``action`` is ``exclude``; ``review`` rows are only for a person to look at) or
a plain list of paths, one a line. Leaving files out at load time keeps the
user's folder as it was and lets the run record what it did not learn from.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cnnkit.data.dataset import Dataset, load_dataset
from cnnkit.errors import CnnkitError

# What `--exclude` says to do when FILE cannot be used.
_WHAT = "give an issues.csv of `cnnkit doctor` or a list of paths, one a line"


def _resolve(text: str, folder: Path) -> Path:
    """``text`` as an absolute path: relative to the current folder, or else to ``folder`` (the file's own).

    A list written where the command runs (`find ... > list.txt`) names paths from the current
    folder; one kept beside the data names them from its own folder: the first that exists wins.
    """
    path = Path(text).expanduser()
    if not path.is_absolute():
        here = Path.cwd() / path
        path = here if here.exists() or not (folder / path).exists() else folder / path
    return path.resolve()


def _csv_rows(text: str, file: Path) -> list[tuple[int, str]]:
    """(line, path) of an issues.csv's rows to exclude: ``action`` = exclude, or every row without ``action``."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [cell.strip().lower() for cell in next(reader, [])]
    if "path" not in header:
        raise CnnkitError(f"--exclude {file}:1: a CSV without a 'path' column; {_WHAT}")
    path_at, action_at = header.index("path"), header.index("action") if "action" in header else None
    rows = []
    start = 2
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if action_at is not None and (len(row) <= action_at or row[action_at].strip().lower() != "exclude"):
                continue
            if len(row) <= path_at or not row[path_at].strip():
                raise CnnkitError(f"--exclude {file}:{line}: empty path; give every row to exclude its file's path")
            rows.append((line, row[path_at].strip()))
    except csv.Error as error:
        raise CnnkitError(f"--exclude {file}:{start}: {error}; {_WHAT}") from None
    return rows


def _list_rows(text: str) -> list[tuple[int, str]]:
    """(line, path) of a plain list: one path a line; blank lines and ``#`` comments skipped."""
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")]


def read_exclusions(path: str | Path) -> set[Path]:
    """The resolved absolute paths that ``path`` (an issues.csv or a list of paths) says to leave out.

    A ``.csv`` file, or one whose first line has a ``path`` column among commas, is read as a
    CSV; anything else as a list. Safe on any file: the text is only parsed (nothing in it is evaluated), FILE is
    never written, and a path in it is only compared with the dataset's paths, never opened.

    Raises:
        CnnkitError: one line naming FILE (and the line) and what to do: no such file, not
            UTF-8, a CSV without a ``path`` column, or nothing listed to exclude.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CnnkitError(f"--exclude {file}: no such file; {_WHAT}") from None
    except UnicodeDecodeError:
        raise CnnkitError(f"--exclude {file}: not UTF-8 text; save it as UTF-8") from None
    except OSError as error:
        raise CnnkitError(f"--exclude {file}: cannot read it ({error.strerror or error})") from None
    first = next((line for line in text.splitlines() if line.strip()), "")
    is_csv = file.suffix.lower() == ".csv" or (
        "," in first and "path" in [cell.strip().lower() for cell in next(csv.reader([first]))])
    rows = _csv_rows(text, file) if is_csv else _list_rows(text)
    if not rows:
        what = "no rows to exclude (action 'exclude')" if is_csv else "no paths (only blank lines or # comments)"
        raise CnnkitError(f"--exclude {file}: {what}; {_WHAT}, or drop --exclude")
    folder = file.resolve().parent
    paths = set()
    for line, text in rows:
        try:
            paths.add(_resolve(text, folder))
        except (OSError, ValueError, RuntimeError) as error:  # a NUL byte, a name too long, a link loop
            reason = getattr(error, "strerror", None) or error
            raise CnnkitError(f"--exclude {file}:{line}: not a usable path ({reason})") from None
    return paths


def load_excluding(data: str | Path, exclude: str | Path | None, **kwargs) -> Dataset:
    """``load_dataset(data, **kwargs)`` without the files that the file ``exclude`` lists (``None``: all files)."""
    if not exclude:
        return load_dataset(data, **kwargs)
    return load_dataset(data, exclude=read_exclusions(exclude), exclude_file=exclude, **kwargs)


def left_out_line(dataset: Dataset, exclude: str | Path) -> str:
    """What the commands print: ``left out 12 files listed in issues.csv`` (and how many it lists that DATA lacks)."""
    line = f"left out {len(dataset.excluded)} file(s) listed in {Path(exclude).name}"
    if dataset.unmatched:
        line += f" ({dataset.unmatched} of its paths are not in {Path(dataset.source).name})"
    return line

"""The run directory: a trained model that predict, evaluate, similar and export read.

```
RUN/
  manifest.json   format, versions, strategy, backbone, layers, input size,
                  class names, metrics, data fingerprint, SHA-256 of every file
  head.skops      classical head (extract runs)
  model.keras     the whole network from raw pixels (finetune/train runs)
  index/          training features for `similar`: features.npy, labels.npy, paths.json
```

A run is written to a hidden temporary folder beside its destination and
renamed into place when complete, so an interrupted job never leaves half a
run, and an existing run is only replaced with ``force``. Loading checks every
file against the manifest's checksums and never unpickles or executes code
from the files.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError
from cnnkit.paths import file_digest

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def check_destination(out: Path, force: bool) -> None:
    """Fail early, before any work, if ``out`` exists and may not be replaced."""
    if out.exists() and not force:
        raise CnnkitError(f"--out {out}: already exists; choose another folder or pass --force to replace it")
    if out.exists() and not (out / MANIFEST).exists():
        raise CnnkitError(f"--out {out}: exists and is not a cnnkit run; refusing to replace it")


def write_run(out: str | Path, manifest: dict, write_files: Callable[[Path], None],
              force: bool = False) -> Path:
    """Write a run atomically.

    Args:
        out: destination folder.
        manifest: what to record; format, version, date and checksums are added.
        write_files: called with the temporary folder to write the model files in.
        force: replace an existing run at ``out``.
    """
    from cnnkit import __version__

    out = Path(out)
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_files(tmp)
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT_VERSION,
            "cnnkit_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **manifest,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class Run:
    """A loaded run: its manifest and lazily loaded model."""

    path: Path
    manifest: dict

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def strategy(self) -> str:
        return self.manifest["strategy"]

    def file(self, name: str) -> Path:
        """A file of the run, verified against the manifest's checksum."""
        path = self.path / name
        expected = self.manifest.get("files", {}).get(name)
        if expected is None or not path.is_file():
            raise CnnkitError(f"{path}: missing from the run; re-create the run")
        if _sha256(path) != expected:
            raise CnnkitError(
                f"{path}: was modified after the run was written (checksum mismatch); "
                "refusing to load it -- re-create the run"
            )
        return path

    def load_array(self, name: str) -> np.ndarray:
        try:
            return np.load(self.file(name), allow_pickle=False)
        except ValueError as error:
            raise CnnkitError(f"{self.path / name}: not a plain array file ({error})") from None

    def load_json(self, name: str):
        try:
            return json.loads(self.file(name).read_text("utf-8"))
        except ValueError as error:
            raise CnnkitError(f"{self.path / name}: damaged JSON ({error})") from None

    def classifier(self):
        """A callable: raw ``uint8`` image batch -> class probabilities."""
        from cnnkit.models import load_classifier

        return load_classifier(self)


def load_run(path: str | Path) -> Run:
    """Read a run's manifest.

    Raises:
        CnnkitError: not a run, a damaged manifest, or a newer format.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CnnkitError(f"{path}: no such run folder")
    if not manifest_path.is_file():
        raise CnnkitError(f"{path}: not a cnnkit run (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
    except ValueError as error:
        raise CnnkitError(f"{manifest_path}: damaged ({error}); re-create the run") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise CnnkitError(f"{manifest_path}: not a cnnkit manifest")
    if manifest["format"] > FORMAT_VERSION:
        raise CnnkitError(f"{path}: written by a newer cnnkit (format {manifest['format']}); upgrade cnnkit")
    for key in ("strategy", "class_names", "image_size"):
        if key not in manifest:
            raise CnnkitError(f"{manifest_path}: lacks {key!r}; re-create the run")
    return Run(path, manifest)

"""The run folder: the one contract between what writes a model and what reads it.

extract, finetune, train, ensemble and auto write a run; predict, evaluate,
similar, explain, export and the reports read it, all through the typed
``RunManifest`` below and ``load_run``. A run folder holds:

```
RUN/
  manifest.json     RunManifest: format, versions, date, the command and strategy that made
                    the run and its equivalent command line, class names, input size and
                    preprocessing, a data summary, metrics, one section for the kind of model
                    (feature_head | network | ensemble), the SHA-256 of every file below,
                    and a seal: the SHA-256 of the manifest itself
  head.skops        feature_head: scaler -> PCA -> classifier (skops; no pickle)
  model.keras       network: the whole classifier from raw uint8 pixels to probabilities (a run
                    with model.flip averages it over the image and its mirror image)
  members/<i>/      ensemble: a sealed copy of each member run
  index/            retrieval features for `similar`: features.npy, labels.npy, paths.json
  history.csv       network: one row per epoch (loss, accuracy, validation, rate, seconds)
  plots/*.png       network: loss, accuracy, update/weight ratios, first-layer filters
  report.json       network: the diagnosis, update ratios and sanity check
  report.md         auto: what was measured, tried and chosen; auto.json the same as data
  report.html       every run: one self-contained page about it (cnnkit.reporting)
  tta.json          every run with held-out images: the test-time views measured on them and the
                    one --tta averages (cnnkit.tta.TTAChoice)
  heldout/<split>/  what report.html shows of the held-out images: scores, confusion matrix,
                    the most confident mistakes, Grad-CAM overlays (cnnkit.reporting.evidence);
                    split test, val, data (ensemble --data) or cv (an extract run that trained on
                    every image: its cross-validated predictions)
  skipped.json      the files the run could not read, and why
  excluded.txt      the files --exclude left out, one path a line
  checkpoints/      an interrupted network run: what --resume continues from
```

A run is built in a hidden folder beside its destination and renamed into
place once complete and sealed, so an interrupted job never leaves half a
run, and an existing run is only replaced with ``force``. Everything in the
folder, reports included, is written before the seal.

Loading is safe on a run someone else made: the manifest is parsed as JSON and
validated field by field; its seal and every file's checksum are verified
before any file is used; file names must stay inside the folder (no absolute
paths, ``..`` or symbolic links); nothing is ever unpickled or executed (heads
load through skops with an explicit list of trusted types, arrays with
``allow_pickle=False``, Keras models in safe mode). The checksums and the seal
detect modified or damaged runs; they are not a signature (anyone can re-seal
a run they edit).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import Field, ValidationError

from cnnkit.errors import CnnkitError
from cnnkit.kinds import Section, get_kind, registered_kinds
from cnnkit.kinds.registry import on_register
from cnnkit.options import MAX_IMAGE_SIZE, Strategy
from cnnkit.paths import file_digest, publish_folder

FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class DataSummary(Section):
    """The images a run learned from.

    ``fingerprint`` is the SHA-256 of the sorted (split, class, file name,
    size) list: it tells whether two runs saw the same files without reading
    every image again.
    """

    source: str
    fingerprint: str
    splits: dict[str, int]
    classes: dict[str, int]
    skipped: int = 0
    # Files --exclude left out (listed in excluded.txt); 0 in runs from before the option.
    excluded: int = 0


def model_sections():
    """The registered kinds' sections, told apart by their ``kind`` field: what a manifest's ``model`` may be."""
    return Annotated[Union[tuple(kind.section for kind in registered_kinds())], Field(discriminator="kind")]


class RunManifest(Section):
    """Everything cnnkit records about a run (``manifest.json``).

    Attributes:
        command: the cnnkit command that wrote the run.
        strategy: the strategy-table cell's strategy when `advise`/`auto`
            chose it (linear-top, ..., train-scratch), else ``None``.
        command_line: the equivalent command line.
        options: the command's options, as given.
        image_size: the square side images are resized to.
        crop_pct: share of the shorter side the centre crop keeps.
        preprocessing: the backbone's input scaling (inside the model).
        metrics: accuracies and the like; ``None`` where not measured.
        files: every file of the run except this manifest -> SHA-256.
        seal: SHA-256 of this manifest without the seal (see ``seal_of``).
    """

    format: int = FORMAT_VERSION
    cnnkit_version: str = ""
    created: str = ""
    command: Literal["extract", "finetune", "train", "ensemble"]
    # A strategy-table cell's name (a string in the file, as every field: manifests are read strictly).
    strategy: Literal[tuple(s.value for s in Strategy)] | None = None
    command_line: str = ""
    options: dict[str, Any] = {}
    class_names: list[str] = Field(min_length=2)
    # Bounded like --image-size: predict, evaluate and export decode every image at this size.
    image_size: int = Field(gt=0, le=MAX_IMAGE_SIZE)
    crop_pct: float = Field(default=1.0, gt=0, le=1)
    preprocessing: str
    data: DataSummary | None = None
    metrics: dict[str, float | int | None] = {}
    model: model_sections()
    files: dict[str, str] = {}
    seal: str = ""

    def seal_of(self) -> str:
        """SHA-256 of the canonical JSON of every field but ``seal``."""
        return seal_of_fields(self.model_dump(mode="json", exclude={"seal"}))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False)


def _follow_the_registry() -> None:
    """A kind registered after this module was imported (one defined outside cnnkit) becomes a valid ``model``."""
    field = RunManifest.model_fields["model"]
    field.annotation, field.discriminator = model_sections().__origin__, "kind"
    RunManifest.model_rebuild(force=True)


on_register(_follow_the_registry)


def seal_of_fields(fields: dict) -> str:
    """SHA-256 of the canonical JSON of a manifest's fields (``seal`` left out).

    A reader checks the seal over the fields as they are stored, not as its
    schema reads them: a field added to the schema later (with a default that
    keeps an older run's meaning, such as ``grid`` or ``flip``) is then absent
    from an older run's manifest, and that run still loads.
    """
    body = {k: v for k, v in fields.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


def data_summary(dataset, splits: dict[str, list], skipped: int = 0) -> DataSummary:
    """The ``data`` section for a run trained on ``splits`` of ``dataset``."""
    rows = []
    for split, samples in splits.items():
        for sample in samples:
            path = Path(sample.path)
            try:
                size = path.stat().st_size
            except OSError:
                size = -1
            rows.append(f"{split}\t{dataset.class_names[sample.label]}\t{path.name}\t{size}")
    fingerprint = hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()
    return DataSummary(source=str(Path(dataset.source).resolve()), fingerprint=fingerprint,
                       splits={name: len(samples) for name, samples in splits.items()},
                       classes=dataset.summary().counts, skipped=skipped,
                       excluded=len(dataset.excluded))


def check_destination(out: Path, force: bool) -> None:
    """Fail early, before any work, if ``out`` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not force:
        raise CnnkitError(f"--out {out}: already exists; choose another folder or pass --force to replace it")
    if out.exists() and not (out / MANIFEST).exists():
        raise CnnkitError(f"--out {out}: exists and is not a cnnkit run; refusing to replace it")


# A hook that adds files (reports) to a run being written; it may also fill
# fields of the manifest. It runs after the model files, before the seal.
Attachment = Callable[[Path, RunManifest], None]


def write_run(out: str | Path, manifest: RunManifest, write_files: Callable[[Path], None],
              force: bool = False, attach: Sequence[Attachment] = ()) -> Path:
    """Write a run atomically: model files, attachments, then the sealed manifest.

    Args:
        out: destination folder.
        manifest: what to record; format, version, date, files and seal are set here.
        write_files: called with the temporary folder to write the model files in.
        force: replace an existing run at ``out``.
        attach: hooks that add reports (see ``Attachment``).
    """
    from cnnkit import __version__

    out = Path(out)
    check_destination(out, force)

    def build(folder: Path) -> None:
        manifest.format = FORMAT_VERSION
        manifest.cnnkit_version = __version__
        manifest.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_files(folder)
        for hook in attach:
            hook(folder, manifest)
        manifest.files = {p.relative_to(folder).as_posix(): file_digest(p)
                          for p in sorted(folder.rglob("*")) if p.is_file()}
        manifest.seal = manifest.seal_of()
        (folder / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")

    try:
        return publish_folder(out, build, replace=force)
    except OSError as error:
        # Nothing was published: an existing run at --out is as it was.
        where = error.filename or out
        raise CnnkitError(f"--out {out}: cannot write the run ({where}: {error.strerror or error}); "
                          "free some space or choose another folder") from None


@dataclass
class Run:
    """A loaded, verified run: its folder and typed manifest."""

    path: Path
    manifest: RunManifest

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    @property
    def crop_pct(self) -> float:
        return self.manifest.crop_pct

    @property
    def model(self):
        """The manifest's model section, of the run's kind (``cnnkit.kinds``)."""
        return self.manifest.model

    @property
    def kind(self) -> str:
        return self.manifest.model.kind

    def has(self, name: str) -> bool:
        return name in self.manifest.files

    def file(self, name: str) -> Path:
        """A file of the run (verified when the run was loaded)."""
        if name not in self.manifest.files:
            raise CnnkitError(f"{self.path / name}: missing from the run; re-create the run")
        return self.path / name

    def load_array(self, name: str) -> np.ndarray:
        # allow_pickle=False: a .npy holding Python objects is refused, not unpickled.
        try:
            return np.load(self.file(name), allow_pickle=False)
        except ValueError as error:
            raise CnnkitError(f"{self.path / name}: not a plain array file ({error})") from None

    def load_json(self, name: str):
        try:
            return json.loads(self.file(name).read_text("utf-8"))
        except ValueError as error:
            raise CnnkitError(f"{self.path / name}: damaged JSON ({error})") from None

    def classifier(self, engine="auto", precision="float32"):
        """The run's ``cnnkit.classifier.Classifier``: raw ``uint8`` image batches (and files) -> class
        probabilities, its network run by ``engine`` in ``precision`` (see ``cnnkit.engines``)."""
        return get_kind(self.kind, self.path).classifier(self, engine, precision)

    def tta_classifier(self, engine="auto", precision="float32"):
        """The classifier ``--tta`` uses: the views the run's held-out evidence chose (``Kind.tta_classifier``)."""
        return get_kind(self.kind, self.path).tta_classifier(self, engine, precision)

    @property
    def tta_line(self) -> str:
        """What --tta does for this run, and why, in one line."""
        return get_kind(self.kind, self.path).tta_line(self)

    @property
    def tta_choice(self):
        """The view sets measured on the run's held-out images when it was made (``tta.json``), or ``None``."""
        from cnnkit.tta import CHOICE_FILE, TTAChoice

        if not self.has(CHOICE_FILE):
            return None
        try:  # a sealed JSON file read into a strict schema of names and bounded numbers
            return TTAChoice.model_validate_json(self.file(CHOICE_FILE).read_text("utf-8"))
        except ValueError as error:  # pydantic's ValidationError (bad JSON too) or undecodable bytes
            why = error.errors()[0]["msg"] if isinstance(error, ValidationError) else "not UTF-8"
            raise CnnkitError(f"{self.path / CHOICE_FILE}: not a view choice cnnkit wrote ({why}); "
                              "re-create the run") from None

    @property
    def mirror_symmetric(self) -> bool:
        """Whether the run predicts the same for an image and its mirror image (``Kind.mirror_symmetric``)."""
        return get_kind(self.kind, self.path).mirror_symmetric(self)

    def nested(self, name: str, seal: str, verify: bool = True) -> Run:
        """A sealed run stored inside this one (an ensemble's member) at the relative folder ``name``.

        Verified as ``load_run`` verifies (every file's checksum), or with ``verify=False`` its manifest
        and seal only; and it must carry ``seal``, the one recorded when it was copied in.

        Raises:
            CnnkitError: ``name`` outside the folder or behind a link, a damaged run, another seal.
        """
        path = _safe_member(self.path, name)
        run = load_run(path) if verify else Run(path, read_manifest(path))
        if run.manifest.seal != seal:
            raise CnnkitError(f"{run.path}: is not the run {self.path} was made of (seal mismatch); "
                              "refusing to load it -- re-create it")
        return run


def open_unsealed(folder: Path, manifest: RunManifest) -> Run:
    """A run still being written, as an attach hook sees it: its files as they are now, not verified.

    For hooks that use the run's own model (a report's Grad-CAM overlays)
    before it is sealed; everything else reads runs through ``load_run``.
    """
    files = {p.relative_to(folder).as_posix(): "" for p in sorted(folder.rglob("*")) if p.is_file()}
    return Run(Path(folder), manifest.model_copy(update={"files": files}))


def _field_error(manifest_path: Path, error: ValidationError) -> CnnkitError:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return CnnkitError(f"{manifest_path}: field {where!r}: {first['msg']}; the run is damaged or was "
                       "edited -- re-create it")


def _safe_member(root: Path, name: str) -> Path:
    """``root/name`` if ``name`` is a plain relative path that stays inside ``root``."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\\" in name:
        raise CnnkitError(f"{root / MANIFEST}: lists {name!r}, which is not a file inside the run; "
                          "refusing to load it")
    path = root / pure
    current = root
    for part in pure.parts:  # no link anywhere on the way: it could point outside the run
        current = current / part
        if current.is_symlink():
            raise CnnkitError(f"{current}: is a symbolic link; cnnkit never writes links into a run, "
                              "refusing to load it")
    return path


def _upgrade_v1(data: dict) -> dict:
    """A cnnkit 0.1 manifest (format 1) in today's schema, so 0.1 runs keep working."""
    if data.get("strategy") == "extract":
        head = data.get("head") or {}
        model = {"kind": "feature_head", "backbone": data.get("backbone"), "weights": data.get("weights", "imagenet"),
                 "layers": data.get("layers"), "pool": data.get("pool", "avg"), "flip": data.get("flip", False),
                 "head": head.get("kind"), "pca": head.get("pca"), "whiten": head.get("whiten", False),
                 "l2_normalize": head.get("l2_normalize", False), "best_params": head.get("best_params", {}),
                 "cv_folds": head.get("cv_folds", 0), "feature_dims": data.get("feature_dims", 0)}
    else:
        metrics = data.get("metrics") or {}
        model = {"kind": "network", "backbone": data.get("backbone"), "weights": data.get("weights", "imagenet"),
                 "freeze": data.get("freeze", "none"), "feature_layer": "features",
                 "epochs_run": data.get("epochs_run", 0), "best_epoch": metrics.get("best_epoch", 0),
                 "interrupted": data.get("interrupted", False)}
    source = data.get("data") or {}
    upgraded = {
        "format": FORMAT_VERSION, "cnnkit_version": data.get("cnnkit_version", "0.1"),
        "created": data.get("created", ""), "command": data.get("strategy"),
        "options": data.get("options") or {}, "class_names": data.get("class_names"),
        "image_size": data.get("image_size"), "crop_pct": data.get("crop_pct", 1.0),
        "preprocessing": data.get("preprocessing", "raw"), "metrics": data.get("metrics") or {},
        "model": model, "files": data.get("files") or {},
        "data": {"source": str(source.get("source", "")), "fingerprint": "",
                 "splits": source.get("counts") or {}, "classes": source.get("classes") or {},
                 "skipped": source.get("skipped", 0)} if source else None,
    }
    upgraded["seal"] = seal_of_fields(upgraded)  # format 1 had no seal; the files' checksums still apply
    return upgraded


def read_manifest(path: Path) -> RunManifest:
    """Parse and validate a run's manifest and check its seal (files are not checked here)."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        old = path.with_name(f".{path.name}.old")
        if old.is_dir():
            raise CnnkitError(f"{path}: no such run folder; a replacement of it was interrupted and the "
                              f"previous run is at {old} -- rename it back")
        raise CnnkitError(f"{path}: no such run folder")
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise CnnkitError(f"{path}: not a cnnkit run (no {MANIFEST})")
    try:
        # json.loads builds only dicts, lists, strings, numbers: nothing in the file can run.
        data = json.loads(manifest_path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CnnkitError(f"{manifest_path}: damaged ({error}); re-create the run") from None
    if not isinstance(data, dict) or not isinstance(data.get("format"), int):
        raise CnnkitError(f"{manifest_path}: not a cnnkit manifest")
    if data["format"] > FORMAT_VERSION:
        raise CnnkitError(f"{path}: written by a newer cnnkit (format {data['format']}); upgrade cnnkit")
    try:
        if data["format"] == 1:
            data = _upgrade_v1(data)
        # strict: the file's JSON types must be the schema's (a flag is true or false, not "yes" or 1,
        # a count is not 3.5); only an int is taken where a float is due.
        manifest = RunManifest.model_validate(data, strict=True)
    except ValidationError as error:
        raise _field_error(manifest_path, error) from None
    if manifest.seal != seal_of_fields(data):
        raise CnnkitError(f"{manifest_path}: was modified after the run was written (seal mismatch); "
                          "refusing to load it -- re-create the run")
    return manifest


def load_run(path: str | Path) -> Run:
    """Read and verify a run: its manifest, seal, and every file's checksum.

    Raises:
        CnnkitError: not a run, a damaged or edited manifest or file, a file
            outside the folder, or a newer format -- one line naming it.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest.files.items():
        file = _safe_member(path, name)
        if not file.is_file():
            raise CnnkitError(f"{file}: missing from the run; re-create the run")
        if file_digest(file) != expected:
            raise CnnkitError(f"{file}: was modified after the run was written (checksum mismatch); "
                              "refusing to load it -- re-create the run")
    return Run(path, manifest)

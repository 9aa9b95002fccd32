"""Shared fixtures: tiny real image files made in tmp_path, and bad ones on purpose."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
# What this run must have rather than skip: CI sets CNNKIT_REQUIRE=docker,browser (.ci/run), so a test
# that needs a Docker engine or Chromium fails there instead of passing by skipping.
REQUIRED = {name.strip() for name in os.environ.get("CNNKIT_REQUIRE", "").split(",") if name.strip()}
SAMPLE_DATA = REPO / "sample_data"
PHOTOS = SAMPLE_DATA / "photos"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session uses its own cnnkit cache, never the user's.

    ``auto`` means TensorFlow here (``CNNKIT_ENGINE``): measuring three engines for each of the
    hundreds of tiny networks the tests make would cost minutes and test nothing new. The engine
    tests ask for each engine, and for ``auto``'s measurement, by name (tests/test_engines.py,
    tests/test_kinds.py).
    """
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path_factory.getbasetemp() / "cnnkit_home"))
    monkeypatch.setenv("CNNKIT_ENGINE", "tf")


def needs(what: str, present: bool, reason: str) -> None:
    """Skip the test with ``reason`` when ``what`` (a service or program) is missing, unless it is required."""
    if present:
        return
    if what in REQUIRED:
        pytest.fail(f"{reason} (CNNKIT_REQUIRE names {what}: this run must not skip it)")
    pytest.skip(reason)


def _pattern(seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def make_class_tree(root: Path, counts: dict[str, int], size: int = 24) -> Path:
    """A folder-per-class tree of small random PNGs; returns ``root``."""
    for c, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            # Each class has its own mean colour so that classes are learnable.
            base = np.full((size, size, 3), (c * 70) % 256, np.uint8)
            noise = np.random.default_rng(c * 1000 + i).integers(0, 60, (size, size, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def class_tree(tmp_path) -> Path:
    return make_class_tree(tmp_path / "data", {"cat": 6, "dog": 4})


def write_bad_files(folder: Path) -> dict[str, str]:
    """Every kind of unreadable file; returns {file name: kind}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "_good_source.jpg"
    _pattern(1, 64).save(good)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.png").write_bytes(b"\x89PNG but not really")
    return {"truncated.jpg": "truncated", "empty.png": "empty", "notes.txt": "not an image",
            "fake.png": "not an image"}


def write_odd_good_files(folder: Path) -> list[str]:
    """Readable images in every awkward mode and format; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    image = _pattern(2, 40)
    image.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = image.convert("RGBA")
    rgba.putalpha(100)
    rgba.save(folder / "rgba.png")
    image.convert("P").save(folder / "palette.png")
    image.convert("P").save(folder / "anim.gif", save_all=True, append_images=[_pattern(3, 40).convert("P")])
    Image.fromarray((np.asarray(image.convert("L")).astype(np.uint16) * 257)).save(folder / "gray16.png")
    image.convert("L").save(folder / "gray.bmp")
    image.save(folder / "photo.webp")
    image.save(folder / "scan.tiff")
    image.save(folder / "ünïcødé 猫.png")
    return sorted(p.name for p in folder.iterdir())


def reseal(run_path: Path, edit=None) -> None:
    """Re-compute a run's checksums and seal after editing it, as someone forging a run would.

    ``edit`` may change the manifest dict first. Tests use it to show that the
    readers themselves refuse dangerous content even in a consistently sealed run.
    """
    import json

    from cnnkit.paths import file_digest
    from cnnkit.runs import MANIFEST, RunManifest

    data = json.loads((run_path / MANIFEST).read_text())
    if edit:
        edit(data)
    data["files"] = {name: file_digest(run_path / name) for name in data["files"]}
    manifest = RunManifest.model_validate(data)
    manifest.seal = manifest.seal_of()
    (run_path / MANIFEST).write_text(manifest.to_json())

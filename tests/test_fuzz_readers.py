"""Hostile inputs for the image loader and the CSV reader: random bytes, mutated and
truncated images of every supported format, decompression bombs, odd CSV files.

The contract under test: a readable input gives a result, anything else gives the
library's own error naming the file -- never another exception, never a crash.
Budgets are small and fixed (no deadline, no shrinking database) so CI time stays
bounded; all of these together run in well under 30 s.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from cnnkit.data import Dataset, load_dataset
from cnnkit.data.images import MAX_PIXELS, UnreadableImageError, check_image_header, inspect_image, load_image
from cnnkit.errors import CnnkitError
from conftest import make_class_tree

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _seeds() -> dict[str, bytes]:
    """Small valid files of every supported format, in the modes that take other decoder paths."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    frames = [rgb.convert("P"), Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], transparency=0)
    turned = Image.Exif()
    turned[0x0112] = 6  # the EXIF orientation both readers apply in place: mutations reach its block too
    return {
        "jpeg-exif-turned": _encode(rgb, "JPEG", exif=turned),
        "png-exif-turned": _encode(rgb.convert("L"), "PNG", exif=turned),
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg-progressive-cmyk": _encode(rgb.convert("CMYK"), "JPEG", progressive=True),
        "png-rgba": _encode(rgba, "PNG"),
        "png-16bit": _encode(Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16)), "PNG"),
        "png-palette-interlaced": _encode(rgb.convert("P"), "PNG", interlace=1),
        "bmp": _encode(rgb, "BMP"),
        "bmp-gray": _encode(rgb.convert("L"), "BMP"),
        "gif-animated": gif.getvalue(),
        "webp-lossy": _encode(rgb, "WEBP", quality=50),
        "webp-lossless-alpha": _encode(rgba, "WEBP", lossless=True),
        "tiff": _encode(rgb, "TIFF"),
        "tiff-lzw-float": _encode(Image.fromarray(rng.random((8, 6), dtype=np.float32)), "TIFF", compression="tiff_lzw"),
        "tiff-deflate-rgba": _encode(rgba, "TIFF", compression="tiff_adobe_deflate"),
    }


SEEDS = _seeds()
MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF89a", b"GIF87a", b"RIFF\0\0\0\0WEBPVP8 ",
          b"II*\0", b"MM\0*", b""]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_contract(path: Path, size: int | None) -> None:
    """The loader's whole promise about ``path``."""
    reason = check_image_header(path)
    assert reason is None or (isinstance(reason, str) and reason and "\n" not in reason)
    try:
        array = load_image(path, size)
    except UnreadableImageError as error:
        message = str(error)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        return
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert array.shape[0] > 0 and array.shape[1] > 0
    if size is not None:
        assert array.shape == (size, size, 3)
    # doctor's reader (its own open, draft and EXIF turn) keeps the same promise.
    try:
        facts = inspect_image(path, 16)
    except UnreadableImageError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error), str(error)
        return
    assert facts.thumbnail.dtype == np.uint8 and facts.thumbnail.shape == (16, 16)
    assert facts.width > 0 and facts.height > 0


@pytest.mark.parametrize("orientation", [0, 1, 5, 8, 9, 255, 65535])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_crafted_exif_orientations(scratch, fmt, orientation):
    """Any orientation value, valid or not, is applied in place or ignored by both readers: a result or the named
    error, never another exception."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = scratch / f"oriented{orientation}.{fmt.lower()}"
    picture = Image.fromarray(np.arange(12 * 17 * 3, dtype=np.uint8).reshape(12, 17, 3))
    path.write_bytes(_encode(picture, fmt, exif=exif))
    check_contract(path, None)
    check_contract(path, 8)


@FUZZ
@given(prefix=st.sampled_from(MAGICS), body=st.binary(max_size=600), size=st.sampled_from([None, 8]))
def test_random_bytes(scratch, prefix, body, size):
    path = scratch / "random.img"
    path.write_bytes(prefix + body)
    check_contract(path, size)


@st.composite
def mutated(draw):
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):  # a block of 0x00 or 0xff over a header field
        at = draw(st.integers(0, len(data) - 1))
        data[at:at + 4] = draw(st.sampled_from([b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff"]))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return name, bytes(data)


@FUZZ
@given(case=mutated(), size=st.sampled_from([None, 8]))
def test_mutated_and_truncated_images(scratch, case, size):
    name, data = case
    path = scratch / f"mutated-{name}"
    path.write_bytes(data)
    check_contract(path, size)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_is_readable_and_every_truncation_is_not_a_crash(scratch, name):
    data = SEEDS[name]
    path = scratch / f"seed-{name}"
    path.write_bytes(data)
    assert load_image(path, 8).shape == (8, 8, 3)
    for cut in sorted({*range(0, min(len(data), 64)), *range(64, len(data), max(1, len(data) // 40))}):
        path.write_bytes(data[:cut])
        check_contract(path, 8)


# -- decompression bombs ---------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def _gif_header(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0" * 6
            + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\0;")


BOMBS = {
    "png-100k.png": (_png_header(100_000, 100_000), 10_000_000_000),
    "png-just-over.png": (_png_header(15_000, 15_000), 225_000_000),  # Pillow itself only warns here
    "gif-64k.gif": (_gif_header(65_535, 65_535), 65_535 * 65_535),
}

_BOMB_CHILD = """
import json, resource, sys
from PIL import ImageFile
from cnnkit.data.images import check_image_header, load_image, UnreadableImageError
decoded = []  # every decode of pixel data: a bomb must be refused before one starts
original = ImageFile.ImageFile.load
ImageFile.ImageFile.load = lambda self, *args: decoded.append(1) or original(self, *args)
# From here on the process may not grow by more than 64 MiB, far less than any bomb's pixels.
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + 64 * 2**20, resource.RLIM_INFINITY))
out = {}
for path in sys.argv[1:]:
    try:
        load_image(path, 32)
        loaded = "loaded"
    except UnreadableImageError as error:
        loaded = str(error)
    out[path] = [check_image_header(path), loaded, len(decoded)]
print(json.dumps(out))
"""


def test_decompression_bombs_are_refused_before_any_pixel_memory(tmp_path):
    paths = []
    for name, (data, _) in BOMBS.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    result = subprocess.run([sys.executable, "-c", _BOMB_CHILD, *paths], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for name, (_, pixels) in BOMBS.items():
        path = str(tmp_path / name)
        header, loaded, decodes = out[path]
        expected = f"image too large ({pixels:,} pixels; the limit is {MAX_PIXELS:,})"
        assert header == expected
        assert loaded == f"{path}: {expected}"
        assert decodes == 0  # refused from the header: no pixel was decoded


def test_a_bomb_is_refused_in_process_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    from PIL import ImageFile

    def no_decoding(self, *args):
        raise AssertionError("a bomb's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(100_000, 100_000))
    with pytest.raises(UnreadableImageError, match=r"bomb\.png: image too large \(10,000,000,000 pixels"):
        load_image(path)


def test_image_at_the_limit_is_still_read(tmp_path, monkeypatch):
    import cnnkit.data.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 20 * 10)
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "at.png")
    Image.new("RGB", (21, 10), (1, 2, 3)).save(tmp_path / "over.png")
    assert load_image(tmp_path / "at.png").shape == (10, 20, 3)
    assert check_image_header(tmp_path / "over.png") == "image too large (210 pixels; the limit is 200)"


def test_formats_outside_the_documented_ones_are_not_decoded(tmp_path):
    # EPS would run Ghostscript where installed; cnnkit reads the six formats it documents.
    (tmp_path / "x.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    Image.new("RGB", (4, 4)).save(tmp_path / "y.png", "PPM")
    for name in ("x.jpg", "y.png"):
        assert check_image_header(tmp_path / name) == "not a JPEG, PNG, BMP, GIF, WebP or TIFF image"
        with pytest.raises(UnreadableImageError, match="not a JPEG, PNG"):
            load_image(tmp_path / name)



def test_the_report_thumbnails_and_advises_size_probe_open_user_images_as_the_readers_do(tmp_path, monkeypatch):
    """Label-next's contact sheet and doctor's galleries (``thumbnail_png``) and advise's median side read users'
    images too: the same six formats only (an EPS would start Ghostscript where installed), a bomb refused from its
    header before any pixel is decoded, and any error is "cannot show" / "not counted", never an exception."""
    from PIL import ImageFile

    from cnnkit.advise import _median_side
    from cnnkit.data.dataset import Sample
    from cnnkit.reporting.label_sheet import thumbnail_png

    (tmp_path / "eps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    Image.new("RGB", (4, 4)).save(tmp_path / "ppm.png", "PPM")
    (tmp_path / "bomb.png").write_bytes(_png_header(15_000, 15_000))  # over MAX_PIXELS, under Pillow's own 2x
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "good.png")
    crafted = ["eps.jpg", "ppm.png", "bomb.png", "garbage.png"]
    good = thumbnail_png(tmp_path / "good.png", 60)
    assert Image.open(io.BytesIO(good)).size == (60, 40)

    def no_decoding(self, *args):
        raise AssertionError("a crafted file's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for name in crafted:
        assert thumbnail_png(tmp_path / name) is None, name
    samples = [Sample(tmp_path / name, 0) for name in crafted]
    assert _median_side(samples) == 0.0
    assert _median_side(samples + [Sample(tmp_path / "good.png", 0)]) == 20.0


# -- CSV reader ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def csv_folder(tmp_path_factory) -> Path:
    """A folder with real images under awkward names, for CSV rows to point at."""
    folder = tmp_path_factory.mktemp("csv")
    for i, name in enumerate(["a.png", "b c.png", "com,ma.png", "new\nline.png", "ünï 猫.png", 'q"uote.png']):
        Image.new("RGB", (6, 6), (i * 40, 0, 0)).save(folder / name, "PNG")
    (folder / "sub").mkdir()
    Image.new("RGB", (6, 6)).save(folder / "sub" / "d.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return folder


_PATHS = st.sampled_from(["a.png", "b c.png", "com,ma.png", "new\nline.png", "ünï 猫.png", 'q"uote.png',
                          "sub/d.png", "./a.png", "sub/../a.png", "missing.png", "broken.png", "sub",
                          "", " ", "/", "/nonexistent/x.png", "ABSOLUTE", "\0.png", "x" * 5000,
                          "../../../../../../etc/hostname"])
_LABELS = st.one_of(st.sampled_from(["cat", "dog", " dog ", "", "label", "ç\"a,t", "a\nb"]),
                    st.text(max_size=8))


def _cell(draw, text: str) -> str:
    style = draw(st.sampled_from(["plain", "quoted", "broken-quote"]))
    if style == "quoted" or (style == "plain" and any(c in text for c in ',"\n\r')):
        return '"' + text.replace('"', '""') + '"'
    if style == "broken-quote":
        return '"' + text
    return text


@st.composite
def csv_files(draw, folder: Path):
    lines = []
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["path,label", "filename,label", "Image,Label", "label,path"])))
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["row", "row", "row", "blank", "one-cell", "three-cells", "junk"]))
        if kind == "blank":
            lines.append(draw(st.sampled_from(["", " ", ",", " , "])))
        elif kind == "junk":
            lines.append(draw(st.text(max_size=30)))
        else:
            path = draw(_PATHS)
            if path == "ABSOLUTE":
                path = str(folder / "a.png")
            cells = [_cell(draw, path)]
            if kind != "one-cell":
                cells.append(_cell(draw, draw(_LABELS)))
            if kind == "three-cells":
                cells.append("extra")
            lines.append(",".join(cells))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = newline.join(lines) + draw(st.sampled_from(["", newline]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(encoding, errors="replace")


@FUZZ
@given(data=st.data())
def test_csv_reader_gives_a_dataset_or_an_error_naming_the_csv(csv_folder, data):
    path = csv_folder / "labels.csv"
    path.write_bytes(data.draw(csv_files(csv_folder)))
    try:
        dataset = load_dataset(path)
    except CnnkitError as error:
        message = str(error)
        assert message.startswith(str(path)), message
        return
    assert isinstance(dataset, Dataset)
    assert dataset.splits["train"] and all(name.strip() for name in dataset.class_names)
    for sample in dataset.samples:
        assert sample.path.is_file() and check_image_header(sample.path) is None
    assert all(s.reason for s in dataset.skipped)


@FUZZ
@given(body=st.binary(max_size=400))
def test_csv_reader_on_random_bytes(csv_folder, body):
    path = csv_folder / "random.csv"
    path.write_bytes(body)
    try:
        load_dataset(path)
    except CnnkitError as error:
        assert str(error).startswith(str(path)), str(error)


def test_csv_empty_label_is_named_with_its_line(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "x.csv").write_text("path,label\na.png,cat\n\n\"multi\nline.png\",cat\na.png,cat\n"
                                    "a.png, \n")
    with pytest.raises(CnnkitError, match=r"x\.csv:7: empty label$"):
        load_dataset(tmp_path / "x.csv")


def test_csv_missing_file_is_skipped_and_others_kept(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "x.csv").write_text(f"a.png,cat\nnope.png,cat\n{tmp_path / 'a.png'},dog\n")
    dataset = load_dataset(tmp_path / "x.csv")
    assert dataset.class_names == ["cat", "dog"] and len(dataset.samples) == 2
    assert [(s.path.name, s.reason) for s in dataset.skipped] == [("nope.png", "no such file")]


def test_csv_paths_the_file_system_refuses_are_skipped_files(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "x.csv").write_text("a.png,cat\n" + "x" * 5000 + ",cat\n\"nul\0.png\",cat\nsub,cat\n")
    dataset = load_dataset(tmp_path / "x.csv")
    assert len(dataset.samples) == 1
    assert sorted(s.reason for s in dataset.skipped) == [
        "cannot read it (File name too long)", "is a directory, not an image", "no such file"]


def test_csv_field_over_the_csv_module_limit_names_the_line(tmp_path):
    (tmp_path / "x.csv").write_text("a.png,cat\n\"" + "y" * 200_000 + "\",cat\n")
    with pytest.raises(CnnkitError, match=r"x\.csv:2: field larger than field limit"):
        load_dataset(tmp_path / "x.csv")


def test_csv_not_utf8_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "x.csv").write_bytes("a.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(CnnkitError) as info:
        load_dataset(tmp_path / "x.csv")
    assert str(info.value).startswith(f"{tmp_path / 'x.csv'}: ") and "UTF-8" in str(info.value)
    assert "\n" not in str(info.value)


# -- through the command line ----------------------------------------------------------

def test_cli_names_each_crafted_file_once_and_shows_no_traceback(tmp_path, monkeypatch):
    from cnnkit.cli import app

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "home"))
    data = make_class_tree(tmp_path / "data", {"a": 4, "b": 4})
    crafted = {"bomb.png": _png_header(100_000, 100_000), "bomb.gif": _gif_header(65_535, 65_535),
               "random.jpg": os.urandom(300), "cut.webp": SEEDS["webp-lossy"][:40],
               "cut.tiff": SEEDS["tiff-deflate-rgba"][:-30], "cut.png": SEEDS["png-rgba"][: len(SEEDS["png-rgba"]) // 2],
               "flipped.bmp": SEEDS["bmp"][:18] + b"\xff\xff\xff\x7f" + SEEDS["bmp"][22:]}
    for name, content in crafted.items():
        (data / "a" / name).write_bytes(content)
    runner = CliRunner()
    tiny = ["--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32"]
    run = tmp_path / "run"
    result = runner.invoke(app, ["extract", str(data), "--out", str(run), "--cv", "2", "--json", *tiny])
    assert result.exit_code == 0, result.output
    predicted = runner.invoke(app, ["predict", "--model", str(run), str(data / "a"), "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert len(json.loads(predicted.stdout)) == 4
    for output in (result.stderr, predicted.stderr):
        assert "Traceback" not in output
        for name in crafted:
            lines = [line for line in output.splitlines() if f"{name}: " in line]
            assert len(lines) == 1, (name, output)
    assert "bomb.png: image too large (10,000,000,000 pixels" in predicted.stderr

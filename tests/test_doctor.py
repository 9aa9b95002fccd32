"""`cnnkit doctor DATA`: planted faults are found, the CLI's outputs are usable, bad input is one line."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnkit.cli import app
from conftest import write_bad_files

runner = CliRunner()
# Random weights: no download, and the planted copies are still each other's nearest images.
CHEAP = ["--weights", "none"]


def texture(seed: int, tint: int) -> Image.Image:
    """A 32 x 32 smooth random texture (8 x 8 noise, upscaled), one channel raised per class."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    small[..., tint] = 255 - small[..., tint] // 3
    return Image.fromarray(small).resize((32, 32), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """train/ (10 per class) and test/ (4 per class) of two classes, with one of each fault planted in train."""
    root = tmp_path_factory.mktemp("doctor") / "data"
    for s, (split, n) in enumerate((("train", 10), ("test", 4))):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                texture(s * 1000 + c * 100 + i, c).save(folder / f"{i:03d}.png")
    shutil.copyfile(root / "train/cat/000.png", root / "train/cat/copy.png")  # exact duplicate
    Image.open(root / "test/dog/001.png").convert("RGB").save(root / "train/dog/leaked.jpg", quality=95)  # leak
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / "train/cat/blank.png")
    (root / "train/dog/broken.png").write_bytes(b"\x89PNG garbage, not an image at all")
    return root


@pytest.fixture(scope="module")
def diagnosis(planted, tmp_path_factory):
    from cnnkit.doctor import DoctorOptions, diagnose

    with pytest.MonkeyPatch.context() as patch:  # the session's cache (conftest), here for a module fixture
        patch.setenv("CNNKIT_HOME", str(tmp_path_factory.getbasetemp() / "cnnkit_home"))
        patch.setenv("CNNKIT_ENGINE", "tf")
        return diagnose(planted, DoctorOptions(weights="none"))


def test_planted_faults_are_found(planted, diagnosis):
    def names(kind):
        return {(Path(f.path).relative_to(planted).as_posix(),
                 Path(f.other).relative_to(planted).as_posix() if f.other else "") for f in diagnosis.of_kind(kind)}

    assert ("train/cat/copy.png", "train/cat/000.png") in names("exact-duplicate")
    assert ("train/dog/leaked.jpg", "test/dog/001.png") in names("leak")
    assert ("train/cat/blank.png", "") in names("blank")
    assert ("train/dog/broken.png", "") in names("unreadable")
    assert diagnosis.images == 2 * 10 + 2 * 4 + 4 and diagnosis.class_names == ["cat", "dog"]
    assert diagnosis.counts["test"] == {"cat": 4, "dog": 4}
    # The report of it: every kind found has a section, every image is inlined, paths are escaped.
    from cnnkit.reporting.doctor_report import render_report

    page = render_report(diagnosis)
    assert all(f'id="{kind}"' in page for kind in diagnosis.kind_counts)
    assert "broken.png" in page and "leaked.jpg" in page


def test_cli_json_prints_the_diagnosis_only(planted, diagnosis):
    result = runner.invoke(app, ["doctor", str(planted), *CHEAP, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kinds"] == diagnosis.kind_counts and data["images"] == diagnosis.images
    assert {row["kind"] for row in data["findings"]} >= {"leak", "exact-duplicate", "blank", "unreadable"}


def test_cli_out_writes_issues_for_exclude_and_a_self_contained_report(planted, diagnosis, tmp_path):
    from cnnkit.data.exclude import read_exclusions

    out = tmp_path / "out"
    result = runner.invoke(app, ["doctor", str(planted), *CHEAP, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "leak" in result.output and "exclude" in result.output
    assert f"cnnkit auto {planted} --exclude {out / 'issues.csv'}" in " ".join(result.output.split())
    with (out / "issues.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(diagnosis.findings)
    excluded = read_exclusions(out / "issues.csv")
    assert {Path(r["path"]).resolve() for r in rows if r["action"] == "exclude"} == excluded
    assert (planted / "train/dog/leaked.jpg").resolve() in excluded
    page = (out / "report.html").read_text("utf-8")
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert page.count("<img") == len(sources) > 0
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert "http" not in page.split("</style>")[1]
    # An earlier doctor output is replaced; a folder with anyone else's file is refused, untouched.
    assert runner.invoke(app, ["doctor", str(planted), *CHEAP, "--out", str(out), "-q"]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["doctor", str(planted), *CHEAP, "--out", str(out)])
    assert result.exit_code == 2 and "notes.txt" in result.output and "Traceback" not in result.output
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "unreadable":
        write_bad_files(data / "cat")
        write_bad_files(data / "dog")
    result = runner.invoke(app, ["doctor", str(data), *CHEAP])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(data.name) in lines[0], result.output


def test_thresholds_are_set_by_name_and_bad_settings_are_named():
    from cnnkit.doctor import DoctorOptions, threshold_names, with_thresholds
    from cnnkit.errors import CnnkitError

    options = with_thresholds(DoctorOptions(), ["properties.dark=30", "copies.gap=0.1", "leaks.tries=2",
                                                "leaks.shortlist=none", " copies.shortlist = 5 "])
    assert options.properties.dark == 30.0 and options.copies.gap == 0.1 and options.leaks.tries == 2
    assert options.leaks.shortlist is None and options.copies.shortlist == 5
    assert options.leaks.floor == DoctorOptions().leaks.floor  # the rest as they were
    assert DoctorOptions().properties.dark != 30.0  # the defaults are untouched
    assert {"properties.blank", "copies.aligned", "leaks.tried"} <= set(threshold_names())
    for setting, says in [("dark=30", "unknown name 'dark'"), ("properties.dark", "NAME=VALUE"),
                          ("properties.dark=abc", "'abc' is not a number"), ("copies.tries=1.5", "not a whole number"),
                          ("copies.tries=0", "at least 1"), ("leaks.floor=nan", "not a finite number")]:
        with pytest.raises(CnnkitError, match="--threshold") as error:
            with_thresholds(DoctorOptions(), [setting])
        assert says in str(error.value), str(error.value)


def test_a_threshold_set_on_the_command_line_changes_what_is_found(planted, tmp_path):
    """The blank image is flagged below a grey spread of 4 (the default); with the bar at 0 it is not, and a bad
    setting is one line, exit 2, before anything is written."""
    result = runner.invoke(app, ["doctor", str(planted), *CHEAP, "--json", "--threshold", "properties.blank=0"])
    assert result.exit_code == 0, result.output
    assert "blank" not in json.loads(result.stdout)["kinds"]
    out = tmp_path / "out"
    result = runner.invoke(app, ["doctor", str(planted), *CHEAP, "--out", str(out), "--threshold", "properties.blnk=1"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[0].startswith("error: --threshold properties.blnk=1: unknown name"), result.output
    assert not out.exists()


def test_the_clis_defaults_are_the_librarys():
    from dataclasses import asdict

    from cnnkit.cli.doctor import DEFAULTS
    from cnnkit.doctor import DoctorOptions

    library = asdict(DoctorOptions())
    assert {key: library[key] for key in DEFAULTS} == DEFAULTS


def test_any_kind_gets_a_section_and_a_line_of_advice():
    from cnnkit.doctor import Diagnosis, Finding
    from cnnkit.reporting.doctor_report import GALLERY_CAP, advice, render_report

    findings = [Finding(f"/nowhere/<b>{i}.png", "blurry", 1.0 - i / 100) for i in range(GALLERY_CAP + 5)]
    page = render_report(Diagnosis("/nowhere", ["a"], {"train": {"a": 70}}, 70, findings))
    assert "and 5 more in <code>issues.csv</code>" in page and "<b>0.png" not in page and "&lt;b&gt;0.png" in page
    assert advice("some-new-kind", "exclude") and advice("some-new-kind", "review")


@pytest.mark.parametrize("args, code", [(["doctor", "--help"], 0), (["doctor", "data", "--folds", "1"], 2),
                                        (["doctor", "nowhere"], 2), (["doctor", "data", "--threshold", "dark=3"], 2)])
def test_help_usage_errors_and_a_missing_folder_do_not_import_tensorflow(args, code):
    import subprocess
    import sys

    check = ("import sys\nfrom cnnkit.cli import app\ntry:\n    app(sys.argv[1:], standalone_mode=True)\n"
             "except SystemExit as exit:\n    code = exit.code\n"
             "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED', code, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", check, *args], capture_output=True, text=True, timeout=60)
    assert f"TF_NOT_LOADED {code}" in result.stderr, result.stderr


def test_auto_cheap_checks_find_the_leak_the_duplicate_and_the_unreadable_file(planted):
    """`auto`'s checks: no forward pass, and what they find is one warning line each and in report.md."""
    from cnnkit.data import load_dataset
    from cnnkit.doctor.quick import quick_checks

    check = quick_checks(load_dataset(planted))
    assert [(Path(a).name, Path(b).name) for a, b in check.leaks] == [("leaked.jpg", "001.png")]
    assert [(Path(a).name, Path(b).name) for a, b in check.duplicates] == [("copy.png", "000.png")]
    assert [Path(p).name for p, _ in check.unreadable] == ["broken.png"]
    lines = check.warnings()
    assert len(lines) == 3 and "copies of test/validation images" in lines[0] and "\n" not in "".join(lines)
    assert "--exclude" in lines[0]


def test_auto_cheap_checks_leave_doctor_the_pixels_they_decoded(planted, tmp_path, monkeypatch):
    """The cheap checks read and fill doctor's pixel cache: a later `doctor` (or `auto`) decodes nothing."""
    from cnnkit.content_hashes import content_hashes
    from cnnkit.data import load_dataset
    from cnnkit.doctor import pixels
    from cnnkit.doctor.quick import quick_checks

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "home"))
    dataset = load_dataset(planted)
    paths = [s.path for split in dataset.splits.values() for s in split]
    first = quick_checks(dataset)
    cached = set(pixels.load(pixels.cache_path())[0])
    readable = set(content_hashes(paths)) - {""}
    assert cached == readable
    decoded, decode = [], pixels.decode
    monkeypatch.setattr(pixels, "decode", lambda paths: (decoded.extend(paths), decode(paths))[1])
    again = quick_checks(load_dataset(planted))
    assert decoded == []  # (broken.png is named by the loader, from its header)
    assert first.to_dict() == again.to_dict()


def test_auto_report_names_the_leaks(planted):
    from types import SimpleNamespace

    from cnnkit.auto import AutoResult, render_report
    from cnnkit.data import load_dataset
    from cnnkit.doctor.quick import quick_checks

    checks = quick_checks(load_dataset(planted)).to_dict()
    plan = SimpleNamespace(command_line="cnnkit extract DATA")
    advice = SimpleNamespace(images_per_class={"min": 10, "median": 10, "classes": 2, "total": 20}, image_side=32,
                             similarity={}, probes={}, cell={"data": "little", "domain": "different"},
                             strategy="extract", reasons=[], plan=plan)
    text = render_report(AutoResult(advice, Path("run"), checks=checks))
    assert "## Data checks" in text and "leaked.jpg" in text and "copies of test/validation images" in text


def _crafted_pixel_caches(good: dict) -> dict:
    """Crafted ``pixels.npz`` members: a pickled object, a wrong shape, a foreign meta, a row-count lie."""
    return {"pickled": {**good, "thumbnails": np.array([{"__reduce__": "os.system"}], dtype=object)},
            "shape": {**good, "zoomed": good["zoomed"][:, :1]},
            "meta": {**good, "meta": np.array(json.dumps({"format": 99}))},
            "rows": {**good, "hashes": good["hashes"][:1]},
            "hash": {**good, "hashes": np.array(["../../etc/passwd"] * len(good["hashes"]), dtype="U40")}}


def test_a_crafted_pixel_cache_is_read_as_no_cache_and_replaced(planted, tmp_path, monkeypatch):
    """The thumbnail cache is read with allow_pickle=False and every array checked: anything unexpected
    means the images are decoded again (same pixels), never a crash or a guessed row."""
    from cnnkit.doctor import pixels as cache
    from cnnkit.features import file_hash

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "home"))
    paths = sorted((planted / "train" / "cat").glob("*.png"))
    hashes = [file_hash(p) for p in paths]
    fresh, reasons = cache.read_pixels(paths, hashes)
    assert sum(r is not None for r in reasons) == 0 and len(cache.load(cache.cache_path())[0]) == len(set(hashes))
    with np.load(cache.cache_path(), allow_pickle=False) as npz:
        good = {name: npz[name] for name in npz.files}
    for name, members in [*_crafted_pixel_caches(good).items(), ("garbage", None)]:
        if members is None:
            cache.cache_path().write_bytes(b"PK\x03\x04 not a zip at all")
        else:
            with open(cache.cache_path(), "wb") as handle:
                np.savez(handle, **members)
        assert cache.load(cache.cache_path())[0] == [], name
        again, _ = cache.read_pixels(paths, hashes)
        for field in ("thumbnails", "zoomed", "sizes", "grey"):
            np.testing.assert_array_equal(getattr(again, field), getattr(fresh, field), err_msg=name)
        assert len(cache.load(cache.cache_path())[0]) == len(set(hashes)), name  # rewritten whole


def test_the_pixel_cache_merges_new_rows_keeps_the_newest_and_gives_the_decoded_pixels(tmp_path, monkeypatch):
    """Part cached, part decoded: the same pixels as all decoded; new rows merge with the old, at most LIMIT kept."""
    from cnnkit.content_hashes import content_hashes
    from cnnkit.doctor import pixels as cache

    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(3)
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(paths[-1])
    hashes = content_hashes(paths)
    decoded, _ = cache.read_pixels(paths, hashes, use_cache=False)
    cache.read_pixels(paths[:3], hashes[:3])
    assert cache.load(cache.cache_path())[0] == hashes[:3]
    merged, reasons = cache.read_pixels(paths, hashes)  # three from the cache, five decoded
    assert reasons == [None] * 8 and sorted(cache.load(cache.cache_path())[0]) == sorted(hashes)
    for field in ("thumbnails", "zoomed", "sizes", "grey"):
        np.testing.assert_array_equal(getattr(merged, field), getattr(decoded, field), err_msg=field)
    monkeypatch.setattr(cache, "LIMIT", 4)
    cache.cache_path().unlink()
    cache.read_pixels(paths[:3], hashes[:3])
    cache.read_pixels(paths[3:6], hashes[3:6])
    assert cache.load(cache.cache_path())[0] == [hashes[2], *hashes[3:6]]  # the oldest rows went first


def test_alignments_shared_among_processes_give_the_same_scores():
    """The subpixel alignment of many pairs runs in forked processes: the same number for every pair
    as one after the other, and a shifted, enlarged copy still aligns as a copy."""
    from cnnkit.doctor.alignment import aligned_correlations

    def thumb(image):
        return np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BILINEAR))

    originals = [texture(seed, seed % 3) for seed in range(4)]
    copies = [image.resize((38, 38), Image.Resampling.BICUBIC).crop((3, 2, 35, 34)) for image in originals]
    thumbnails = np.stack([thumb(image) for image in originals + copies])
    pairs = np.array([[i, i + 4] for i in range(4)] + [[i, (i + 1) % 4 + 4] for i in range(4)])
    one_by_one = aligned_correlations(thumbnails, pairs, workers=1)
    shared = aligned_correlations(thumbnails, pairs, workers=2, parallel_pairs=1)
    np.testing.assert_array_equal(shared, one_by_one)
    assert one_by_one[:4].min() > 0.95 > one_by_one[4:].max(), one_by_one


def test_screened_tries_get_the_decision_the_full_alignment_gives():
    """Tries (pairs most likely look-alikes) are aligned first as halved thumbnails, and at full size only
    within ``SCREEN_MARGIN`` of their target: shifted, enlarged copies still pass, look-alikes still fail,
    and every pair aligned at full size has the same score as without the screen."""
    from cnnkit.doctor.alignment import SCREEN_MARGIN, aligned_correlations, halved

    def thumb(image):
        return np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BILINEAR))

    originals = [texture(seed, seed % 3) for seed in range(6)]
    copies = [image.resize((36, 36), Image.Resampling.BICUBIC).crop((2, 1, 34, 33)) for image in originals[:3]]
    thumbnails = np.stack([thumb(image) for image in originals + copies])
    pairs = np.array([[0, 6], [1, 7], [2, 8], [0, 1], [3, 4], [4, 5], [6, 2]])
    enough = np.full(len(pairs), 0.95)
    plain = aligned_correlations(thumbnails, pairs, enough, workers=1)
    assert (plain[:3] >= 0.95).all() and (plain[3:6] < 0.95).all(), plain
    # With a target, a pair's search stops once it is reached: the same decisions, the failures' same scores.
    unbounded = aligned_correlations(thumbnails, pairs, workers=1)
    np.testing.assert_array_equal(plain >= enough, unbounded >= enough)
    np.testing.assert_array_equal(plain[plain < enough], unbounded[plain < enough])
    assert (plain <= unbounded).all()
    screened = aligned_correlations(thumbnails, pairs, enough, workers=1, screened=np.ones(len(pairs), bool))
    np.testing.assert_array_equal(screened >= enough, plain >= enough)
    half = halved(thumbnails)
    np.testing.assert_array_equal(half[0], np.asarray(Image.fromarray(thumbnails[0]).resize((32, 32), Image.Resampling.BILINEAR)))
    full = screened >= enough - SCREEN_MARGIN
    assert full[:3].all() and not full[3:6].all()  # copies go on to full size; some look-alikes stop halved
    # At full size the search starts where the halved one ended, not from a second coarse grid: it finds what
    # the full search finds.
    np.testing.assert_allclose(screened[full], plain[full], atol=1e-3)
    # The halves given (the zoom-1.0 centres doctor caches) are the halves made here.
    given = aligned_correlations(thumbnails, pairs, enough, workers=1, screened=np.ones(len(pairs), bool), halves=half)
    np.testing.assert_array_equal(given, screened)


def pillow_zoomed_centres(thumbnail: np.ndarray) -> np.ndarray:
    """The reference for ``zoomed_thumbnails``: the centre 1/zoom of a grey thumbnail at each zoom, cropped
    and resized to 32 x 32 by Pillow itself."""
    from cnnkit.doctor.duplicates import SIDE, ZOOMS

    side = thumbnail.shape[0]
    picture = Image.fromarray(np.asarray(thumbnail, np.uint8))
    out = np.empty((len(ZOOMS), SIDE, SIDE), np.uint8)
    for column, zoom in enumerate(ZOOMS):
        keep = int(round(side / zoom))
        start = (side - keep) // 2
        out[column] = np.asarray(picture.crop((start, start, start + keep, start + keep)).resize(
            (SIDE, SIDE), Image.Resampling.BILINEAR))
    return out


def test_the_zoomed_centres_and_halves_as_matrix_products_are_pillows_pixels():
    """``zoomed_thumbnails`` and ``halved`` repeat Pillow's fixed-point bilinear resize as float64 matrix
    products (``cnnkit.doctor.resampling``): the same bytes as cropping and resizing each thumbnail with
    Pillow, for noise, flat extremes and a side other than 64."""
    from cnnkit.doctor.alignment import halved
    from cnnkit.doctor.duplicates import zoomed_thumbnails

    rng = np.random.default_rng(5)
    for thumbnails in (rng.integers(0, 256, (300, 64, 64), dtype=np.uint8), rng.integers(0, 256, (50, 48, 48), dtype=np.uint8),
                       np.stack([np.zeros((64, 64), np.uint8), np.full((64, 64), 255, np.uint8)]),
                       np.stack([thumb for thumb in (np.asarray(texture(seed, 1).convert("L").resize((64, 64))) for seed in range(20))])):
        np.testing.assert_array_equal(zoomed_thumbnails(thumbnails), np.stack([pillow_zoomed_centres(t) for t in thumbnails]))
        half = thumbnails.shape[1] // 2
        np.testing.assert_array_equal(halved(thumbnails), np.stack([np.asarray(Image.fromarray(t).resize(
            (half, half), Image.Resampling.BILINEAR)) for t in thumbnails]))
    assert halved(np.zeros((0, 64, 64), np.uint8)).shape == (0, 32, 32)


def test_the_batched_alignment_is_scipys_nelder_mead_on_the_coarse_grid(monkeypatch):
    """Many pairs are aligned at once (``cnnkit.doctor.alignment``): the grid is the overlap correlation at
    each grid point, and each pair's search gives what ``scipy.optimize.minimize(method="Nelder-Mead")``
    gives from the grid's best point with the same settings; warps evaluated a few at a time give the
    same scores."""
    from scipy.optimize import minimize

    from cnnkit.doctor import alignment
    from cnnkit.doctor.alignment import _Pairs, aligned_scores

    originals = [np.asarray(texture(seed, seed % 3).convert("L").resize((64, 64), Image.Resampling.BILINEAR), np.float32)
                 for seed in range(5)]
    rng = np.random.default_rng(3)
    seconds = [np.roll(image, (seed % 3, -1), axis=(0, 1)) + rng.normal(0, 8, image.shape).astype(np.float32)
               for seed, image in enumerate(originals)]
    first, second = np.stack(originals), np.stack(seconds + [seconds[0]])[[1, 0, 2, 3, 4]]
    pairs = _Pairs(first, second)
    grid, points = pairs.grid()
    for i in range(len(first)):
        one = _Pairs(first[i:i + 1], second[i:i + 1])
        objective = lambda x: -float(one(np.asarray(x)[None], np.array([0]))[0])  # noqa: E731
        np.testing.assert_allclose(grid[i], [-objective(p) for p in points], atol=1e-5)
        start = points[grid[i].argmax()]
        simplex = start + np.array([[0, 0, 0], [0.05, 0, 0], [0, 1, 0], [0, 0, 1]])
        reference = minimize(objective, start, method="Nelder-Mead", options={
            "xatol": 0.01, "fatol": 1e-5, "initial_simplex": simplex, "maxiter": 200})
        assert aligned_scores(first, second)[i] == pytest.approx(max(-reference.fun, grid[i].max()), abs=1e-6)
    together = aligned_scores(first, second)
    monkeypatch.setattr(alignment, "EVALUATIONS", 2)
    np.testing.assert_array_equal(aligned_scores(first, second), together)


def test_a_copy_saved_smaller_is_aligned_at_its_own_resolution():
    """A copy resized down loses the original's fine detail: with the images' sizes, the pair is also
    compared with the original at the copy's resolution, which lines it up again."""
    from cnnkit.doctor.alignment import aligned_correlations

    original = texture(7, 1).resize((28, 28), Image.Resampling.BICUBIC)
    small = original.resize((14, 14), Image.Resampling.BILINEAR)
    thumbnails = np.stack([np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BILINEAR))
                           for image in (original, small)])
    plain = aligned_correlations(thumbnails, np.array([[0, 1]]))[0]
    matched = aligned_correlations(thumbnails, np.array([[0, 1]]), sizes=np.array([[28, 28], [14, 14]]))[0]
    assert matched >= 0.988 > plain, (plain, matched)


def _thumbnails(images: list[np.ndarray]) -> np.ndarray:
    """64 px greyscale thumbnails of float images, as doctor's copy tests take them."""
    return np.stack([np.asarray(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).resize(
        (64, 64), Image.Resampling.BILINEAR)) for a in images])


def test_a_shifted_copy_amid_look_alikes_is_found_by_its_alignment():
    """Two noisy look-alikes out-score a shifted copy on detail correlation, so it fails the uniqueness
    test; with ``tries`` its alignment (>= ``tried``, above the look-alikes') still finds it."""
    from cnnkit.doctor.alignment import aligned_correlation
    from cnnkit.doctor.duplicates import CopyThresholds, copy_scores, find_copies

    rng = np.random.default_rng(0)
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8)).resize(
        (28, 28), Image.Resampling.BICUBIC), np.float32)
    shifted = np.zeros_like(base)
    shifted[3:, 3:] = base[:-3, :-3]
    images = [base, shifted, base + rng.normal(0, 12, base.shape), base + rng.normal(0, 13, base.shape)]
    thumbnails = _thumbnails(images)
    detail = copy_scores(thumbnails, np.array([[0, 1], [0, 2], [0, 3]]))
    assert detail[0] < detail[1:].min()
    assert aligned_correlation(thumbnails[0], thumbnails[1]) >= 0.995 > max(
        aligned_correlation(thumbnails[0], thumbnails[j]) for j in (2, 3))
    candidates = np.array([[2, 3, 1]])
    assert find_copies(thumbnails, np.array([0]), candidates) == []
    found = find_copies(thumbnails, np.array([0]), candidates, CopyThresholds(tries=3))
    assert [(m.copy, m.original) for m in found] == [(0, 1)] and found[0].gap < 0


def test_a_cropped_copy_ranked_low_unzoomed_is_found_without_a_short_list():
    """A copy cropped by 3 px a side and resized back correlates poorly with its original unzoomed, below
    three half-alike images, so a short list by that score drops it; leaks give every candidate the
    zoomed test (``CopyThresholds(shortlist=None)``, as ``LEAK_THRESHOLDS``), where it stands out and lines up."""
    from cnnkit.doctor.duplicates import CopyThresholds, copy_scores, find_copies

    rng = np.random.default_rng(1)

    def texture() -> np.ndarray:
        return np.asarray(Image.fromarray(rng.integers(0, 256, (10, 10)).astype(np.uint8)).resize(
            (28, 28), Image.Resampling.BICUBIC), np.float32)

    base = texture()
    cropped = np.asarray(Image.fromarray(base.astype(np.uint8)).crop((3, 3, 25, 25)).resize(
        (28, 28), Image.Resampling.BICUBIC), np.float32)
    images = [base, cropped] + [(base + texture()) / 2 for _ in range(3)]
    thumbnails = _thumbnails(images)
    unzoomed = copy_scores(thumbnails, np.array([[0, j] for j in range(1, 5)]), zooms=(1.0,))
    zoomed = copy_scores(thumbnails, np.array([[0, j] for j in range(1, 5)]))
    assert unzoomed[0] < unzoomed[1:].min() and zoomed[0] > zoomed[1:].max() + 0.15
    candidates = np.array([[2, 3, 4, 1]])
    assert find_copies(thumbnails, np.array([0]), candidates) == []
    found = find_copies(thumbnails, np.array([0]), candidates, CopyThresholds(shortlist=None))
    assert [(m.copy, m.original) for m in found] == [(0, 1)]


def test_the_grouped_detail_correlation_is_the_plain_one_over_shifts_and_zooms():
    """``copy_scores`` (one matrix product per query, each image's overlap statistics once) gives the
    number ``best_shift_correlation`` gives on the overlapping parts, at the best pairing of zooms."""
    from cnnkit.doctor.duplicates import ZOOMS, best_shift_correlation, copy_scores, zoom_views

    rng = np.random.default_rng(2)
    images = [np.asarray(texture(seed, seed % 3).convert("L"), np.float32) for seed in range(4)]
    images += [np.roll(images[0], 2, axis=1) + rng.normal(0, 6, images[0].shape)]
    thumbnails = _thumbnails(images)
    pairs = np.array([[0, 4], [0, 1], [2, 3], [4, 0], [1, 0]])
    views = zoom_views(thumbnails, np.arange(len(thumbnails)), ZOOMS)
    expected = np.max([best_shift_correlation(views[za][pairs[:, 0]], views[zb][pairs[:, 1]])
                       for za, zb in [(z, 1.0) for z in ZOOMS] + [(1.0, z) for z in ZOOMS]], axis=0)
    np.testing.assert_allclose(copy_scores(thumbnails, pairs), expected, atol=1e-5)
    assert expected[0] > 0.9 > expected[1:3].max()


def test_each_unordered_pair_is_scored_once_in_groups_of_any_size():
    """``pair_scores`` computes (i, j) and (j, i) once, from the image in more pairs, groups of 1 to 9 partners
    padded by size class: every pair gets the plain correlation over shifts and zoom pairings."""
    from cnnkit.doctor.duplicates import ZOOMS, best_shift_correlation, pair_scores, zoom_views

    rng = np.random.default_rng(6)
    thumbnails = _thumbnails([rng.integers(0, 256, (28, 28)).astype(np.float32) for _ in range(12)])
    hub = [[0, j] for j in range(1, 10)] + [[j, 0] for j in (3, 5)]  # image 0 in eleven pairs, twice both ways
    pairs = np.array(hub + [[1, 2], [2, 1], [4, 6], [7, 8], [9, 11], [10, 11], [11, 3]])
    views = zoom_views(thumbnails, np.arange(len(thumbnails)), ZOOMS)
    pairings = [(z, 1.0) for z in ZOOMS] + [(1.0, z) for z in ZOOMS if z != 1.0]
    expected = np.max([best_shift_correlation(views[za][pairs[:, 0]], views[zb][pairs[:, 1]])
                       for za, zb in pairings], axis=0)
    np.testing.assert_allclose(pair_scores(views, pairings, pairs), expected, atol=1e-5)


def test_the_detail_correlations_shared_among_processes_are_the_same(monkeypatch):
    """Past ``PARALLEL_PAIRS`` the copy test's queries are shared among forked processes
    (``cnnkit.forked``): the same number for every pair, in the same order."""
    import cnnkit.doctor.duplicates as duplicates
    import cnnkit.forked as forked

    rng = np.random.default_rng(4)
    thumbnails = _thumbnails([rng.integers(0, 256, (28, 28)).astype(np.float32) for _ in range(12)])
    pairs = np.array([[i, j] for i in range(12) for j in range(12) if i != j])
    alone = duplicates.copy_scores(thumbnails, pairs)
    monkeypatch.setattr(duplicates, "PARALLEL_PAIRS", 1)
    monkeypatch.setattr(forked, "cores", lambda: 2)
    np.testing.assert_array_equal(duplicates.copy_scores(thumbnails, pairs), alone)


def test_the_detail_views_are_the_thumbnail_minus_scipys_gaussian_blur():
    from scipy.ndimage import gaussian_filter

    from cnnkit.doctor.duplicates import detail

    pixels = np.random.default_rng(6).integers(0, 256, (3, 32, 28)).astype(np.float32)
    np.testing.assert_allclose(detail(pixels), pixels - gaussian_filter(pixels, sigma=(0, 1.0, 1.0)), atol=1e-4)


def test_label_heads_refitted_from_their_first_round_give_the_same_probabilities():
    """The second round of out-of-fold heads starts from the first round's (``warm_start``): the same
    convex problem, so the same probabilities as heads fitted from zero."""
    from cnnkit.doctor.labels import out_of_fold

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    features = (rng.normal(size=(120, 12)) + labels[:, None] * 0.8).astype(np.float32)
    leave_out = rng.random(120) < 0.2
    _, heads = out_of_fold(features, labels, 4, 0)
    cold, _ = out_of_fold(features, labels, 4, 0, leave_out=leave_out)
    warm, _ = out_of_fold(features, labels, 4, 0, leave_out=leave_out, heads=heads)
    np.testing.assert_allclose(warm, cold, atol=2e-3)


def test_many_features_are_reduced_on_axes_measured_on_a_sample():
    """Past ``LARGE`` images the label heads read principal components of the standardised features:
    with every row sampled, exactly scikit-learn's; with a sample, nearly the same subspace."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from cnnkit.doctor.labels import reduced

    rng = np.random.default_rng(1)
    signal = rng.normal(size=(3000, 6)) * np.array([9, 8, 7, 6, 5, 4])
    features = (signal @ rng.normal(size=(6, 40)) + rng.normal(size=(3000, 40)) + 5).astype(np.float32)
    scaled = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    expected = PCA(6, svd_solver="covariance_eigh").fit_transform(scaled)
    np.testing.assert_allclose(reduced(features, dims=6, sample=3000), expected, atol=2e-3)
    sampled = reduced(features, dims=6, sample=500)
    # Principal angles between the two 6-dimensional subspaces: all close to zero.
    first, second = (np.linalg.qr(StandardScaler().fit_transform(x))[0] for x in (expected, sampled))
    assert np.linalg.svd(first.T @ second, compute_uv=False).min() > 0.99


def test_grey_thumbnails_are_the_same_through_the_grey_shortcut_and_shared_decoding(tmp_path, monkeypatch):
    """A grey image's thumbnail is resized in grey (its colour route gives the same pixels), and many files are
    decoded in forked processes: the same facts as one after the other."""
    import cnnkit.doctor.pixels as pixels
    import cnnkit.forked as forked
    from cnnkit.data.images import inspect_image

    rng = np.random.default_rng(7)
    paths = []
    for i in range(6):
        grey = Image.fromarray(rng.integers(0, 256, (28 + i, 30), dtype=np.uint8))
        grey.save(tmp_path / f"g{i}.png")
        grey.convert("RGB").save(tmp_path / f"c{i}.png")
        paths += [tmp_path / f"g{i}.png", tmp_path / f"c{i}.png"]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    paths.append(tmp_path / "broken.png")
    for i in range(6):
        assert np.array_equal(inspect_image(paths[2 * i]).thumbnail, inspect_image(paths[2 * i + 1]).thumbnail)
    alone, reasons = pixels.decode(paths)
    assert reasons[-1] and reasons[:-1] == [None] * (len(paths) - 1)
    for i in range(len(paths) - 1):
        facts = inspect_image(paths[i])
        np.testing.assert_array_equal(alone.thumbnails[i], facts.thumbnail)
        assert tuple(alone.sizes[i]) == (facts.width, facts.height) and alone.grey[i] == facts.grey_as_colour
    assert not alone.thumbnails[-1].any() and not alone.zoomed[-1].any()
    # Shared among two forked processes writing into shared memory: the same pixels and reasons.
    monkeypatch.setattr(pixels, "PARALLEL_FILES", 1)
    monkeypatch.setattr(forked, "cores", lambda: 2)
    shared, shared_reasons = pixels.decode(paths)
    assert shared_reasons == reasons
    for field in ("thumbnails", "zoomed", "sizes", "grey"):
        np.testing.assert_array_equal(getattr(shared, field), getattr(alone, field), err_msg=field)
    decoded, _ = pixels.read_pixels(paths, None, use_cache=False)
    np.testing.assert_array_equal(decoded.zoomed, alone.zoomed)
    # The zoomed centres, made as matrix products for many thumbnails at once, are Pillow's pixels.
    np.testing.assert_array_equal(decoded.zoomed[:-1], np.stack([pillow_zoomed_centres(t) for t in decoded.thumbnails[:-1]]))


def test_a_search_started_where_a_halved_one_ended_finds_the_full_alignment():
    """``aligned_search`` gives each pair's best point with its score; a full-size search started from the
    halved thumbnails' best point (shifts doubled) ends where the full search from the coarse grid does."""
    from cnnkit.doctor.alignment import _Pairs, aligned_scores, aligned_search, halved

    def thumb(image):
        return np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BILINEAR))

    originals = [texture(seed, seed % 3) for seed in range(4)]
    copies = [image.resize((36, 36), Image.Resampling.BICUBIC).crop((2, 1, 34, 33)) for image in originals]
    first = np.stack([thumb(image) for image in originals + originals])
    # Each original against its copy, then against the next original (a look-alike texture).
    second = np.stack([thumb(image) for image in copies + originals[1:] + originals[:1]])
    scores, points = aligned_search(first, second)
    np.testing.assert_allclose(_Pairs(first, second)(points, np.arange(len(first))), scores, atol=1e-9)
    _, coarse_points = aligned_search(halved(first), halved(second))
    warm = aligned_scores(first, second, start=coarse_points * np.array([1.0, 2.0, 2.0]))
    np.testing.assert_allclose(warm, scores, atol=1e-3)
    assert warm[:4].min() > 0.95 > warm[4:].max(), warm

"""report.html: in every run, sealed with it, self-contained, escaped, rendered without TensorFlow."""

import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.runs import load_run
from conftest import make_class_tree
from tiny_runs import extract_run, shared_runs

runner = CliRunner()


class _References(HTMLParser):
    """Every URL-valued attribute and every tag of a page."""

    def __init__(self):
        super().__init__()
        self.urls, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [value for name, value in attrs if name in ("src", "href", "srcset", "poster", "data", "action")]


def references(html: str) -> _References:
    parser = _References()
    parser.feed(html)
    return parser


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    data, runs = shared_runs(tmp_path_factory)
    return data.parent, data, runs


@pytest.mark.parametrize("kind", ["extract", "knn", "train", "ensemble"])
def test_every_run_has_a_sealed_self_contained_report(made, kind):
    root, data, runs = made
    run = load_run(runs[kind])
    assert "report.html" in run.manifest.files  # checksummed like every other file
    html = (runs[kind] / "report.html").read_text()
    found = references(html)
    assert found.urls and all(url.startswith("data:image/png;base64,") for url in found.urls)
    assert "script" not in found.tags and "link" not in found.tags and "iframe" not in found.tags
    assert "default-src 'none'" in html  # the page may not load anything, even if it tried
    assert "Confusion matrix" in html and "precision" in html
    if kind != "ensemble":
        assert "Skipped files" in html and "empty.png" in html and "truncated.jpg" in html
    if kind in ("extract", "knn"):
        assert "Cross-validation" in html or "cross-validation" in html
    if kind == "knn":
        assert "Occlusion sensitivity" in html
    if kind == "train":
        for caption in ("Loss per epoch", "Train vs validation accuracy", "Learning rate per epoch",
                        "Update/weight ratio", "First-layer filters", "Diagnosis (train run)",
                        "The most confident mistakes", "Grad-CAM"):
            assert caption in html, caption
        assert "unfreeze" not in html  # a from-scratch run is not told to unfreeze stages
    if kind == "ensemble":
        assert "Members" in html and "members/1" in html and "Evaluation data" in html


def test_names_from_the_data_are_escaped(tmp_path):
    data = make_class_tree(tmp_path / "data", {"<b>bold": 6, 'say "hi" & <img src=x>': 6}, size=32)
    run = extract_run(data, tmp_path / "run", val_split=0.34)
    html = (run / "report.html").read_text()
    assert "&lt;b&gt;bold" in html and "&lt;img src=x&gt;" in html
    assert "<b>bold" not in html and "<img src=x>" not in html
    assert all(url.startswith("data:") for url in references(html).urls)


def test_the_report_renders_without_tensorflow(made, tmp_path):
    root, data, runs = made
    code = ("import sys; from pathlib import Path; from cnnkit.runs import load_run; "
            "from cnnkit.reporting import render; run = load_run(sys.argv[1]); "
            "html = render(run.path, run.manifest); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'imported'; print(len(html))")
    for kind in ("train", "ensemble"):
        done = subprocess.run([sys.executable, "-c", code, str(runs[kind])], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) > 10_000


def test_evaluate_writes_a_report_beside_its_results(made, tmp_path):
    root, data, runs = made
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(runs["train"]), str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {"metrics.json", "confusion.png", "mistakes.json", "gradcam.json", "report.html"} <= {
        p.name for p in out.iterdir()}
    html = (out / "report.html").read_text()
    assert "Evaluation: 9 images" in html and "Training" in html  # the results, then the run
    metrics = json.loads((out / "metrics.json").read_text())
    assert re.search(rf"{metrics['accuracy']:.3f}", html)
    assert all(url.startswith("data:") for url in references(html).urls)
    load_run(runs["train"])  # the run itself is unchanged


def test_a_run_that_trained_on_every_image_reports_its_cross_validated_predictions(tmp_path):
    data = make_class_tree(tmp_path / "data", {"a": 8, "b": 8, "c": 8}, size=32)
    run = load_run(extract_run(data, tmp_path / "run", val_split=0.0))
    assert run.manifest.data.splits == {"train": 24}
    metrics = json.loads(run.file("heldout/cv/metrics.json").read_text())
    # Each image predicted by the head refitted without its fold: the folds and parameters of the CV score.
    assert metrics["accuracy"] == pytest.approx(run.manifest.metrics["cv_accuracy"], abs=0.05)
    html = run.file("report.html").read_text()
    assert "cross-validated" in html and html.count("<img ") >= 1
    assert "heldout/cv/metrics.json" in run.manifest.files

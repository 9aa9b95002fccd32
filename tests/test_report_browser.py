"""Every kind of report.html in a real browser: headless Chromium, every image loaded, nothing fetched.

Chromium and its WebDriver are Debian's ``chromium`` and ``chromium-driver``
(installed by .ci/setup.d/10-chromium.sh). The browser's own network log
(Chrome DevTools ``Network.requestWillBeSent`` events) lists every request the
page made: the only one allowed is the file itself; images are ``data:`` URIs.
"""

import json
import shutil
from pathlib import Path

import pytest

from cnnkit.auto import run_auto
from conftest import make_class_tree, needs
from tiny_runs import finetune_run, shared_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1600")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    needs("browser", bool(CHROMIUM and DRIVER), "needs Debian's chromium and chromium-driver "
          "(apt-get install chromium chromium-driver; .ci/setup.d/10-chromium.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # Explicit driver and browser paths: Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    data, runs = shared_runs(tmp_path_factory)
    root = tmp_path_factory.mktemp("browser")
    found = {kind: path / "report.html" for kind, path in runs.items()}
    found["finetune"] = finetune_run(data, root / "finetune") / "report.html"
    little = make_class_tree(root / "little", {"x": 6, "y": 6}, size=40)
    found["auto"] = run_auto(little, root / "auto", budget_minutes=1).run_path / "report.html"
    from typer.testing import CliRunner

    from cnnkit.cli import app

    result = CliRunner().invoke(app, ["evaluate", str(runs["train"]), str(data), "--out", str(root / "eval")])
    assert result.exit_code == 0, result.output
    found["evaluate"] = root / "eval" / "report.html"
    shutil.copyfile(next((little / "x").iterdir()), little / "x" / "copy.png")  # a duplicate for the gallery
    result = CliRunner().invoke(app, ["doctor", str(little), "--weights", "none", "--out", str(root / "doctor")])
    assert result.exit_code == 0, result.output
    found["doctor"] = root / "doctor" / "report.html"
    return found


def requests_made(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


@pytest.mark.parametrize("kind", ["extract", "knn", "finetune", "train", "ensemble", "auto", "evaluate",
                                  "doctor"])
def test_the_report_opens_with_every_image_and_fetches_nothing(browser, reports, kind):
    page = Path(reports[kind]).resolve()
    browser.get_log("performance")  # drop what earlier pages logged
    browser.get(page.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
    expected = page.read_text().count("<img ")
    assert expected >= 1 and len(images) == expected
    broken = [alt for complete, width, height, alt in images if not (complete and width > 0 and height > 0)]
    assert not broken, f"images that did not load: {broken}"
    fetched = [url for url in requests_made(browser) if not url.startswith("data:")]
    assert fetched == [page.as_uri()], fetched
    title = browser.title
    assert title.startswith("cnnkit ")
    if kind == "auto":
        assert "Why this strategy" in browser.page_source

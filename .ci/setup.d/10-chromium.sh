#!/usr/bin/env bash
# Headless Chromium and its WebDriver for tests/test_report_browser.py, which opens
# every kind of report.html in a real browser (images loaded, nothing fetched).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core
command -v chromium >/dev/null && command -v chromedriver >/dev/null

#!/usr/bin/env bash
# One package-list update for every later script that installs Debian packages.
set -euo pipefail
if command -v apt-get >/dev/null; then
    apt-get update -qq
fi

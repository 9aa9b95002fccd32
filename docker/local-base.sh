#!/usr/bin/env bash
# A local stand-in for the official python:3.11-slim image, for machines that reach
# no image registry (this project's CI): Debian bookworm from this machine's own apt
# mirror (mmdebstrap, minbase), Python 3.11 in a venv on PATH as `python` and `pip`.
# The machine's extra CA certificates (a TLS-inspecting proxy in front of PyPI) are
# trusted inside too, and pip told to use them.
#
#   docker/local-base.sh cnnkit-local-base:bookworm
#   docker build --network host --build-arg BASE=cnnkit-local-base:bookworm -t cnnkit .
#
# Needs root, mmdebstrap and a running Docker engine (.ci/setup.d/20-docker.sh).
set -euo pipefail
tag=${1:-cnnkit-local-base:bookworm}

# The first Debian mirror in this machine's apt sources (deb822 or one-line format).
mirror=$(python3 - <<'PY'
import glob, re
uris = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for block in open(path).read().split("\n\n"):
        if re.search(r"^Types:.*\bdeb\b", block, re.M) and re.search(r"^Suites:.*\bbookworm\b", block, re.M):
            uris += re.findall(r"^URIs:\s*(\S+)", block, re.M)
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = [w for w in line.split() if not w.startswith("[") and not w.endswith("]")]
        if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
            uris.append(words[1])
debian = [u for u in uris if "security" not in u]
if not debian:
    raise SystemExit("no Debian bookworm mirror in /etc/apt/sources*")
print(debian[0])
PY
)
echo "local base $tag from $mirror"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"' \
    --customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share' \
    --customize-hook='chroot "$1" update-ca-certificates > /dev/null' \
    --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
    bookworm "$work/base.tar" "$mirror"
docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python"]' \
    "$work/base.tar" "$tag" > /dev/null
docker run --rm --network none "$tag" python -c "import sys, venv; print('python', sys.version.split()[0], 'in', sys.prefix)"

#!/usr/bin/env bash
# A Docker engine for the container test (tests/test_docker.py): Debian's docker.io,
# and mmdebstrap to build a local base image, as no image registry is reachable here.
# dockerd runs in the background without a bridge network (containers use
# --network host or --network none) and without touching iptables.
# Safe to run twice: an engine that already answers is left alone.
set -euo pipefail

if ! command -v dockerd > /dev/null || ! command -v mmdebstrap > /dev/null; then
    [ "$(id -u)" = 0 ] || { echo "20-docker.sh: needs root to install docker.io and mmdebstrap" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        docker.io mmdebstrap > /dev/null
fi

if ! docker info > /dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { echo "20-docker.sh: no Docker engine answers, and starting one needs root" >&2; exit 1; }
    log=/var/log/cnnkit-ci-dockerd.log
    nohup dockerd --bridge=none --iptables=false > "$log" 2>&1 &
    for _ in $(seq 60); do
        docker info > /dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info > /dev/null 2>&1; then
        echo "20-docker.sh: dockerd did not start within 60 s; its log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
fi
docker version --format 'Docker engine {{.Server.Version}} ready'

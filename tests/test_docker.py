"""The Docker image, built and run for real: offline (`--network none`), as a non-root user, on mounted folders.

No registry is reachable here, so the image is built on a local stand-in for
python:3.11-slim made from this machine's Debian mirror (docker/local-base.sh,
reused once built). Needs a Docker engine (.ci/setup.d/20-docker.sh starts
one); without one they skip with the reason, except where CNNKIT_REQUIRE names docker (CI), where
they fail. Select them with ``-m docker``, leave them out with ``-m "not docker"``.
"""

import json
import os
import shutil
import subprocess

import pytest

from cnnkit.runs import load_run
from conftest import PHOTOS, REPO, SAMPLE_DATA, needs

pytestmark = pytest.mark.docker

BASE = "cnnkit-local-base:bookworm"
IMAGE = "cnnkit:test"


def _docker(*arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *arguments], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    """cnnkit's image, built from this checkout (Docker's layer cache makes a rebuild after a code change quick)."""
    needs("docker", shutil.which("docker") is not None and _docker("info", timeout=60).returncode == 0,
          "needs a Docker engine: none answers (.ci/setup.d/20-docker.sh starts one, as root)")
    if os.environ.get("CNNKIT_TEST_REBUILD_BASE") or _docker("image", "inspect", BASE).returncode != 0:
        built = subprocess.run([str(REPO / "docker" / "local-base.sh"), BASE], capture_output=True, text=True,
                               timeout=900)
        assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    previous = _docker("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    built = _docker("build", "--network", "host", "--build-arg", f"BASE={BASE}", "-t", IMAGE, str(REPO),
                    timeout=1500)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    if previous and previous != _docker("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip():
        _docker("image", "rm", previous)  # the last build, now untagged: 2 GB a run otherwise
    return IMAGE


@pytest.fixture
def user(tmp_path):
    """The uid:gid the container runs as: the caller's, or a stand-in non-root one when the tests run as root."""
    uid, gid = (os.getuid(), os.getgid()) if os.getuid() != 0 else (4242, 4242)
    out = tmp_path / "out"
    out.mkdir()
    if os.getuid() == 0:
        os.chown(out, uid, gid)
    return uid, gid, out


def _run(image: str, user, *arguments: str, mounts=(), timeout: float = 2400) -> subprocess.CompletedProcess:
    uid, gid, out = user
    volumes = [f"-v{out}:/out"] + [f"-v{host}:{inside}:ro" for host, inside in mounts]
    return _docker("run", "--rm", "--network", "none", "--user", f"{uid}:{gid}", *volumes, image, *arguments,
                   timeout=timeout)


def test_the_image_runs_as_a_non_root_user_with_the_weights_inside(image):
    identity = _docker("run", "--rm", "--network", "none", "--entrypoint", "id", image, "-u")
    assert identity.stdout.strip() == "10001"
    info = _docker("run", "--rm", "--network", "none", image, "info", "--json")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["cnnkit"] and report["versions"]["tensorflow"].startswith("2.")
    assert set(report["weights_on_disk"]) >= {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert report["would_use"] == "CPU (float32)" and report["gpus"] == []
    # pip's cache stayed out of the image.
    caches = _docker("run", "--rm", "--entrypoint", "sh", image, "-c",
                     "ls -d /root/.cache/pip /tmp/.cache/pip 2>/dev/null | wc -l")
    assert caches.stdout.strip() == "0"


def test_predict_and_auto_offline_write_files_the_calling_user_owns(image, user):
    uid, gid, out = user
    predicted = _run(image, user, "predict", "/photos", "--json", "--top-k", "5", mounts=[(PHOTOS, "/photos")])
    assert predicted.returncode == 0, predicted.stderr
    rows = {row["path"].rsplit("/", 1)[-1]: [t["label"] for t in row["top"]] for row in json.loads(predicted.stdout)}
    assert set(rows) == {"astronaut.png", "cat.png", "coffee.png", "motorcycle.png", "rocket.jpg"}
    assert "espresso" in rows["coffee.png"] and {"tabby", "tiger cat", "Egyptian cat"} & set(rows["cat.png"])

    ran = _run(image, user, "auto", "/data", "--out", "/out/fashion", "--json",
               mounts=[(SAMPLE_DATA / "fashion", "/data")])
    assert ran.returncode == 0, ran.stderr[-3000:]
    run_path = out / "fashion"
    run = load_run(run_path)  # every file present and matching its checksum
    assert run.manifest.command == "ensemble" and len(run.class_names) == 10  # Lite0 + Lite2 feature heads
    assert (run_path / "report.md").is_file()
    for path in [run_path, *run_path.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path
        assert path.stat().st_mode & 0o044, f"{path} is not readable by others (umask 022 in the container)"
    assert sorted(p.name for p in out.iterdir()) == ["fashion"]  # no leftover temporary folders

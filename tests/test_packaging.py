"""How cnnkit installs: one TensorFlow distribution with or without the `gpu` extra, and the image's requirements.

The resolution itself was checked with pip against the index (docs/scale.md:
`pip install --dry-run --report` of `.` and `.[gpu]`); these tests keep
pyproject.toml from drifting back to two distributions that both install the
`tensorflow` package.
"""

import importlib.util
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

PLATFORMS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
    "macos-arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
    "windows-amd64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"},
}


def _project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["project"]


def _active(platform: dict, extras: tuple[str, ...]) -> list[Requirement]:
    project = _project()
    lines = [(line, "") for line in project["dependencies"]]
    lines += [(line, extra) for extra in extras for line in project["optional-dependencies"][extra]]
    active = []
    for line, extra in lines:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({**platform, "extra": extra}):
            active.append(requirement)
    return active


@pytest.mark.parametrize("extras", [(), ("gpu",)], ids=["plain", "gpu"])
@pytest.mark.parametrize("platform", PLATFORMS.values(), ids=PLATFORMS)
def test_every_install_asks_for_exactly_one_tensorflow_distribution(platform, extras):
    tensorflows = [r for r in _active(platform, extras) if canonicalize_name(r.name).startswith("tensorflow")]
    assert {canonicalize_name(r.name) for r in tensorflows} == {"tensorflow"}
    cuda = any("and-cuda" in r.extras for r in tensorflows)
    assert cuda == (extras == ("gpu",) and platform["sys_platform"] == "linux")


def test_the_image_installs_the_cpu_wheel_or_none_with_the_same_version_bounds():
    spec = importlib.util.spec_from_file_location("image_requirements", REPO / "docker" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    declared = [line for line in _project()["dependencies"] if Requirement(line).name == "tensorflow"]
    cpu = module.requirements(str(REPO / "pyproject.toml"), "tensorflow-cpu")
    assert [line for line in cpu if line.startswith("tensorflow")] == [
        "tensorflow-cpu" + declared[0][len("tensorflow"):]]
    assert not [line for line in module.requirements(str(REPO / "pyproject.toml"), "") if "tensorflow" in line]
    assert len(cpu) == len(_project()["dependencies"])
    # The Dockerfile's default is that CPU wheel.
    assert re.search(r"^ARG TENSORFLOW=tensorflow-cpu$", (REPO / "Dockerfile").read_text(), re.M)

"""Print cnnkit's dependencies (pyproject.toml) for ``pip install -r``, with the TensorFlow distribution chosen.

The Docker image installs ``tensorflow-cpu`` (a CPU-only image needs no CUDA
kernels) or nothing when its base already has TensorFlow (the GPU image);
pip users get ``tensorflow`` as pyproject.toml says.

    python docker/requirements.py pyproject.toml tensorflow-cpu > requirements.txt
    python docker/requirements.py pyproject.toml "" > requirements.txt
"""

import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (some GPU base images): the copy pip itself uses
    from pip._vendor import tomli as tomllib


def requirements(pyproject: str, tensorflow: str) -> list[str]:
    """The dependency lines; the ``tensorflow`` one names the given distribution instead, or goes if it is ""."""
    with open(pyproject, "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    lines = []
    for dependency in dependencies:
        name = re.match(r"[A-Za-z0-9._-]+", dependency).group(0)
        if name.lower() != "tensorflow":
            lines.append(dependency)
        elif tensorflow:
            lines.append(tensorflow + dependency[len(name):])
    return lines


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "tensorflow-cpu")))

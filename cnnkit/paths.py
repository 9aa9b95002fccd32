"""Where cnnkit keeps files it builds once, and identifying files by content."""

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """The cnnkit cache directory.

    ``$CNNKIT_HOME`` when set, else ``$XDG_CACHE_HOME/cnnkit``, else
    ``~/.cache/cnnkit``. The directory is not created here.
    """
    if os.environ.get("CNNKIT_HOME"):
        return Path(os.environ["CNNKIT_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "cnnkit"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

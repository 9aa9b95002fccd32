"""Where cnnkit keeps files it builds once: converted weights, feature caches."""

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

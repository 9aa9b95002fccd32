"""Where cnnkit keeps files, identifying files by content, and writing them so a crash loses nothing.

Every file or folder cnnkit publishes is written beside its destination under
a temporary name and renamed into place, so a reader (or a later cnnkit run)
sees the old version or the new one, never half of one. ``atomic_write`` does
it for one file, ``publish_folder`` for a whole folder; both give the result
the permissions the user's umask asks for (``mkstemp``/``mkdtemp`` create
private 0600/0700 entries, which would make a run written in a container or
for a team unreadable to everyone else).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
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
    with open(path, "rb") as handle:  # not through ``Path``: its parsing is half the time of a small file
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``open``/``mkdir`` would have."""
    mask = current_umask()
    folders, files = 0o777 & ~mask, 0o666 & ~mask
    root = Path(root)
    if root.is_file():
        os.chmod(root, files)
        return
    os.chmod(root, folders)
    for folder, subfolders, names in os.walk(root):
        for name in subfolders:
            os.chmod(os.path.join(folder, name), folders)
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, files)


def atomic_write(path: str | Path, write: Callable[[Path], None] | bytes | str) -> Path:
    """Write one file under a temporary name beside it, then rename it into place.

    Args:
        path: the destination; its folder is created.
        write: the content (``bytes`` or ``str``), or a function that writes
            the file at the path it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name ends like the destination: some writers insist on a
    # suffix (Keras' ``save_weights`` on ``.weights.h5``).
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes),
                                        dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        if isinstance(write, bytes):
            tmp.write_bytes(write)
        elif isinstance(write, str):
            tmp.write_text(write, encoding="utf-8")
        else:
            write(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# The largest output ``reuse_or_write`` keeps a copy of (a k-NN head holds its training features:
# 1,000 x 1,280 float32 is 5 MB; copies of big ones would double the disk a run takes).
REUSE_LIMIT = 32 << 20


def reuse_or_write(path: Path, key: str | None, write: Callable[[Path], None]) -> None:
    """``write(path)``, or a copy of the file an earlier ``write`` made for the same ``key``.

    For outputs that are a pure function of what ``key`` digests (a saved head, a
    plot): a cached `extract` rerun then skips importing skops or matplotlib just to
    write the very same bytes again. Copies are kept in ``$CNNKIT_HOME/<key>`` (a
    relative path naming a digest), up to ``REUSE_LIMIT`` bytes; ``key=None`` only
    writes. A copy is only ever copied, never run or loaded here; an unusable cache
    costs the next run the write, nothing else. What is copied in is then read like any
    file of a run (a head only through ``load_head``'s skops type check), so a file planted
    under a key is refused there, not run (tests/test_extract.py).
    """
    kept = cache_dir() / key if key else None
    if kept is not None:
        try:
            shutil.copyfile(kept, path)
            return
        except OSError:  # none kept yet (or unreadable): write it
            pass
    write(path)
    if kept is not None and path.stat().st_size <= REUSE_LIMIT:
        try:
            atomic_write(kept, path.read_bytes())
        except OSError:
            pass


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system cannot (another OS, an old kernel or file
    system); the caller then falls back to two renames.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


STALE_SECONDS = 3600


def _remove_stale_builds(out: Path) -> None:
    """Temporary folders of ``out`` left by a writer killed over an hour ago (none is built that long)."""
    import time

    for leftover in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def publish_folder(out: str | Path, build: Callable[[Path], None], replace: bool = False) -> Path:
    """Build a folder under a temporary name beside ``out``, then rename it to ``out``.

    Whatever happens before the rename (an error, a full disk, SIGKILL), ``out``
    is untouched: an existing folder stays as it was, a new one does not
    appear. A replacement swaps the two folders in one atomic step where the
    system can, so there is no moment without ``out``.

    Args:
        build: fills the temporary folder it is given.
        replace: an existing ``out`` is swapped out and deleted; otherwise
            the caller has made sure ``out`` does not exist.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        build(tmp)
        apply_umask(tmp)
        if replace and out.exists():
            if not exchange(tmp, out):
                # Two renames: killed between them, the earlier folder is left at ".NAME.old".
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
                os.replace(tmp, out)
                tmp = old
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

"""Fashion-MNIST loader and image-folder writer built on the Debian package.

The IDX files come from the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``), which installs them under
``/usr/share/datasets/fashion-mnist``. Only numpy and Pillow are needed.

Example:
    Write 100 training images per class as a folder-per-class PNG tree::

        python bench/fashion_mnist.py OUT --split train --per-class 100 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib
import struct

import numpy as np
from PIL import Image

CLASS_NAMES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]

SEARCH_DIRS = (
    pathlib.Path("/usr/share/datasets/fashion-mnist"),
    pathlib.Path("/usr/share/fashion-mnist"),
)

_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPE_UBYTE = 0x08


def find_fashion_mnist_dir() -> pathlib.Path:
    """Locates the directory that holds the Fashion-MNIST IDX files.

    When the environment variable ``FASHION_MNIST_DIR`` is set, only that
    directory is searched; otherwise the Debian install locations are.

    Returns:
        The directory containing ``train-images-idx3-ubyte[.gz]`` and the
        other three IDX files.

    Raises:
        RuntimeError: If no candidate directory holds the IDX files.
    """
    env_dir = os.environ.get("FASHION_MNIST_DIR")
    # An explicit override that points nowhere should fail loudly rather
    # than silently fall back to another copy of the data.
    candidates = [pathlib.Path(env_dir)] if env_dir else list(SEARCH_DIRS)
    for directory in candidates:
        if _idx_path(directory, "train-images-idx3-ubyte") is not None:
            return directory
    searched = ", ".join(str(d) for d in candidates)
    raise RuntimeError(
        "Fashion-MNIST IDX files not found (searched: "
        f"{searched}). Install them with `apt-get install "
        "dataset-fashion-mnist`, or set FASHION_MNIST_DIR to a directory "
        "holding the IDX files."
    )


def load_idx(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of Fashion-MNIST from the IDX files.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).

    Returns:
        A tuple ``(images, labels)``: ``images`` is a uint8 array of shape
        ``(N, 28, 28)`` and ``labels`` a uint8 array of shape ``(N,)`` with
        values 0-9 indexing ``CLASS_NAMES``.

    Raises:
        ValueError: If ``split`` is not ``"train"`` or ``"test"``, or a file
            is malformed.
        RuntimeError: If the IDX files cannot be found.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = find_fashion_mnist_dir()
    prefix = _PREFIX[split]
    images = _read_idx(_require(directory, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_require(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"inconsistent IDX files for split {split!r}: images "
            f"{images.shape}, labels {labels.shape}"
        )
    return images, labels


def write_image_folder(
    out_dir: str | os.PathLike,
    split: str,
    per_class: int,
    seed: int = 0,
    offset: int = 0,
) -> pathlib.Path:
    """Writes a folder-per-class tree of grayscale 28x28 PNGs.

    For each class, the indices of that class are shuffled with a
    ``numpy.random.default_rng(seed)`` permutation and the slice
    ``[offset, offset + per_class)`` is written as ``NNN.png``. Calling it
    twice with the same seed and disjoint offsets therefore gives disjoint
    image sets (e.g. a training and a validation folder).

    Args:
        out_dir: Root directory; ``out_dir/<class_name>/`` is created for
            every entry of ``CLASS_NAMES``.
        split: ``"train"`` or ``"test"``.
        per_class: Number of images to write per class.
        seed: Seed for the per-class shuffle.
        offset: Position in each class's shuffled order to start from.

    Returns:
        The output directory as a ``pathlib.Path``.

    Raises:
        ValueError: If ``per_class`` or ``offset`` is negative, or a class
            has fewer than ``offset + per_class`` images.
        RuntimeError: If the IDX files cannot be found.
    """
    if per_class < 0 or offset < 0:
        raise ValueError("per_class and offset must be non-negative")
    images, labels = load_idx(split)
    out = pathlib.Path(out_dir)
    rng = np.random.default_rng(seed)
    width = max(3, len(str(per_class - 1)))
    for label, name in enumerate(CLASS_NAMES):
        indices = np.flatnonzero(labels == label)
        if offset + per_class > len(indices):
            raise ValueError(
                f"class {name!r} has {len(indices)} images in split "
                f"{split!r}; cannot take {per_class} from offset {offset}"
            )
        # One permutation per class, drawn in label order, keeps the choice
        # for a class independent of how many images other classes yield.
        chosen = rng.permutation(indices)[offset : offset + per_class]
        class_dir = out / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(chosen):
            path = class_dir / f"{i:0{width}d}.png"
            Image.fromarray(images[index]).save(path)
    return out


def subset_folder(out: str | os.PathLike, per_class: int, seed: int) -> pathlib.Path:
    """``out/n{per_class}-s{seed}``: a random training subset beside the shared test images.

    ``train/`` holds ``per_class`` random training images per class (one subset per
    seed); ``test/`` links to ``out/test``, 200 official test images per class
    (seed 0), written once and the same for every subset. Existing folders are kept.
    """
    out = pathlib.Path(out)
    test_dir = out / "test"
    if not test_dir.exists():
        write_image_folder(test_dir, "test", 200, seed=0)
    root = out / f"n{per_class}-s{seed}"
    if not (root / "train").exists():
        write_image_folder(root / "train", "train", per_class, seed=seed)
    if not (root / "test").exists():
        (root / "test").symlink_to(test_dir.resolve())
    return root


def _idx_path(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, f"{stem}.gz"):
        path = directory / name
        if path.is_file():
            return path
    return None


def _require(directory: pathlib.Path, stem: str) -> pathlib.Path:
    path = _idx_path(directory, stem)
    if path is None:
        raise RuntimeError(
            f"{directory / stem}[.gz] is missing; reinstall it with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        )
    return path


def _read_idx(path: pathlib.Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    # IDX header: two zero bytes, a dtype code, the number of dimensions,
    # then one big-endian uint32 per dimension.
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    if data[2] != _IDX_DTYPE_UBYTE:
        raise ValueError(f"{path}: unsupported IDX dtype 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape}, got {body.size} bytes")
    return body.reshape(shape)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        description="Write Fashion-MNIST as a folder-per-class PNG tree."
    )
    parser.add_argument("out", help="output directory")
    parser.add_argument("--split", choices=sorted(_PREFIX), default="train")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--offset",
        type=int,
        default=0,
        help="start position in each class's shuffled order",
    )
    args = parser.parse_args(argv)
    try:
        out = write_image_folder(
            args.out, args.split, args.per_class, args.seed, args.offset
        )
    except (RuntimeError, ValueError) as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"wrote {args.per_class} x {len(CLASS_NAMES)} images to {out}")


if __name__ == "__main__":
    main()

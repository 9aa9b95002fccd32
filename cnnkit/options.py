"""The options of extract, finetune and train as library objects, their fixed choices, presets and flags.

``ExtractOptions()`` holds the defaults of ``cnnkit extract``, ``FINETUNE``
those of ``cnnkit finetune`` and ``TRAIN`` those of ``cnnkit train``; the CLI
reads its defaults from them and `advise` starts its plans from them, so the
three can never disagree. ``command_line`` turns an options object back into
the flags that reproduce it. Every fixed-choice option is a ``Choice`` enum, so
``--help`` lists its values. This module imports nothing heavy: the CLI
imports it to build ``--help``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields, replace
from enum import Enum
from pathlib import Path

from cnnkit.backbones.registry import DEFAULT_BACKBONE
from cnnkit.choices import Choice
from cnnkit.errors import CnnkitError


class Head(Choice):
    """A classical head on CNN features (``auto``: chosen by cross-validation, see ``cnnkit.extraction``)."""

    logreg = "logreg"
    svm = "svm"
    linear_svm = "linear-svm"
    knn = "knn"
    auto = "auto"


class Pool(Choice):
    """Global pooling of a stage's feature map."""

    avg = "avg"
    max = "max"


class Engine(Choice):
    """What runs a forward pass that does not train (see ``cnnkit.engines``)."""

    auto = "auto"
    tf = "tf"
    onnx = "onnx"
    openvino = "openvino"


class Strategy(Choice):
    """The cells of the notes' strategy table (see ``cnnkit.advise``), as a run records the one it carries out."""

    linear_top = "linear-top"
    linear_stages = "linear-stages"
    finetune_few = "finetune-few"
    finetune_many = "finetune-many"
    train_scratch = "train-scratch"


class Precision(Choice):
    """The arithmetic of a forward pass that does not train: float32 everywhere unless asked.

    ``bfloat16`` (OpenVINO on CPUs with AMX or AVX-512-BF16) is faster and changes 1-5 % of a
    feature head's predictions (docs/engines.md); features of each precision are cached apart.
    """

    float32 = "float32"
    bfloat16 = "bfloat16"


def parse_pca(value: str | int | None) -> str | int | None:
    """``"auto"``, ``"none"`` or a positive integer number of components."""
    if value is None or str(value).lower() == "none":
        return None
    if str(value).lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise CnnkitError(f"--pca {value!r}: use a positive number of components, 'auto' or 'none'")
    return n


# --grid: the most regions per side (at 224 px conv4 is 14 x 14; 6 x 6 regions of it are 2 x 2).
MAX_GRID = 6


def _whole_number_within(value, low: int, high: int) -> bool:
    """``low <= value <= high`` for an ``int`` that is not a ``bool`` (``True`` is an ``int`` to Python)."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


# --image-size: the smallest and largest square side. 2,048 px is over nine times the backbones'
# native 224 and already 12 MB a decoded image; the bound keeps a typo, or a crafted run's manifest
# (which predict, evaluate and export follow), from decoding every image at gigabytes.
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 2048


def check_image_size(size: int | None) -> int | None:
    """``--image-size``: ``None`` (the backbone's own) or a whole number of pixels in the bounds above."""
    if size is not None and not _whole_number_within(size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE):
        raise CnnkitError(f"--image-size {size!r}: give a whole number of pixels from {MIN_IMAGE_SIZE} "
                          f"to {MAX_IMAGE_SIZE}")
    return size


def check_grid(grid: int) -> int:
    """``--grid``: regions per side, 1 (pool the whole map) to ``MAX_GRID``."""
    if not _whole_number_within(grid, 1, MAX_GRID):
        raise CnnkitError(f"--grid {grid!r}: give a whole number from 1 (pool the whole map) to {MAX_GRID}")
    return grid


@dataclass
class ExtractOptions:
    """Settings of an extract run (the CLI flags, as a library object).

    ``layers`` is a stage, a comma-separated list of stages or ``"auto"``; ``head_param`` fixes
    the head's hyper-parameter (C of logreg and the SVMs, k of k-NN) instead of choosing it by CV.
    """

    backbone: str = DEFAULT_BACKBONE
    layers: str = "top"
    weights: str = "imagenet"
    image_size: int | None = None
    pool: Pool = Pool.avg
    flip: bool = False
    grid: int = 1
    l2_normalize: bool = False
    pca: str | int | None = "auto"
    whiten: bool = False
    head: Head = Head.logreg
    head_param: float | None = None
    cv: int = 5
    val_split: float = 0.2
    seed: int = 0
    batch_size: int = 32
    use_cache: bool = True
    strict: bool = False
    engine: Engine = Engine.auto
    precision: Precision = Precision.float32
    # --exclude: a file listing images to leave out (cnnkit.data.exclude); recorded so the command line reproduces it.
    exclude: str | None = None

    def __post_init__(self):
        self.pool = Pool.parse(self.pool, "--pool")
        self.precision = Precision.parse(self.precision, "--precision")
        self.grid = check_grid(self.grid)
        self.image_size = check_image_size(self.image_size)
        self.engine = Engine.parse(self.engine, "--engine")
        self.head = Head.parse(self.head, "--head")
        self.pca = parse_pca(self.pca)


class Mode(Choice):
    finetune = "finetune"
    train = "train"


class Optimizer(Choice):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Schedule(Choice):
    """Per-epoch decay of the rate (see ``schedule_factor``)."""

    exp = "exp"
    step = "step"
    inv = "inv"
    cosine = "cosine"
    constant = "constant"


class Augment(Choice):
    none = "none"
    light = "light"
    strong = "strong"


class BatchNorm(Choice):
    """What fine-tuning does with the BatchNorm layers of the stages it unfreezes."""

    frozen = "frozen"  # inference mode: ImageNet's statistics and scales stay
    train = "train"  # batch statistics while training, moving averages updated


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class Freeze(Choice):
    """``--freeze``: the stem through this stage stays fixed (``none``: train everything)."""

    none = "none"
    conv1 = "conv1"
    conv2 = "conv2"
    conv3 = "conv3"
    conv4 = "conv4"
    conv5 = "conv5"


@dataclass
class TrainOptions:
    """Settings of a finetune or train run (the CLI flags, as a library object).

    The defaults are ``cnnkit finetune``'s; ``TRAIN`` holds ``cnnkit train``'s.
    """

    mode: Mode = Mode.finetune
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    freeze: Freeze = Freeze.conv4
    image_size: int | None = None
    epochs: int = 10
    head_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.01
    finetune_lr_scale: float = 0.1
    optimizer: Optimizer = Optimizer.sgd
    momentum: float = 0.9
    schedule: Schedule = Schedule.exp
    warmup: int = 0
    weight_decay: float = 1e-4
    dropout: float = 0.2
    augment: Augment = Augment.light
    erase: float = 0.0
    # The saved run averages each image with its mirror image (NetworkModel.flip).
    flip: bool = False
    # Fine-tuning keeps the unfrozen stages' BatchNorm in inference mode: with batch statistics the
    # loss jumped from ~0.53 to 1.13-1.16 when conv5 was unfrozen; frozen it kept falling, and test
    # accuracy was better or level on three Fashion-MNIST 100/class subsets (0.812 vs 0.798 mean;
    # bench/finetune_batchnorm.py, docs/quality.md).
    batchnorm: BatchNorm = BatchNorm.frozen
    label_smoothing: float = 0.0
    val_split: float = 0.2
    patience: int = 5
    plateau_patience: int = 2
    seed: int = 0
    deterministic: bool = False
    device: Device = Device.auto
    tensorboard: bool = False
    sanity: bool = False
    strict: bool = False
    # Minutes training may take (from the start of the command); the epochs are cut to what fits.
    time_limit: float | None = None
    # --exclude: a file listing images to leave out (cnnkit.data.exclude); recorded so the command line reproduces it.
    exclude: str | None = None

    def __post_init__(self):
        self.mode = Mode.parse(self.mode, "mode")
        self.image_size = check_image_size(self.image_size)
        self.freeze = Freeze.parse(self.freeze, "--freeze")
        self.optimizer = Optimizer.parse(self.optimizer, "--optimizer")
        self.schedule = Schedule.parse(self.schedule, "--schedule")
        self.augment = Augment.parse(self.augment, "--augment")
        self.batchnorm = BatchNorm.parse(self.batchnorm, "--batchnorm")
        self.device = Device.parse(self.device, "--device")


FINETUNE = TrainOptions()
# From scratch: erasing, label smoothing and the mirror average. Full Fashion-MNIST, `auto --budget 60`,
# one run each: 0.934 without them; the mirror average alone +0.4-0.5 point on each run; all three 0.9394
# (0.9373 without the average; docs/quality.md).
TRAIN = TrainOptions(mode=Mode.train, backbone="small_resnet", weights="none", freeze=Freeze.none, epochs=15,
                     head_epochs=0, batch_size=128, lr=0.1, schedule=Schedule.cosine, warmup=1,
                     weight_decay=5e-4, erase=0.5, flip=True, label_smoothing=0.1, val_split=0.1, patience=8,
                     plateau_patience=3, batchnorm=BatchNorm.train)


def preset(mode: Mode | str, **changes) -> TrainOptions:
    """A copy of the ``finetune`` or ``train`` defaults with ``changes`` applied."""
    return replace(FINETUNE if Mode.parse(mode, "mode") == Mode.finetune else TRAIN, **changes)


# Option fields whose flag is not simply --field-name.
_FLAGS = {"layers": "--layer", "l2_normalize": "--l2", "use_cache": "--cache"}
# Fields that are not flags: the command itself.
_NOT_FLAGS = {"mode"}


def _defaults(command: str):
    return {"extract": ExtractOptions(), "finetune": FINETUNE, "train": TRAIN}[command]


def option_flags(command: str, options) -> list[str]:
    """The flags that turn ``command``'s defaults into ``options``."""
    base = _defaults(command)
    flags: list[str] = []
    for f in fields(options):
        if f.name in _NOT_FLAGS:
            continue
        value, default = getattr(options, f.name), getattr(base, f.name)
        if value == default:
            continue
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, "none" if value is None else str(value.value if isinstance(value, Enum) else value)]
    return flags


def command_line(command: str, data: str | Path, options) -> str:
    """``cnnkit COMMAND DATA --flag value ...`` for ``options``, quoted for a POSIX shell."""
    return shlex.join(["cnnkit", command, str(data), *option_flags(command, options)])


class ExportFormat(Choice):
    """A file format `cnnkit export` writes."""

    savedmodel = "savedmodel"
    tflite = "tflite"
    onnx = "onnx"


class Quantize(Choice):
    """Post-training quantization of a TFLite export."""

    none = "none"
    float16 = "float16"
    dynamic = "dynamic"
    int8 = "int8"

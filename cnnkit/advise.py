"""Choosing the cell of the notes' table by measuring the data.

|                   | very similar to ImageNet  | very different                      |
|-------------------|---------------------------|-------------------------------------|
| very little data  | linear classifier on top  | linear classifiers from other stages|
| quite a lot       | fine-tune a few layers    | fine-tune more layers               |

Size is counted. Similarity to ImageNet is measured on a sample with three
signals, each compared with a stated threshold (see ``Thresholds`` and
docs/advise.md for the experiments behind them):

1. domain shift: how far the sample's activation statistics at every BatchNorm
   layer sit from the ImageNet statistics the layer carries (its moving mean
   and variance), as the mean per-channel KL divergence;
2. the backbone's own ImageNet classifier: its mean top-1 confidence;
3. linear probes: cross-validated accuracy of a logistic regression at
   conv3, conv4 and top; an intermediate stage beating top means the top
   features are too ImageNet-specific for this data.

The domain is "different" when at least two signals say so.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.backbones.registry import DEFAULT_BACKBONE
from cnnkit.data import Dataset, Sample, load_dataset, per_class_order, sample_per_class
from cnnkit.errors import CnnkitError
from cnnkit.options import FINETUNE
from cnnkit.options import Strategy
from cnnkit.plan import Plan

# Each constant's measurements and the experiments behind it: docs/advise.md, "The plans' constants".
# The stages of the little-data plans' one logistic head: fixed, since a CV choice among stage sets on
# 10-100 images per class is noise.
LINEAR_LAYERS = {Strategy.linear_top: "top", Strategy.linear_stages: "conv4,top"}
# Flip-averaged features: +0.3 to +0.9 point on Fashion-MNIST subsets, for twice the forward passes.
LINEAR_FLIP = {Strategy.linear_top: False, Strategy.linear_stages: True}
# conv4 over 3 x 3 regions in the linear-stages plan: where a pattern is, is part of what it tells.
LINEAR_GRID = {Strategy.linear_top: 1, Strategy.linear_stages: 3}
# The backbones averaged with the default one in little-data plans, as the budget has room for them
# (costs in its forward passes), each head with a fixed C: CV-tuned heads gained less.
PARTNER_BACKBONES = {"efficientnet_lite0": {Strategy.linear_stages: ("efficientnet_lite1", "efficientnet_lite2"),
                                             Strategy.linear_top: ("efficientnet_lite2",)}}
PARTNER_COST_IN_FORWARD_PASSES = {"efficientnet_lite1": 1.5, "efficientnet_lite2": 2.0}
ENSEMBLE_HEAD_C = 0.1
# Images the domain-shift and ImageNet-confidence signals are measured on.
SIGNAL_IMAGES = 64
# Training a few stages costs about eight forward passes per image, as advise times them.
FINETUNE_COST_IN_FORWARD_PASSES = 8.0
# Fine-tuning is planned only when this many epochs fit the budget after the head epochs.
FINETUNE_MIN_EPOCHS = 5
# A plan's input size for small images: the fastest measured size (accuracy, speed against 224 px)
# within IMAGE_SIZE_MARGIN of the most accurate.
IMAGE_SIZE_MARGIN = 0.01
SMALL_IMAGE_SIZES = {224: (0.825, 1.0), 160: (0.8125, 1.1), 128: (0.7985, 1.6), 96: (0.789, 2.6)}
# The most epochs a from-scratch plan may train: its --time-limit ends it on a big dataset.
SCRATCH_MAX_EPOCHS = 100
# Beside a from-scratch network, a logistic head on the default backbone's features, averaged 2:1:
# the two err on different images.
SCRATCH_PARTNER = {"layers": "conv4,top", "grid": 3, "flip": False, "image_size": 128, "head_param": 0.1,
                   "pca": None, "val_split": 0.1, "cv": 2}
SCRATCH_WEIGHTS = [2.0, 1.0]
# The partner is planned when its estimated time is at most this share of the training time.
SCRATCH_PARTNER_MAX_SHARE = 0.25
# Fitting the partner's head, seconds per training image: 78 s for 54,000 on two CPU cores.
SCRATCH_PARTNER_FIT_SECONDS = 0.0015
# A network trained from scratch needs epochs. Fashion-MNIST, 3,000 per class, the default 10 minutes:
# 6 epochs fitted and scored 0.8965, the feature plan 0.9265; on the full set 18 epochs (0.933) and 28
# (0.939) beat a features head (0.915). So the plan trains from scratch only when this many fit, and
# otherwise takes the table's other lot-data cell (fine-tuning, then features if that cannot fit either).
SCRATCH_MIN_EPOCHS = 15
# The compact network at 28 px trains about this many images in the time the default backbone makes one
# 224 px forward pass as advise times it (330-350 images/s against 80-84 passes/s on two CPU cores);
# larger images cost in proportion to their pixels.
SCRATCH_IMAGES_PER_FORWARD_PASS = 4.0
# Forward passes/s a plan assumes when advise measured none (the sample came from a cache too small to time).
ASSUMED_FORWARD_RATE = 30.0
# Of the time left when training starts, what a plan keeps for the final evaluation, saving
# the run and its report: a share plus a fixed part.
RESERVE_SHARE, RESERVE_SECONDS = 0.06, 20.0


@dataclass(frozen=True)
class Thresholds:
    """Where the table's cells split; every one can be overridden.

    Attributes:
        little_data: below this many images per class (median) the data is
            "little": feature extraction beats fine-tuning there on our
            benchmarks (docs/advise.md).
        scratch_data: at or above this many images per class, with small
            images of a different domain, training from scratch is chosen.
        scratch_image_side: "small images" means a median side at most this.
        shift: domain-shift (KL) above this says "different".
        confidence: ImageNet top-1 confidence below this says "different".
        probe_margin: an intermediate stage beating top by more than this
            (accuracy) says "different".
    """

    little_data: int = 300
    scratch_data: int = 2000
    scratch_image_side: int = 64
    shift: float = 0.15
    confidence: float = 0.35
    probe_margin: float = 0.0


@dataclass
class Advice:
    """Measurements, the chosen cell and strategy, and the plan that carries it out."""

    images_per_class: dict[str, float]
    image_side: float
    similarity: dict[str, dict]
    cell: dict[str, str]
    strategy: Strategy
    plan: Plan
    reasons: list[str]
    thresholds: dict
    seconds: float = 0.0
    probes: dict[str, float] = field(default_factory=dict)
    forward_images_per_s: float | None = None

    @property
    def command(self) -> str:
        return self.plan.command_line

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "plan"}
        data["strategy"] = str(self.strategy)
        data["plan"] = self.plan.to_dict()
        data["command"] = self.command
        return data


def sample_dataset(dataset: Dataset, per_class: int, seed: int = 0) -> list[Sample]:
    """Up to ``per_class`` training images of each class, chosen reproducibly."""
    return sample_per_class(dataset.splits["train"], per_class, seed)


def _median_side(samples: list[Sample], limit: int = 200) -> float:
    from cnnkit.data.images import open_image

    sides = []
    for sample in samples[:limit]:
        try:
            with open_image(sample.path) as image:  # the header only
                sides.append(min(image.size))
        except Exception:  # noqa: BLE001 - as in cnnkit.data.images: an unreadable file has no side to count
            continue
    return float(statistics.median(sides)) if sides else 0.0


@functools.lru_cache(maxsize=1)
def _imagenet_network(backbone: str):
    """(network, has its ImageNet classifier): one network for both similarity signals.

    The classifier's network holds the same BatchNorm layers as the bare
    backbone, so ``similarity_signals`` reads the domain shift from it too.
    """
    from cnnkit.backbones import get_backbone

    spec = get_backbone(backbone)
    try:
        return spec.build(weights="imagenet", include_top=True), True
    except CnnkitError:
        return spec.build(weights="imagenet"), False


def similarity_signals(spec, images: np.ndarray,
                       batch_size: int = 2 * SIGNAL_IMAGES) -> tuple[dict[str, float], dict | None]:
    """How far the images are from ImageNet, by two signals from one forward pass of the ImageNet network.

    Domain shift: the mean per-channel KL(data || ImageNet) at the BatchNorm
    layers of each stage. The ImageNet side is each BatchNorm layer's moving
    mean and variance; the data side is the mean and variance of the same
    layer's input over the sample. Gives {stage: median KL over the stage's
    BatchNorm layers} and "mean" over stages.

    Confidence: the mean top-1 probability and normalised entropy of the
    backbone's own ImageNet classifier (``None`` for a backbone without one).

    ``batch_size`` holds `advise`'s whole sample (under 2 x SIGNAL_IMAGES images): each
    batch shape costs a graph trace of over a second, and its 67 images in batches of
    64 traced twice.
    """
    import keras
    from keras import ops

    from cnnkit.training.network import stage_groups

    backbone, has_top = _imagenet_network(spec.name)
    groups = stage_groups(spec, backbone)
    bns = [(stage, layer) for stage, layers in groups.items() for layer in layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    outputs = []
    for _, layer in bns:
        x = ops.cast(layer.input, "float32")
        outputs += [ops.mean(x, axis=(1, 2)), ops.mean(x * x, axis=(1, 2))]
    if has_top:
        outputs.append(backbone.output)
    if not outputs:
        return {}, None
    # One model, one graph trace and one pass for both signals (tracing costs about a second each).
    probe = keras.Model(backbone.input, outputs)
    sums, probabilities = None, []
    for start in range(0, len(images), batch_size):
        batch = list(probe.predict_on_batch(images[start:start + batch_size]))
        if has_top:
            probabilities.append(np.asarray(batch.pop(), np.float64))
        batch = [np.asarray(b, np.float64).sum(axis=0) for b in batch]
        sums = batch if sums is None else [a + b for a, b in zip(sums, batch)]
    n = len(images)
    per_stage: dict[str, list[float]] = {}
    for k, (stage, layer) in enumerate(bns):
        mean = sums[2 * k] / n
        var = np.maximum(sums[2 * k + 1] / n - mean ** 2, 1e-6)
        ref_mean = np.asarray(layer.moving_mean.numpy(), np.float64)
        ref_var = np.maximum(np.asarray(layer.moving_variance.numpy(), np.float64), 1e-6)
        kl = 0.5 * (var / ref_var + (mean - ref_mean) ** 2 / ref_var - 1.0 + np.log(ref_var / var))
        per_stage.setdefault(stage, []).append(float(np.mean(kl)))
    shift = {stage: float(np.median(values)) for stage, values in per_stage.items()}
    if shift:
        shift["mean"] = float(np.mean(list(shift.values())))
    confidence = None
    if has_top:
        p = np.concatenate(probabilities)
        entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1) / np.log(1000)
        confidence = {"top1": float(p.max(axis=1).mean()), "entropy": float(entropy.mean())}
    return shift, confidence


def linear_probes(features: dict[str, np.ndarray], labels: np.ndarray, stages: list[str],
                  seed: int = 0, fractions=(1.0,)) -> dict[str, dict[str, float]]:
    """Cross-validated logistic-regression accuracy of each stage (and of data fractions)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels)
    if counts[counts > 0].min() < 2:
        return {}
    result: dict[str, dict[str, float]] = {}
    order = per_class_order(labels, seed)
    subsets = {}
    for fraction in fractions:
        # The same share of every class, at least two images each.
        keep = np.concatenate([members[: max(2, int(round(len(members) * fraction)))] for members in order.values()])
        subsets[f"{int(fraction * 100)}%"] = np.sort(keep)
    from threadpoolctl import threadpool_limits

    # One BLAS thread: on these small matrices threaded BLAS mostly synchronises (the probes of
    # advise on 60,000 images took 8 s instead of about 1 s on a loaded two-core machine).
    with threadpool_limits(1, user_api="blas"):
        for stage in stages:
            x = features["conv5" if stage == "top" else stage]
            result[stage] = {}
            for name, keep in subsets.items():
                folds = int(min(5, np.bincount(labels[keep])[np.bincount(labels[keep]) > 0].min()))
                model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
                cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
                result[stage][name] = float(cross_val_score(model, x[keep], labels[keep], cv=cv).mean())
    return result


def choose_image_size(strategy: Strategy, image_side: float, backbone_size: int) -> tuple[int, str]:
    """The input size a plan runs at, and why.

    From scratch: the images' own median side (at least 28 px), what the
    compact network is built for. Pretrained backbones: on images smaller than
    their input, the fastest measured size within ``IMAGE_SIZE_MARGIN`` of the
    most accurate (``SMALL_IMAGE_SIZES``); otherwise their own input size.
    """
    if strategy == Strategy.train_scratch:
        size = max(int(image_side), 28) if image_side else 32
        return size, f"input {size} px: the images' own size, which the compact network is built for"
    if not image_side or image_side >= backbone_size:
        return backbone_size, f"input {backbone_size} px: the backbone's own size (the images are not smaller)"
    best = max(accuracy for accuracy, _ in SMALL_IMAGE_SIZES.values())
    size = max((s for s, (accuracy, _) in SMALL_IMAGE_SIZES.items() if accuracy >= best - IMAGE_SIZE_MARGIN),
               key=lambda s: SMALL_IMAGE_SIZES[s][1])
    faster = min((s for s in SMALL_IMAGE_SIZES if s < size), key=lambda s: size - s, default=None)
    why = (f"; {faster * backbone_size // 224} px would be {SMALL_IMAGE_SIZES[faster][1] / SMALL_IMAGE_SIZES[size][1]:.1f}x "
           f"faster but lost {(SMALL_IMAGE_SIZES[size][0] - SMALL_IMAGE_SIZES[faster][0]) * 100:.1f} points "
           "(docs/advise.md)") if faster else ""
    size = size * backbone_size // 224  # measured on a 224 px backbone; the same share of another's input
    return size, (f"input {size} px for {image_side:g} px images: the fastest size within "
                  f"{IMAGE_SIZE_MARGIN * 100:g} point of the most accurate measured on small images{why}")


def decide(per_class_median: float, image_side: float, similarity: dict, probes: dict,
           thresholds: Thresholds) -> tuple[dict[str, str], Strategy, list[str]]:
    """Map measurements to the table's cell and a strategy, with the reasons in words."""
    votes, reasons = [], []
    shift = similarity.get("shift", {}).get("mean")
    if shift is not None:
        different = shift > thresholds.shift
        votes.append(different)
        reasons.append(f"activation statistics {'far from' if different else 'close to'} ImageNet's "
                       f"(shift {shift:.2f} {'>' if different else '<='} {thresholds.shift})")
    confidence = similarity.get("imagenet_classifier", {}) or {}
    if "top1" in confidence:
        different = confidence["top1"] < thresholds.confidence
        votes.append(different)
        reasons.append(f"the ImageNet classifier is {'unsure' if different else 'confident'} on these images "
                       f"(mean top-1 {confidence['top1']:.2f} {'<' if different else '>='} {thresholds.confidence})")
    full = {stage: values.get("100%") for stage, values in probes.items() if values}
    middle = {stage: accuracy for stage, accuracy in full.items() if stage != "top"}
    if "top" in full and middle:
        best_middle = max(middle, key=middle.get)
        different = middle[best_middle] - full["top"] > thresholds.probe_margin
        votes.append(different)
        reasons.append(f"linear probe: {best_middle} {middle[best_middle]:.3f} vs top {full['top']:.3f} -- "
                       + ("an intermediate stage wins" if different else "the top layer is at least as good"))
    different = votes[0] if len(votes) == 1 else sum(votes) >= 2
    domain = "different" if different else "similar"
    data = "little" if per_class_median < thresholds.little_data else "lot"
    reasons.insert(0, f"{per_class_median:g} images per class (median) is "
                      f"{'below' if data == 'little' else 'at or above'} {thresholds.little_data}: {data} data")
    if data == "little":
        strategy = Strategy.linear_top if domain == "similar" else Strategy.linear_stages
    elif (domain == "different" and per_class_median >= thresholds.scratch_data
          and 0 < image_side <= thresholds.scratch_image_side):
        strategy = Strategy.train_scratch
        reasons.append(f"{per_class_median:g} small images per class ({image_side:g} px) of a different domain: "
                       "a compact network trained from scratch fits them best")
    else:
        strategy = Strategy.finetune_few if domain == "similar" else Strategy.finetune_many
    return {"data": data, "domain": domain}, strategy, reasons


def cached_sample_rate(backbone: str, engine: str, images: np.ndarray) -> float | None:
    """Images per second through the feature network when the sample came from the cache.

    Timed on the signal images, already decoded, after a warm-up batch: a little faster than a
    pass over files, but the plan is the same whether or not the sample was cached (with no
    measurement, an assumed 30/s left a one-hour Fashion-MNIST plan without its features partner).
    """
    if len(images) < 20:
        return None
    from cnnkit.features import FeatureConfig, FeatureExtractor

    extractor = FeatureExtractor(FeatureConfig(backbone), engine)
    extractor(images[:8])
    started = time.perf_counter()
    extractor(images)
    return len(images) / (time.perf_counter() - started)


def _training_seconds(seconds_left: float) -> float:
    """What a plan may train for: the time left less the reserve for evaluating and saving."""
    return max(seconds_left * (1 - RESERVE_SHARE) - RESERVE_SECONDS, 6.0)


def _forward_rate(forward_images_per_s: float | None) -> float:
    """The measured forward passes/s, or ``ASSUMED_FORWARD_RATE`` where none was measured."""
    return forward_images_per_s or ASSUMED_FORWARD_RATE


def _finetune_rate(forward_images_per_s: float | None) -> float:
    """Images per second fine-tuning is expected to train at (``_forward_rate``)."""
    return max(_forward_rate(forward_images_per_s) / FINETUNE_COST_IN_FORWARD_PASSES, 1.0)


def finetune_epochs_that_fit(train_images: int, seconds_left: float, forward_images_per_s: float | None) -> float:
    """Fine-tuning epochs (after the preset's head epochs) that the time left has room for."""
    rate = _finetune_rate(forward_images_per_s)
    return _training_seconds(seconds_left) * rate / max(train_images, 1) - FINETUNE.head_epochs


def finetune_minutes(train_images: int, forward_images_per_s: float | None) -> float:
    """Minutes of training for the head epochs and ``FINETUNE_MIN_EPOCHS`` fine-tuning epochs."""
    epochs = FINETUNE.head_epochs + FINETUNE_MIN_EPOCHS
    return train_images * epochs / _finetune_rate(forward_images_per_s) / 60


def scratch_epochs_that_fit(train_images: int, seconds_left: float, forward_images_per_s: float | None,
                            image_side: float) -> float:
    """Epochs of the compact network from scratch that the time left has room for (``SCRATCH_IMAGES_PER_FORWARD_PASS``)."""
    rate = _forward_rate(forward_images_per_s) * SCRATCH_IMAGES_PER_FORWARD_PASS * (28 / max(image_side, 28)) ** 2
    return _training_seconds(seconds_left) * rate / max(train_images, 1)


def features_seconds(train_images: int, test_images: int, flip: bool, forward_images_per_s: float | None) -> float:
    """Seconds the little-data plan's first head takes for its forward passes: training images, their
    views for --tta, and the test split it scores, at ``_forward_rate``."""
    return (_extract_passes(train_images, flip) + test_images * (2 if flip else 1)) / _forward_rate(forward_images_per_s)


def scratch_partner_seconds(train_images: int, test_images: int, forward_images_per_s: float | None) -> float:
    """Seconds the features partner of a from-scratch plan is expected to take (``SCRATCH_PARTNER``)."""
    rate = _forward_rate(forward_images_per_s) * SMALL_IMAGE_SIZES[SCRATCH_PARTNER["image_size"]][1]
    return (train_images + 2 * test_images) / rate + SCRATCH_PARTNER_FIT_SECONDS * train_images


def _extract_passes(train_images: int, flip: bool) -> int:
    """Forward passes of an extract run: its images, then the views it measures for --tta
    (``cnnkit.extraction.choose_views``: every view but the plain one of up to ``EVIDENCE_IMAGES``)."""
    from cnnkit.tta import EVIDENCE_IMAGES, all_boxes, candidates_for

    views = len(all_boxes(candidates_for(flip))) - 1
    return (train_images + min(train_images, EVIDENCE_IMAGES) * views) * (2 if flip else 1)


def make_plan(strategy: Strategy, data: str | Path, backbone: str, image_size: int | None, train_images: int,
              seconds_left: float, forward_images_per_s: float | None, seed: int = 0, test_images: int = 0) -> Plan:
    """The command and options that carry out ``strategy``, with epochs sized to ``seconds_left``.

    Little data: a logistic head on fixed stages (``LINEAR_LAYERS``, with
    ``LINEAR_FLIP``), fitted on every training image (``--val-split 0``: the CV accuracy is the
    estimate); on the default backbone, an ensemble of that and the same head on as many of
    ``PARTNER_BACKBONES``' features as the budget has room for. More data: fine-tuning above conv4 (similar) or conv2
    (different), or the compact network from scratch at the images' own size,
    with ``--time-limit`` set to the time left less a reserve for evaluating
    and saving: training measures its own epochs and stops on time. From
    scratch the epochs are capped only by ``SCRATCH_MAX_EPOCHS``, so the
    budget is used, and on the default backbone, when ``scratch_partner_seconds``
    is within ``SCRATCH_PARTNER_MAX_SHARE`` of the training time, the network
    trains for the rest and is averaged with ``SCRATCH_PARTNER``'s features head
    (``SCRATCH_WEIGHTS``); ``test_images`` (the data's test split) counts in that
    estimate. Fine-tuning keeps its preset's epochs as the most, fewer
    when the speed measured by advise says they cannot fit.
    """
    from dataclasses import replace

    from cnnkit.backbones import get_backbone
    from cnnkit.options import ExtractOptions, preset

    own_size = get_backbone(backbone).input_size
    if strategy != Strategy.train_scratch and image_size == own_size:
        image_size = None  # the backbone's own: left out of the command line
    training_seconds = _training_seconds(seconds_left)
    if strategy in (Strategy.linear_top, Strategy.linear_stages):
        # Flip-averaging doubles the forward passes: kept only where they fit (always, at little data).
        flip = LINEAR_FLIP[strategy] and (features_seconds(train_images, test_images, True, forward_images_per_s)
                                          <= training_seconds)
        options = ExtractOptions(backbone=backbone, layers=LINEAR_LAYERS[strategy], head="logreg", pca=None,
                                 flip=flip, grid=LINEAR_GRID[strategy], val_split=0.0,
                                 image_size=image_size, seed=seed)
        passes, partners = _extract_passes(train_images, options.flip), []
        for partner in PARTNER_BACKBONES.get(backbone, {}).get(strategy, ()):
            passes += _extract_passes(train_images, False) * PARTNER_COST_IN_FORWARD_PASSES[partner]
            if passes / _forward_rate(forward_images_per_s) > training_seconds:
                break
            partners.append(partner)
        if not partners:
            return Plan(strategy, "extract", str(data), options)
        options = replace(options, head_param=ENSEMBLE_HEAD_C)
        # At the first member's input size: an ensemble exports as one graph only when its members
        # take one input size (cnnkit.export).
        return Plan(strategy, "ensemble", str(data), members=[Plan(strategy, "extract", str(data), options)] + [
            Plan(strategy, "extract", str(data), replace(options, backbone=partner, flip=False,
                                                         image_size=image_size or own_size))
            for partner in partners])
    if strategy == Strategy.train_scratch:
        # The time limit ends training on a cosine schedule fitted to it, so neither a plateau cut nor
        # an early stop may end it sooner (the best epoch's weights are kept either way). On the full
        # Fashion-MNIST with `auto --budget 60` the train preset's plateau rule divided the rate by 10
        # at epoch 21 and again at 32 of ~42, early stopping ended it at epoch 36 (50 of 60 minutes),
        # validation flat at 0.935-0.937 from epoch 24: test 0.936. Without either, 27 minutes of
        # cosine alone reached 0.933 (18 epochs).
        options = preset("train", image_size=image_size or 32, seed=seed, epochs=SCRATCH_MAX_EPOCHS,
                         plateau_patience=0, patience=SCRATCH_MAX_EPOCHS)
        partner_seconds = scratch_partner_seconds(train_images, test_images, forward_images_per_s)
        if backbone != DEFAULT_BACKBONE or partner_seconds > SCRATCH_PARTNER_MAX_SHARE * training_seconds:
            return Plan(strategy, "train", str(data), replace(options, time_limit=round(training_seconds / 60, 2)))
        network = replace(options, time_limit=round((training_seconds - partner_seconds) / 60, 2))
        features = ExtractOptions(backbone=backbone, head="logreg", seed=seed, **SCRATCH_PARTNER)
        return Plan(strategy, "ensemble", str(data), members=[Plan(strategy, "train", str(data), network),
                                                              Plan(strategy, "extract", str(data), features)],
                    weights=SCRATCH_WEIGHTS)
    freeze = "conv4" if strategy == Strategy.finetune_few else "conv2"
    options = preset("finetune", backbone=backbone, freeze=freeze, image_size=image_size, seed=seed)
    epochs = int(np.clip(finetune_epochs_that_fit(train_images, seconds_left, forward_images_per_s),
                         1, options.epochs))
    return Plan(strategy, "finetune", str(data),
                replace(options, epochs=epochs, time_limit=round(training_seconds / 60, 2)))


def advise(data: str | Path, backbone: str = DEFAULT_BACKBONE, per_class: int = 20, max_images: int = 400,
           thresholds: Thresholds | None = None, seed: int = 0, batch_size: int = 32,
           dataset: Dataset | None = None, budget_minutes: float = 10.0, engine: str = "auto") -> Advice:
    """Measure ``data``, choose a strategy (see the module docstring) and plan it.

    Args:
        per_class: images per class in the measurement sample (at most
            ``max_images`` in all); the sample bounds the time taken.
        budget_minutes: the time the whole job (measuring and training) should
            take; the plan's epochs are sized to what is left of it.
        engine: what runs the probes' forward pass (``cnnkit.engines``).
    """
    from cnnkit.backbones import get_backbone
    from cnnkit.data import load_image
    from cnnkit.features import FeatureConfig, compute_features

    started = time.perf_counter()
    thresholds = thresholds or Thresholds()
    spec = get_backbone(backbone)
    if not spec.pretrained:
        raise CnnkitError(f"--backbone {backbone} has no pretrained weights; advise needs an ImageNet backbone")
    # Counting needs only the file list: opening 60,000 files to check their
    # headers costs seconds, and the sample's unreadable files are named below.
    dataset = dataset or load_dataset(data, check_headers=False)
    summary = dataset.summary("train")
    counts = [c for c in summary.counts.values()]
    n_classes = len(counts)
    per_class = max(2, min(per_class, max_images // max(n_classes, 1)))
    sample = sample_dataset(dataset, per_class, seed)

    # One forward pass over the sample gives the probe features (and fills the cache), and the
    # speed the plan's passes will run at: timed from the end of the first batch, which carries
    # the one-off cost of making the engine (converting the network on a new machine: timed with
    # it, Fashion-MNIST read 13 images/s instead of ~150).
    clock: list[tuple[float, int]] = []  # (time, images done) after each batch

    def tick(done: int, total: int) -> None:
        if done:
            clock.append((time.perf_counter(), done))

    table = compute_features([s.path for s in sample], FeatureConfig(backbone), batch_size, engine=engine,
                             progress=tick)
    kept = [sample[i] for i in table.kept]
    labels = np.array([s.label for s in kept])
    # The similarity signals are means over images and channels: 64 images,
    # spread over the classes, measure them as well as 200 at a third of the cost.
    images = np.stack([load_image(s.path, spec.input_size) for s in kept[::max(1, len(kept) // SIGNAL_IMAGES)]])
    shift, confidence = similarity_signals(spec, images)
    similarity = {"shift": shift}
    if confidence is not None:
        similarity["imagenet_classifier"] = confidence
    probe_stages = [s for s in ("conv3", "conv4", "top") if s in spec.layer_choices]
    probes = linear_probes(table.features, labels, probe_stages, seed, fractions=(0.5, 1.0))
    similarity["probes"] = probes

    median = float(statistics.median(counts)) if counts else 0.0
    side = _median_side(kept)
    cell, strategy, reasons = decide(median, side, similarity, probes, thresholds)
    timed = clock[-1][1] - clock[0][1] if clock else 0
    forward_rate = timed / (clock[-1][0] - clock[0][0]) if timed >= 20 else cached_sample_rate(backbone, engine,
                                                                                              images)
    seconds_left = budget_minutes * 60 - (time.perf_counter() - started)
    train_images = len(dataset.splits["train"])
    test_images = len(dataset.splits.get("test", ()))
    speed = (f"the {forward_rate:.0f} forward passes/s measured here" if forward_rate
             else f"an assumed {ASSUMED_FORWARD_RATE:g} forward passes/s (the sample was cached: no speed measured)")
    if strategy == Strategy.train_scratch:
        epochs = scratch_epochs_that_fit(train_images, seconds_left, forward_rate, side)
        plain_features = features_seconds(train_images, test_images, False, forward_rate)
        if epochs < SCRATCH_MIN_EPOCHS and plain_features <= _training_seconds(seconds_left):
            strategy = Strategy.finetune_many
            needed = SCRATCH_MIN_EPOCHS / max(epochs, 1e-6) * budget_minutes
            reasons.append(f"from scratch, about {epochs:.0f} epochs of {train_images} images fit the budget at "
                           f"{speed}, fewer than {SCRATCH_MIN_EPOCHS} (on Fashion-MNIST at 3,000 per class 6 epochs "
                           f"scored 3 points below features, docs/quality.md): pretrained weights instead "
                           f"(give about --budget {needed:.0f} to train from scratch)")
    if strategy in (Strategy.finetune_few, Strategy.finetune_many):
        fit = finetune_epochs_that_fit(train_images, seconds_left, forward_rate)
        if fit < FINETUNE_MIN_EPOCHS:
            strategy = Strategy.linear_top if cell["domain"] == "similar" else Strategy.linear_stages
            needed = finetune_minutes(train_images, forward_rate)
            reasons.append(f"fine-tuning {train_images} images for {FINETUNE.head_epochs} + {FINETUNE_MIN_EPOCHS} "
                           f"epochs needs about {needed:.0f} minutes at {speed}, "
                           f"{max(fit, 0):.1f} fine-tuning epochs fit the budget: features instead "
                           f"(give --budget {needed / 0.9 + 1:.0f} to fine-tune)")
    image_size, why = choose_image_size(strategy, side, spec.input_size)
    reasons.append(why)
    plan = make_plan(strategy, data, backbone, image_size, train_images, seconds_left, forward_rate, seed,
                     test_images=test_images)
    first = plan.members[0] if plan.command == "ensemble" else plan
    if LINEAR_FLIP.get(strategy, False) and not first.options.flip:
        reasons.append(f"no flip-averaging: twice the forward passes of {train_images} images (about "
                       f"{features_seconds(train_images, test_images, True, forward_rate) / 60:.0f} minutes) "
                       "do not fit the budget")
    if plan.command == "ensemble" and strategy == Strategy.train_scratch:
        network, features = plan.members
        partner = scratch_partner_seconds(train_images, test_images, forward_rate)
        reasons.append(f"the network trains for {network.options.time_limit:g} minutes and is averaged "
                       f"{SCRATCH_WEIGHTS[0]:g}:{SCRATCH_WEIGHTS[1]:g} with a logistic head on {backbone} features "
                       f"at {features.options.image_size} px (about {partner / 60:.1f} minutes at "
                       + (f"the {forward_rate:.0f} forward passes/s measured here" if forward_rate
                          else f"an assumed {ASSUMED_FORWARD_RATE:g} forward passes/s")
                       + "): on the full Fashion-MNIST the pair beat the network alone by 0.5 point "
                       "(docs/advise.md)")
    elif plan.command == "ensemble":
        names = " + ".join(member.options.backbone for member in plan.members)
        reasons.append(f"{len(plan.members)} backbones averaged ({names}): the budget has room for their forward "
                       f"passes, and on Fashion-MNIST such averages beat {backbone} alone by 0.5-1.5 and 0.8-1.3 "
                       "points at 10 and 100 images per class (docs/advise.md)")
    return Advice(
        images_per_class={"min": float(min(counts, default=0)), "median": median, "total": float(sum(counts)),
                          "classes": float(n_classes)},
        image_side=side, similarity=similarity, cell=cell, strategy=strategy, plan=plan, reasons=reasons,
        thresholds=asdict(thresholds), seconds=time.perf_counter() - started,
        probes={stage: v.get("100%", 0.0) for stage, v in probes.items()}, forward_images_per_s=forward_rate)

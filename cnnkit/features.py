"""Pretrained CNN features: pooled activations of every named stage, cached on disk.

One forward pass yields the pooled output of every stage (conv1..conv5; ``top``
is the pooled conv5), so a later run that asks for another layer, head or PCA
size needs no forward pass at all. The cache is keyed by backbone, weights,
input size, pooling and flip-averaging, and rows are keyed by each file's
content hash, so adding images computes only the new ones. It is plain files:
``meta.json``, ``hashes.json`` (row order) and one ``<stage>.npy`` per stage.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.backbones import BackboneSpec, get_backbone
from cnnkit.data import ImageStream, SkippedFile
from cnnkit.errors import CnnkitError
from cnnkit.options import Pool
from cnnkit.paths import cache_dir, file_digest

_FORMAT = 1


def parse_layers(spec: BackboneSpec, layers: str | Sequence[str]) -> list[str]:
    """``"conv4,top"`` -> ``["conv4", "top"]``, checked against the backbone."""
    names = [n.strip() for n in layers.split(",")] if isinstance(layers, str) else list(layers)
    names = [n for n in names if n]
    if not names:
        raise CnnkitError(f"--layer is empty; choose from {', '.join(spec.layer_choices)}")
    return [spec.check_stage(n) for n in dict.fromkeys(names)]


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that changes the numbers a backbone produces for an image."""

    backbone: str
    weights: str = "imagenet"
    image_size: int | None = None
    pool: Pool = Pool.avg
    flip: bool = False

    def resolved(self) -> FeatureConfig:
        """The same configuration with the default input size filled in and the pooling checked."""
        spec = get_backbone(self.backbone)
        return FeatureConfig(self.backbone, str(self.weights), self.image_size or spec.input_size,
                             Pool.parse(self.pool, "--pool"), self.flip)

    @property
    def weights_tag(self) -> str:
        if self.weights in ("imagenet", "none", None):
            return str(self.weights).lower()
        return "file-" + file_hash(Path(self.weights))[:12]

    @property
    def cache_key(self) -> str:
        return f"{self.weights_tag}-{self.image_size}px-{self.pool}{'-flip' if self.flip else ''}"


def file_hash(path: Path) -> str:
    """SHA-1 of a file's bytes: the cache's content identity (not a security check)."""
    return file_digest(path, "sha1")


def inference_fn(model):
    """``model`` as one traced function that accepts any batch size without retracing."""
    import tensorflow as tf

    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def build_backbone(spec: BackboneSpec, weights: str | None, image_size: int | None,
                   include_top: bool = False):
    """Build a backbone; ``weights`` "none" means random initialisation with a fixed seed,
    so that an untrained network gives the same features in every process."""
    if weights in (None, "none"):
        import keras

        keras.utils.set_random_seed(0)
        return spec.build(weights=None, input_size=image_size, include_top=include_top)
    return spec.build(weights=weights, input_size=image_size, include_top=include_top)


class FeatureExtractor:
    """A backbone cut at every stage, each stage globally pooled.

    Args:
        config: backbone, weights, input size, pooling, flip-averaging.
    """

    def __init__(self, config: FeatureConfig):
        self.config = config.resolved()
        self.spec = get_backbone(self.config.backbone)
        self.stages = [s for s in self.spec.layer_choices if s != "top"]
        self._model = None
        self._predict = None

    @property
    def model(self):
        """Keras model: raw pixels -> {stage: pooled features}."""
        if self._model is None:
            import keras

            base = build_backbone(self.spec, self.config.weights, self.config.image_size)
            pool = (keras.layers.GlobalAveragePooling2D if self.config.pool == Pool.avg
                    else keras.layers.GlobalMaxPooling2D)
            outputs = {s: pool(name=f"pool_{s}")(self.spec.stage_layer(base, s).output)
                       for s in self.stages}
            self._model = keras.Model(base.input, outputs, name=f"{self.spec.name}_features")
            self._predict = inference_fn(self._model)
        return self._model

    def __call__(self, images) -> dict[str, np.ndarray]:
        """Pooled features of a batch of raw ``uint8`` images."""
        self.model  # noqa: B018 - builds the model and its traced function once
        out = {s: np.asarray(v, dtype=np.float32) for s, v in self._predict(images).items()}
        if self.config.flip:
            mirrored = self._predict(np.ascontiguousarray(np.asarray(images)[:, :, ::-1]))
            out = {s: (out[s] + np.asarray(mirrored[s], dtype=np.float32)) / 2 for s in out}
        return out

    def extract(self, paths: Sequence[Path], batch_size: int = 32,
                progress: Callable[[int, int], None] | None = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray, list[SkippedFile]]:
        """Pooled features of image files.

        Returns:
            (features, kept, failures): ``features[stage]`` has one row per
            readable file, ``kept`` holds those files' indices in ``paths``.
        """
        stream = ImageStream(paths, self.config.image_size, crop_pct=1.0)
        outputs, kept = stream.map_batches(self, batch_size, progress)
        features = {s: np.concatenate([o[s] for o in outputs]) if outputs else np.zeros((0, 0), np.float32)
                    for s in self.stages}
        return features, kept, stream.failures


@dataclass
class FeatureTable:
    """Features of a list of files, in that order, minus the unreadable ones.

    Attributes:
        features: stage -> (rows, dims) float32.
        kept: indices (into the requested paths) of the rows.
        failures: files that could not be decoded.
        computed: how many images needed a forward pass (0 = all cached).
    """

    features: dict[str, np.ndarray]
    kept: np.ndarray
    failures: list[SkippedFile] = field(default_factory=list)
    computed: int = 0

    def select(self, layers: Sequence[str]) -> np.ndarray:
        """The chosen layers' features side by side: (rows, sum of dims)."""
        return np.concatenate([self.features[BackboneSpec.stage_key(layer)] for layer in layers], axis=1)


class FeatureCache:
    """Stage features on disk, one row per distinct image content."""

    def __init__(self, config: FeatureConfig, root: Path | None = None):
        self.config = config.resolved()
        self.folder = (root or cache_dir() / "features") / self.config.backbone / self.config.cache_key

    def _load(self) -> tuple[list[str], dict[str, np.ndarray]]:
        try:
            hashes = json.loads((self.folder / "hashes.json").read_text())
            arrays = {p.stem: np.load(p, allow_pickle=False) for p in self.folder.glob("*.npy")}
        except (OSError, ValueError):
            return [], {}
        # A write interrupted after the arrays but before hashes.json leaves
        # longer arrays; the hashes decide which rows are valid.
        if any(len(a) < len(hashes) for a in arrays.values()):
            return [], {}
        return hashes, {s: a[: len(hashes)] for s, a in arrays.items()}

    def _save(self, hashes: list[str], arrays: dict[str, np.ndarray]) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stage, array in arrays.items():
                with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as tmp:
                    np.save(tmp, array)
                os.replace(tmp.name, self.folder / f"{stage}.npy")
            meta = {"format": _FORMAT, **self.config.__dict__, "rows": len(hashes)}
            for name, data in (("meta.json", meta), ("hashes.json", hashes)):
                with tempfile.NamedTemporaryFile("w", dir=self.folder, suffix=".tmp", delete=False) as tmp:
                    json.dump(data, tmp)
                os.replace(tmp.name, self.folder / name)
        except OSError:
            pass  # an unwritable cache costs a forward pass next time, nothing more


def compute_features(paths: Sequence[Path], config: FeatureConfig, batch_size: int = 32,
                     use_cache: bool = True, extractor: FeatureExtractor | None = None,
                     progress: Callable[[int, int], None] | None = None) -> FeatureTable:
    """Stage features for image files, from the cache where possible.

    Args:
        paths: the image files.
        config: backbone, weights, size, pooling, flip.
        use_cache: read and extend the on-disk cache.
        extractor: reuse an already built extractor.
        progress: ``(done, total)`` callback over the images needing a forward pass.
    """
    paths = [Path(p) for p in paths]
    if not use_cache:
        extractor = extractor or FeatureExtractor(config)
        features, kept, failures = extractor.extract(paths, batch_size, progress)
        return FeatureTable(features, kept, failures, computed=len(paths))

    cache = FeatureCache(config)
    hashes = [file_hash(p) if p.is_file() else "" for p in paths]
    cached_hashes, cached = cache._load()
    row_of = {h: i for i, h in enumerate(cached_hashes)}
    todo = [i for i, h in enumerate(hashes) if h and h not in row_of]
    # Duplicated files need one forward pass each, not one per copy.
    todo = list({hashes[i]: i for i in reversed(todo)}.values())[::-1]
    failures: list[SkippedFile] = []
    if todo:
        extractor = extractor or FeatureExtractor(config)
        new, kept, failures = extractor.extract([paths[i] for i in todo], batch_size, progress)
        new_hashes = [hashes[todo[k]] for k in kept]
        if new_hashes:
            cached = {s: np.concatenate([cached[s], new[s]]) if s in cached else new[s] for s in new}
            cached_hashes = cached_hashes + new_hashes
            cache._save(cached_hashes, cached)
            row_of = {h: i for i, h in enumerate(cached_hashes)}
    failed = {f.path for f in failures}
    failures = failures + [SkippedFile(p, "no such file") for p, h in zip(paths, hashes) if not h]
    kept = np.array([i for i, h in enumerate(hashes) if h in row_of and paths[i] not in failed], np.int64)
    rows = np.array([row_of[hashes[i]] for i in kept], np.int64)
    features = {s: a[rows] for s, a in cached.items()}
    return FeatureTable(features, kept, failures, computed=len(todo))

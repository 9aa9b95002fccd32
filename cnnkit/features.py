"""Pretrained CNN features: pooled activations of every named stage, cached on disk.

One forward pass yields the pooled output of every stage (conv1..conv5; ``top``
is the pooled conv5), so a later run that asks for another layer, head or PCA
size needs no forward pass at all. A feature is a function of the image's
bytes, the backbone, its weights, the input size, the pooling (and grid),
flip-averaging and the arithmetic's precision: the cache is keyed by all of
them, so rows computed in bfloat16 never mix with float32 ones, and rows are
keyed by each file's content hash, so adding images computes only the new ones.

How a stage is pooled, and how an image is averaged with its mirror image,
is defined once here (``pooled_stages``, ``mirror_average``) as Keras ops: the
feature network every engine runs, a feature head's export graph and its
Grad-CAM all build on them (``cnnkit.kinds``).

On disk each key is one folder holding one file, ``features.npz`` (a plain
numpy zip: ``hashes`` -- the SHA-1 of each row's image file --, ``meta`` -- a
JSON string --, and one ``<stage>`` array per stage), plus an empty ``lock``
file. Reading it needs nothing but ``numpy.load(..., allow_pickle=False)``.

Why one file: an update is written to a temporary file beside it and published
by one ``os.replace``, so a reader sees the old or the new cache, never a mix
of one update's arrays with another's row order; a reader that has opened the
file keeps its snapshot even if a writer replaces it meanwhile, so there is no
pointer to follow, no version folder to garbage-collect and no retry. A writer
killed at any moment leaves at most a stray ``*.tmp`` file that nothing reads.
Writers hold an exclusive ``flock`` on ``lock`` while they re-read, merge and
publish (not during the forward pass), so two concurrent writers merge their
rows instead of the later one dropping the other's; while holding it, any
``*.tmp`` file is by construction left by a dead writer and is removed.
Anything unexpected on read (wrong row counts, foreign meta, a pickled or
truncated array) means "no cache": the rows are recomputed, never guessed.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from cnnkit.backbones import BackboneSpec, get_backbone
from cnnkit.content_hashes import content_hashes
from cnnkit.data import ImageStream, SkippedFile
from cnnkit.engines import check_engine, make_runner
from cnnkit.errors import CnnkitError
from cnnkit.options import Engine, Pool, Precision, check_grid
from cnnkit.paths import cache_dir, file_digest

# 1 was one .npy per stage beside hashes.json, each replaced separately; 2 did not record the precision,
# and an OpenVINO engine on an AMX CPU filled it in bfloat16: its rows are not trusted.
_FORMAT = 3


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
    grid: int = 1
    precision: Precision = Precision.float32

    def resolved(self) -> FeatureConfig:
        """The same configuration with the default input size filled in and the choices checked."""
        spec = get_backbone(self.backbone)
        return FeatureConfig(self.backbone, str(self.weights), self.image_size or spec.input_size,
                             Pool.parse(self.pool, "--pool"), self.flip, check_grid(self.grid),
                             Precision.parse(self.precision, "--precision"))

    @property
    def weights_tag(self) -> str:
        if self.weights in ("imagenet", "none", None):
            return str(self.weights).lower()
        return "file-" + file_hash(Path(self.weights))[:12]

    @property
    def network_key(self) -> str:
        """What the feature network computes depends on: weights, input size, pooling, flip-averaging."""
        return (f"{self.weights_tag}-{self.image_size}px-{self.pool}{f'-grid{self.grid}' if self.grid > 1 else ''}"
                f"{'-flip' if self.flip else ''}")

    @property
    def cache_key(self) -> str:
        """... and the numbers, on the arithmetic too (float32 rows are the same on every engine)."""
        return f"{self.network_key}{'-bf16' if self.precision == Precision.bfloat16 else ''}"


def grid_bounds(size: int, grid: int) -> list[tuple[int, int]]:
    """Rows (or columns) of each of ``grid`` regions of a side of ``size``: adaptive pooling's bounds.

    Region ``i`` spans ``floor(i * size / grid)`` to ``ceil((i + 1) * size / grid)``, so the
    regions cover the side, overlap by at most one row where it does not divide, and are
    symmetric: the mirror image of region ``i`` is region ``grid - 1 - i``.
    """
    return [(i * size // grid, -(-(i + 1) * size // grid)) for i in range(grid)]


def grid_pool(feature_map, grid: int, pool: Pool | str):
    """Keras ops: a (n, h, w, c) map pooled over ``grid`` x ``grid`` regions -> (n, grid * grid * c).

    Row-major regions, channels innermost. ``grid=1`` is global pooling.
    """
    from keras import ops

    reduce = ops.mean if Pool.parse(pool, "--pool") == Pool.avg else ops.max
    _, height, width, channels = feature_map.shape
    cells = [reduce(feature_map[:, r0:r1, c0:c1, :], axis=(1, 2))
             for r0, r1 in grid_bounds(height, grid) for c0, c1 in grid_bounds(width, grid)]
    return cells[0] if grid == 1 else ops.concatenate(cells, axis=-1)


def stage_grid(spec: BackboneSpec, stage: str, grid: int) -> int:
    """Regions per side a stage is pooled over: ``grid``, but 1 for the last stage (``top``'s)."""
    stages = [s for s in spec.layer_choices if s != "top"]
    return 1 if stage == stages[-1] else grid


def mirror(images, axis: int = 2):
    """Keras ops: ``images`` reversed along ``axis`` (2: left-right for NHWC images, as ``numpy.flip``).

    A gather with constant indices rather than ``ops.flip``: ONNX has no reverse op, and the
    ``ReverseSequence`` with transposes that ``ops.flip`` converts to made the ONNX engines 20 %
    slower on flip-averaged features (docs/engines.md).
    """
    from keras import ops

    return ops.take(images, np.arange(images.shape[axis] - 1, -1, -1), axis=axis)


def unmirror(features, grid: int):
    """Grid-pooled features of a mirror image (Keras ops), each region moved back to where it is in the image.

    Averaging them with the image's own features then averages each region with its mirror,
    as global pooling does for the whole map.
    """
    from keras import ops

    if grid == 1:
        return features
    channels = features.shape[-1] // (grid * grid)
    cells = ops.reshape(features, (-1, grid, grid, channels))
    return ops.reshape(mirror(cells, 2), (-1, grid * grid * channels))


def mirror_average(pooled_of, images, flip: bool, unmirror_pooled=None):
    """The mirror average (``--flip``) of pooled features, as Keras ops: its one definition.

    ``pooled_of(batch)`` returns ``(pooled, maps)``: the pooled features of a batch (a tensor or a
    dict of them) and anything else the caller wants of it (Grad-CAM's feature maps, a dict).
    With ``flip`` the images and their mirror images go through ``pooled_of`` as one batch twice as
    long (one backbone in the graph: what the engines run fastest), the mirror images' pooled
    features are put back in place by ``unmirror_pooled`` (grid regions, ``unmirror``) and
    averaged with the images' own: a linear classifier on them then averages the two views'
    logits. Feature heads and networks alike, in every engine, export and explanation.

    Returns:
        (pooled, views): ``views`` is ``[(maps, row offset, mirrored)]``, one per view: that
        view of image ``i`` is row ``offset + i`` of the returned ``maps``.
    """
    from keras import ops

    if not flip:
        pooled, maps = pooled_of(images)
        return pooled, [(maps, 0, False)]
    pooled, maps = pooled_of(ops.concatenate([images, mirror(images)], axis=0))
    if isinstance(pooled, dict):
        halves = {name: ops.split(value, 2, axis=0) for name, value in pooled.items()}
        own, mirrored = ({name: pair[i] for name, pair in halves.items()} for i in (0, 1))
    else:
        own, mirrored = ops.split(pooled, 2, axis=0)
    if unmirror_pooled is not None:
        mirrored = unmirror_pooled(mirrored)
    averaged = ({name: (own[name] + mirrored[name]) / 2.0 for name in own} if isinstance(own, dict)
                else (own + mirrored) / 2.0)
    return averaged, [(maps, 0, False), (maps, ops.shape(images)[0], True)]


def stage_maps(spec: BackboneSpec, weights: str | None, image_size: int, stages: Sequence[str]):
    """A Keras model: raw pixels -> {stage key: that stage's feature map} (the backbone cut at each stage)."""
    import keras

    base = build_backbone(spec, weights, image_size)
    return keras.Model(base.input, {s: spec.stage_layer(base, s).output for s in stages},
                       name=f"{spec.name}_stages")


def pooled_stages(maps_model, images, grids: dict[str, int], pool: Pool | str, flip: bool,
                  keep: Sequence[str] = ()):
    """Keras ops: each stage of ``grids`` pooled over its grid, mirror-averaged with ``flip``: a run's features.

    Args:
        maps_model: a ``stage_maps`` model holding every stage of ``grids`` and ``keep``.
        images: raw pixels (any dtype; cast to float32).
        grids: stage key -> regions per side (``stage_grid``).
        keep: stages whose feature maps to return too (Grad-CAM's).

    Returns:
        ({stage: pooled}, views): ``views`` as ``mirror_average`` returns them, with {stage in keep: map}.
    """
    from keras import ops

    def pooled_of(x):
        maps = maps_model(x, training=False)
        pooled = {s: grid_pool(ops.cast(maps[s], "float32"), grid, pool) for s, grid in grids.items()}
        return pooled, {s: maps[s] for s in keep}

    return mirror_average(pooled_of, ops.cast(images, "float32"), flip,
                          lambda pooled: {s: unmirror(p, grids[s]) for s, p in pooled.items()})


def file_hash(path: Path) -> str:
    """SHA-1 of a file's bytes: the cache's content identity (not a security check)."""
    return file_digest(path, "sha1")


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
    """A backbone cut at every stage, each stage globally pooled (or over a grid of regions).

    With ``config.grid`` > 1 every stage but the last is pooled over ``grid`` x ``grid``
    regions (``grid_pool``): the features keep where in the image a pattern is, which
    matters for aligned images such as Fashion-MNIST's centred garments (docs/quality.md).
    The last stage, whose pooled output is ``top``, stays globally pooled: its channels
    are the classifier's features, and nine times 1,280 of them overfit little data.

    Args:
        config: backbone, weights, input size, pooling, flip-averaging, grid, precision.
        engine: what runs the network (``cnnkit.engines``); ``auto`` (the
            default, as in the commands) the fastest usable one, in the
            config's precision. The network is exported once per (backbone,
            weights, size, pooling, flip) for ONNX Runtime and OpenVINO.
    """

    def __init__(self, config: FeatureConfig, engine: Engine | str = Engine.auto):
        self.config = config.resolved()
        self.spec = get_backbone(self.config.backbone)
        self.stages = [s for s in self.spec.layer_choices if s != "top"]
        self.engine = check_engine(engine, self.config.precision)
        self._model = None
        self._runner = None

    @property
    def model(self):
        """Keras model: raw ``uint8`` pixels -> {stage: pooled features}, mirror-averaged with ``flip``."""
        if self._model is None:
            import keras

            size = self.config.image_size
            inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
            maps = stage_maps(self.spec, self.config.weights, size, self.stages)
            pooled, _ = pooled_stages(maps, inputs, {s: self.grid_of(s) for s in self.stages}, self.config.pool,
                                      self.config.flip)
            self._model = keras.Model(inputs, pooled, name=f"{self.spec.name}_features")
        return self._model

    def grid_of(self, stage: str) -> int:
        """Regions per side ``stage`` is pooled over (``stage_grid``)."""
        return stage_grid(self.spec, stage, self.config.grid)

    @property
    def runner(self):
        """The engine running ``model`` (``cnnkit.engines``), made on first use."""
        if self._runner is None:
            self._runner = make_runner(self.engine, self.config.backbone, f"{self.config.network_key}-stages",
                                       lambda: self.model, self.config.image_size, self.config.precision)
        return self._runner

    def __call__(self, images) -> dict[str, np.ndarray]:
        """Pooled features of a batch of raw ``uint8`` images."""
        return {s: np.asarray(v, dtype=np.float32) for s, v in self.runner(np.asarray(images)).items()}

    def extract(self, paths: Sequence[Path], batch_size: int = 32,
                progress: Callable[[int, int], None] | None = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray, list[SkippedFile]]:
        """Pooled features of image files.

        Returns:
            (features, kept, failures): ``features[stage]`` has one row per
            readable file, ``kept`` holds those files' indices in ``paths``.
        """
        return self.extract_stages(paths, self.stages, batch_size, progress)

    def extract_stages(self, paths: Sequence[Path], stages: Sequence[str], batch_size: int = 32,
                       progress: Callable[[int, int], None] | None = None
                       ) -> tuple[dict[str, np.ndarray], np.ndarray, list[SkippedFile]]:
        """``extract``, keeping only ``stages``.

        Each batch's rows are written into one array per stage, allocated for every file at the
        first batch: peak memory is the features once, not a list of batches plus their
        concatenation (8,000 images x 1,472 floats: 47 MB, not 94).
        """
        stream = ImageStream(paths, self.config.image_size, crop_pct=1.0)
        features: dict[str, np.ndarray] = {}
        filled = 0

        def store(images) -> None:
            nonlocal filled
            batch = self(images)
            if not features:
                features.update({s: np.empty((len(paths), batch[s].shape[1]), np.float32) for s in stages})
            for s in stages:
                features[s][filled:filled + len(images)] = batch[s]
            filled += len(images)

        _, kept = stream.map_batches(store, batch_size, progress)
        if not features:
            return {s: np.zeros((0, 0), np.float32) for s in stages}, kept, stream.failures
        # Unreadable files leave rows unfilled at the end: drop them (a copy, only then).
        return ({s: a if filled == len(a) else a[:filled].copy() for s, a in features.items()},
                kept, stream.failures)


@dataclass
class FeatureTable:
    """Features of a list of files, in that order, minus the unreadable ones.

    Attributes:
        features: stage -> (rows, dims) float32.
        kept: indices (into the requested paths) of the rows.
        failures: files that could not be decoded.
        computed: how many images needed a forward pass (0 = all cached).
        hashes: the content hash (SHA-1) of each row's file, when the cache was used.
    """

    features: dict[str, np.ndarray]
    kept: np.ndarray
    failures: list[SkippedFile] = field(default_factory=list)
    computed: int = 0
    hashes: list[str] = field(default_factory=list)

    def select(self, layers: Sequence[str]) -> np.ndarray:
        """The chosen layers' features side by side: (rows, sum of dims); one layer's is the table's own array."""
        parts = [self.features[BackboneSpec.stage_key(layer)] for layer in layers]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


class FeatureCache:
    """Stage features on disk, one row per distinct image content (see the module docstring)."""

    lock_timeout = 120.0  # seconds; past it the update is skipped, costing a forward pass later

    def __init__(self, config: FeatureConfig, root: Path | None = None):
        self.config = config.resolved()
        key = self.config.cache_key  # hashes a weights file: do it once
        self.folder = (root or cache_dir() / "features") / self.config.backbone / key
        self.path = self.folder / "features.npz"
        self.stages = [s for s in get_backbone(self.config.backbone).layer_choices if s != "top"]
        self.meta = {"format": _FORMAT, "backbone": self.config.backbone, "key": key,
                     "image_size": self.config.image_size, "pool": self.config.pool,
                     "flip": self.config.flip, "precision": self.config.precision,
                     **({"grid": self.config.grid} if self.config.grid > 1 else {})}

    def load(self, stages: Sequence[str] | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
        """The cached (row hashes, {stage: rows}), or empty if absent or not exactly as written.

        ``stages``: read only these (``None``: every stage; a merge needs them all).
        """
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                names = set(npz.files)
                if names != {"hashes", "meta", *self.stages}:
                    return [], {}
                if json.loads(str(npz["meta"][()])) != self.meta:
                    return [], {}
                hashes = [str(h) for h in npz["hashes"].tolist()]
                arrays = {s: npz[s] for s in self.stages if stages is None or s in stages}
        # The cache only saves time: whatever is wrong with it (missing,
        # truncated, not a zip, a pickled array, garbage JSON, a huge declared
        # shape) means "recompute", never a crash and never a guessed row.
        except Exception:  # noqa: BLE001
            return [], {}
        if (len(set(hashes)) != len(hashes) or not all(_HASH.fullmatch(h) for h in hashes)
                or any(a.dtype != np.float32 or a.ndim != 2 or len(a) != len(hashes)
                       for a in arrays.values())):
            return [], {}
        return hashes, arrays

    def add(self, hashes: list[str], arrays: dict[str, np.ndarray],
            base: tuple[list[str], dict[str, np.ndarray]]) -> tuple[list[str], dict[str, np.ndarray]]:
        """Merge new rows into the cache on disk and publish it.

        Returns the merged cache. If it cannot be saved (unwritable, full disk,
        lock not obtained) the rows are merged into ``base`` in memory only.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with exclusive_lock(self.folder / "lock", self.lock_timeout):
                self._remove_leftovers()
                merged = _merge(self.load(), hashes, arrays)
                self._publish(*merged)
                return merged
        except OSError:
            return _merge(base, hashes, arrays)

    def _publish(self, hashes: list[str], arrays: dict[str, np.ndarray]) -> None:
        members = {"hashes": np.array(hashes, dtype="U40"),
                   "meta": np.array(json.dumps(self.meta)), **arrays}
        handle = tempfile.NamedTemporaryFile(dir=self.folder, prefix="features.", suffix=".tmp",
                                             delete=False)
        try:
            with handle:
                _write_npz(handle, members)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, self.path)
        except BaseException:
            # Never leave a half-written file behind (a SIGKILL still can: the
            # next writer removes it).
            Path(handle.name).unlink(missing_ok=True)
            raise

    def _remove_leftovers(self) -> None:
        """Called under the lock: every *.tmp was left by a killed writer; the
        per-stage .npy/.json files are the unsafe format of cnnkit 0.1."""
        for pattern in ("*.tmp", "*.npy", "hashes.json", "meta.json"):
            for path in self.folder.glob(pattern):
                path.unlink(missing_ok=True)


_HASH = re.compile(r"[0-9a-f]{40}")


def _write_npz(handle, members: dict[str, np.ndarray]) -> None:
    np.savez(handle, **members)


@contextmanager
def exclusive_lock(path: Path, timeout: float):
    """Hold an exclusive flock on ``path``; TimeoutError (an OSError) after ``timeout`` s.

    The kernel drops the lock when its holder dies, even by SIGKILL.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:  # no flock on Windows: concurrent writers may then drop rows, never mix them
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{path}: held by another process") from None
                    time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _merge(base: tuple[list[str], dict[str, np.ndarray]], hashes: list[str],
           arrays: dict[str, np.ndarray]) -> tuple[list[str], dict[str, np.ndarray]]:
    """``base`` plus the rows of ``hashes`` it does not have yet."""
    old_hashes, old = base
    if set(old) != set(arrays) or any(old[s].shape[1:] != arrays[s].shape[1:] for s in arrays):
        old_hashes, old = [], {}  # a cache of other dimensions cannot be extended
    first_row = {h: i for i, h in reversed(list(enumerate(hashes)))}
    known = set(old_hashes)
    new_rows = [i for h, i in first_row.items() if h not in known]
    if not old_hashes:
        return [hashes[i] for i in new_rows], {s: take_rows(a, new_rows)
                                               for s, a in arrays.items()}
    return (old_hashes + [hashes[i] for i in new_rows],
            {s: np.concatenate([old[s], arrays[s][new_rows]]) for s in arrays})


# What makes the extractor of images missing from the cache: ``FeatureExtractor`` in this process, unless
# ``extracting_with`` names another (``cnnkit.cluster``: the forward passes on a Ray cluster). The rows it
# returns are merged into the cache by ``compute_features`` as any local run's.
_EXTRACTOR_FACTORY: ContextVar[Callable | None] = ContextVar("cnnkit_extractor_factory", default=None)


@contextmanager
def extracting_with(factory: Callable):
    """Within the block, ``compute_features`` computes missing rows with ``factory(config, engine)``.

    The factory returns an object with ``FeatureExtractor``'s ``stages``, ``extract`` and
    ``extract_stages``; hashing, the cache lookup and the merge stay in this process.
    """
    token = _EXTRACTOR_FACTORY.set(factory)
    try:
        yield
    finally:
        _EXTRACTOR_FACTORY.reset(token)


def make_extractor(config: FeatureConfig, engine: Engine | str = Engine.auto):
    """The extractor ``compute_features`` uses: ``extracting_with``'s, else a ``FeatureExtractor``."""
    factory = _EXTRACTOR_FACTORY.get()
    return factory(config, engine) if factory is not None else FeatureExtractor(config, engine)


def compute_features(paths: Sequence[Path], config: FeatureConfig, batch_size: int = 32,
                     use_cache: bool = True, extractor: FeatureExtractor | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     engine: Engine | str = Engine.auto, stages: Sequence[str] | None = None) -> FeatureTable:
    """Stage features for image files, from the cache where possible.

    Args:
        paths: the image files.
        config: backbone, weights, size, pooling, flip, precision.
        use_cache: read and extend the on-disk cache.
        extractor: reuse an already built extractor.
        progress: ``(done, total)`` callback over the images needing a forward pass.
        engine: what runs the network when some image is not cached.
        stages: the stage keys to return (``None``: all); the cache still gets every stage.
    """
    paths = [Path(p) for p in paths]
    if not use_cache:
        extractor = extractor or make_extractor(config, engine)
        features, kept, failures = extractor.extract_stages(paths, stages or extractor.stages, batch_size,
                                                            progress)
        return FeatureTable(features, kept, failures, computed=len(kept))

    cache = FeatureCache(config)
    hashes = content_hashes(paths)  # files unchanged since they were last hashed are not read again
    # Only the stages asked for are read (the others are a quarter of a grid-pooled cache); a merge reads all.
    cached_hashes, cached = cache.load(stages)
    row_of = {h: i for i, h in enumerate(cached_hashes)}
    todo = [i for i, h in enumerate(hashes) if h and h not in row_of]
    # Duplicated files need one forward pass each, not one per copy.
    todo = list({hashes[i]: i for i in reversed(todo)}.values())[::-1]
    failures: list[SkippedFile] = []
    computed = 0  # images that got a forward pass now (not the unreadable ones tried)
    if todo:
        own = extractor or make_extractor(config, engine)
        new, kept, failures = own.extract([paths[i] for i in todo], batch_size, progress)
        own = None  # an engine we made is freed now (~150 MB), before the cache is merged and read
        new_hashes = [hashes[todo[k]] for k in kept]
        computed = len(new_hashes)
        if new_hashes:
            # Rows come from the merged cache, so they agree with what was published.
            cached_hashes, cached = cache.add(new_hashes, new, cache.load() if stages else (cached_hashes, cached))
            row_of = {h: i for i, h in enumerate(cached_hashes)}
    failed = {f.path for f in failures}
    failures = failures + [SkippedFile(p, "no such file" if not os.path.lexists(p) else "not a readable file")
                           for p, h in zip(paths, hashes) if not h]
    kept = np.array([i for i, h in enumerate(hashes) if h in row_of and paths[i] not in failed], np.int64)
    rows = np.array([row_of[hashes[i]] for i in kept], np.int64)
    # A view only of the whole cache (made by this very list of files): a view of part of it would
    # keep all of it in memory.
    features = {s: take_rows(a, rows) if len(rows) == len(a) else a[rows]
                for s, a in cached.items() if stages is None or s in stages}
    return FeatureTable(features, kept, failures, computed=computed, hashes=[hashes[i] for i in kept])


def take_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``; a view, not a second copy of the features, when ``rows`` is a run of
    consecutive rows (every row of a cache made by this very list of files; one split's rows)."""
    rows = np.asarray(rows, np.int64)
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        return array[rows[0]:rows[-1] + 1]
    return array[rows]

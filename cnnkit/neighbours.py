"""One nearest-neighbour index over cached CNN features, shared by `doctor` and `label-next`.

The index is the features centred, reduced by PCA to at most ``DIMS`` components and
scaled to unit length; neighbours are exact cosine neighbours in that space, found by brute
force: one matrix product per chunk of queries against every row, then an exact blocked top-k.

Why this one:

- **Exact and memory-linear.** Memory is the rows plus one chunk of similarities
  (``CHUNK`` x n floats) and ``k`` neighbours per query: linear in the number of images,
  never the n x n matrix.
- **Fast without another binary.** The matrix product is BLAS; picking each query's ``k``
  best of n is what costs (``_best``): the columns are dealt into ``BLOCKS`` interleaved
  groups, the ``k`` groups with the highest maximum hold the ``k`` best (any other group's
  values are all below ``k`` better ones), and only those ``k x n / BLOCKS`` values are
  partitioned. The 10-neighbour graph of 60,000 images: 19.8 s with scikit-learn's
  ``NearestNeighbors(algorithm="brute")`` (its ``ArgKmin`` heaps), 13.6 s so
  (docs/doctor.md), the same neighbours. At 128 dimensions; 1,280 (EfficientNet-Lite0's
  features) would cost about 10x the products, hence the PCA, which keeps the neighbours of
  the full features (recall of the 10 nearest at 128 dimensions in ``docs/doctor.md``).
  FAISS's flat index is about as fast per row but adds a 30 MB native wheel; approximate
  indexes (HNSW, NN-descent) only pay off past millions of rows, where `doctor` should run
  on a cluster anyway (issue: batch prediction on a distributed engine).
- Cost grows as n^2 x dims for the graph (every image against every image), n x dims^2 for
  the PCA, and n x (dims + k) in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Components kept: enough for the 10 nearest neighbours of the full features (docs/doctor.md).
DIMS = 128


# Queries per matrix product, and the interleaved column groups of the top-k selection (measured on
# 20,000 x 60,000 similarities: 512 and 32 were the fastest of 256-2,048 and 8-128).
CHUNK = 512
BLOCKS = 32
# Similarities (queries x rows) past which a search is shared among processes.
PARALLEL = 50_000_000


def _best(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` highest (column, value) of (c, n) ``scores``, highest first."""
    rows, n = scores.shape
    if n >= 4 * BLOCKS * k:
        # Column j is in group j mod (n / BLOCKS); the k best lie in the k groups with the highest
        # maxima, so only those are partitioned (exact).
        # The last n mod BLOCKS columns stay candidates whatever their group would be.
        groups = n // BLOCKS
        dealt = scores[:, :BLOCKS * groups].reshape(rows, BLOCKS, groups)  # a view, no copy
        top = np.argpartition(dealt.max(axis=1), -k, axis=1)[:, -k:]  # (c, k) groups
        values = np.concatenate([np.take_along_axis(dealt, top[:, None, :], 2).reshape(rows, -1),
                                 scores[:, BLOCKS * groups:]], axis=1)
        columns = np.concatenate([(np.arange(BLOCKS)[None, :, None] * groups + top[:, None, :]).reshape(rows, -1),
                                  np.broadcast_to(np.arange(BLOCKS * groups, n), (rows, n - BLOCKS * groups))], axis=1)
    else:
        values, columns = scores, np.broadcast_to(np.arange(n), scores.shape)
    pick = np.argpartition(values, -k, axis=1)[:, -k:]
    picked = np.take_along_axis(values, pick, 1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return (np.take_along_axis(np.take_along_axis(columns, pick, 1), order, 1).astype(np.int64),
            np.take_along_axis(picked, order, 1).astype(np.float32))


@dataclass
class NeighbourIndex:
    """Unit-length PCA-reduced rows, searched exactly by cosine similarity.

    Attributes:
        vectors: (n, d) float32 unit rows, one per image of the index.
        mean: (dims of the features,) subtracted before the projection.
        components: (d, dims of the features) PCA projection (``None``: none, only centring).
    """

    vectors: np.ndarray
    mean: np.ndarray
    components: np.ndarray | None = None

    @classmethod
    def build(cls, features: np.ndarray, dims: int = DIMS, seed: int = 0, centre: bool = True) -> NeighbourIndex:
        """Index ``features`` (n, D): centre, project on the top ``dims`` principal axes, normalise.

        ``centre=False`` keeps the origin: the projection is on the top axes of the uncentred rows (a
        truncated SVD), so similarities approximate the cosine of the features as the network gives
        them. That is the space for "unlike the rest" (``cnnkit.doctor`` outliers): centred, what every
        image shares is removed and a crowd of foreign photos, far from the mean in a common
        direction, became each other's close neighbours (7 of 10 flagged; uncentred 10 of 10,
        docs/doctor.md). Neighbours of images of the data's own kind (copies, label-next) need the
        centred space, where what tells its images apart is what is left.
        """
        features = np.asarray(features, np.float32)
        if not centre:
            mean = np.zeros(features.shape[1], np.float32)
            components = None
            if features.shape[1] > dims and len(features) > dims:
                # The top eigenvectors of X'X are the truncated SVD's axes; D x D, cheap for D <= a few 1,000.
                gram = features.T.astype(np.float64) @ features.astype(np.float64)
                _, vectors = np.linalg.eigh(gram)
                components = vectors[:, ::-1][:, :dims].T.astype(np.float32)
        else:
            mean = features.mean(axis=0) if len(features) else np.zeros(features.shape[1], np.float32)
            components = None
            if features.shape[1] > dims and len(features) > dims:
                from sklearn.decomposition import PCA

                solver = "covariance_eigh" if len(features) > features.shape[1] else "full"
                pca = PCA(n_components=dims, svd_solver=solver, random_state=seed).fit(features)
                components = pca.components_.astype(np.float32)
                mean = pca.mean_.astype(np.float32)
        index = cls(np.zeros((0, 0), np.float32), mean.astype(np.float32), components)
        index.vectors = index.embed(features)
        return index

    def embed(self, features: np.ndarray) -> np.ndarray:
        """Rows in the index's space: centred, projected, unit length (float32)."""
        centred = np.asarray(features, np.float32) - self.mean
        reduced = centred @ self.components.T if self.components is not None else centred
        return (reduced / np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows nearest to each embedded query (``embed``), best first.

        Returns:
            (indices, similarities): each (queries, min(k, len(self))); cosine similarities.
        """
        k = min(k, len(self))
        if k == 0 or not len(queries):
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        queries = np.asarray(queries, np.float32)

        def nearest(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            indices = np.empty((bounds[1] - bounds[0], k), np.int64)
            similarities = np.empty((bounds[1] - bounds[0], k), np.float32)
            for start in range(bounds[0], bounds[1], CHUNK):
                stop = min(start + CHUNK, bounds[1])
                indices[start - bounds[0]:stop - bounds[0]], similarities[start - bounds[0]:stop - bounds[0]] = _best(
                    queries[start:stop] @ self.vectors.T, k)
            return indices, similarities

        from cnnkit.forked import cores, forked_map

        # Past ``PARALLEL`` similarities, the queries are shared among forked processes, one per core, each
        # on one BLAS thread: the selection runs on every core too (60,000 images: docs/doctor.md).
        workers = cores() if len(queries) * len(self) >= PARALLEL else 1
        edges = np.linspace(0, len(queries), workers + 1).astype(int)
        parts = forked_map(nearest, list(zip(edges[:-1], edges[1:])), workers, threads=1)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def graph(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's ``k`` nearest *other* rows, best first (an exact copy of a row counts as other).

        Returns:
            (indices, similarities): each (n, min(k, n - 1)).
        """
        k = min(k, len(self) - 1)
        if k <= 0:
            return np.zeros((len(self), 0), np.int64), np.zeros((len(self), 0), np.float32)
        indices, similarities = self.search(self.vectors, k + 1)
        rows = np.arange(len(self))[:, None]
        # Drop each row itself; where identical rows tie, the row may not come first, so drop
        # it wherever it is, else the last column.
        is_self = indices == rows
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        keep = np.ones_like(indices, bool)
        keep[np.arange(len(self)), drop] = False
        return indices[keep].reshape(len(self), k), similarities[keep].reshape(len(self), k)

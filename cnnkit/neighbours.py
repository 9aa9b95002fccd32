"""One nearest-neighbour index over cached CNN features, shared by `doctor` and `label-next`.

The index is the features centred, reduced by PCA to at most ``DIMS`` components and
scaled to unit length; neighbours are exact cosine neighbours in that space, found by
scikit-learn's brute-force search (``NearestNeighbors(algorithm="brute")``).

Why this one:

- **Exact and memory-linear.** scikit-learn's brute search runs its ``ArgKmin`` reduction:
  a matrix product of a chunk of queries against every row, reduced to each query's ``k``
  best by a heap, chunk after chunk. Memory is the rows plus one chunk of distances and
  ``k`` neighbours per query: linear in the number of images, never the n x n matrix.
- **Fast enough without another binary.** The whole k-neighbour graph of 60,000 images
  costs about 12 s on two cores at 128 dimensions (``bench/neighbours_speed.py``), 90 s
  at EfficientNet-Lite0's 1,280 -- hence the PCA, which keeps the neighbours of the full
  features (recall of the 10 nearest at 128 dimensions in ``docs/doctor.md``). FAISS's flat
  index is about as fast per row but adds a 30 MB native wheel; approximate indexes
  (HNSW, NN-descent) only pay off past millions of rows, where `doctor` should run on a
  cluster anyway (issue: batch prediction on a distributed engine).
- Cost grows as n^2 x dims for the graph (every image against every image), n x dims^2 for
  the PCA, and n x (dims + k) in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Components kept: enough for the 10 nearest neighbours of the full features (docs/doctor.md).
DIMS = 128


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
        from sklearn.neighbors import NearestNeighbors

        search = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(self.vectors)
        distances, indices = search.kneighbors(np.asarray(queries, np.float32))
        return indices.astype(np.int64), (1.0 - distances.astype(np.float32) ** 2 / 2.0)

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

"""Retrieval: the training images nearest to a query image by cosine similarity.

The run's index is the L2-normalised training features as one float32 matrix
(``index/features.npy``), searched exactly with one matrix product. That is
numpy/BLAS, no extra dependency and no index to build or keep in step; exact
search over 100k x 1280 features takes tens of milliseconds per query on two
CPU cores (see bench/similar_speed.py), so an approximate index (hnswlib,
faiss) would add build time and a binary format for no gain at this scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError


def write_index(folder: Path, features: np.ndarray, labels, paths,
                embed: Callable[[np.ndarray], np.ndarray] | None = None, chunk: int = 2048) -> None:
    """Write a retrieval index into a run folder being written: unit rows, labels, paths.

    ``embed`` (e.g. the head's scaling) is applied to ``features`` first. Rows are embedded,
    normalised and written ``chunk`` at a time, so the index never exists twice in memory.
    """
    import json

    (folder / "index").mkdir(exist_ok=True)
    rows = len(features)
    with open(folder / "index" / "features.npy", "wb") as out:
        header_written = False
        for start in range(0, max(rows, 1), chunk):
            part = np.asarray(embed(features[start:start + chunk]) if embed else features[start:start + chunk],
                              np.float32)
            part = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
            if not header_written:
                np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(part.dtype),
                                                           "fortran_order": False,
                                                           "shape": (rows, *part.shape[1:])})
                header_written = True
            out.write(np.ascontiguousarray(part).tobytes())
    np.save(folder / "index" / "labels.npy", np.asarray(labels, np.int64))
    (folder / "index" / "paths.json").write_text(json.dumps([str(p) for p in paths], ensure_ascii=False))


@dataclass
class Neighbour:
    path: str
    label: str
    score: float


def nearest(index: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine neighbours of each query among the unit-length rows of ``index``.

    Returns:
        (indices, scores), each (queries, k), best first.
    """
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    k = min(k, len(index))
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_indices = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(index), chunk):
        scores = queries.astype(np.float32) @ index[start:start + chunk].T
        top = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        best_indices = np.concatenate([best_indices, top + start], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, keep, 1)
        best_indices = np.take_along_axis(best_indices, keep, 1)
    return best_indices, best_scores


def similar_images(run_path: str | Path, image: str | Path, k: int = 5, engine: str = "auto",
                   precision: str = "float32") -> list[Neighbour]:
    """The ``k`` training images of a run most similar to ``image``.

    Args:
        engine: what runs the network (``cnnkit.engines``), in ``precision``; a feature-head
            run whose query image is in the feature cache runs none.
    """
    from cnnkit.runs import load_run

    run = load_run(run_path)
    if not run.has("index/features.npy"):
        raise CnnkitError(f"{run_path}: this run has no retrieval index")
    index = run.load_array("index/features.npy")
    labels = run.load_array("index/labels.npy")
    paths = run.load_json("index/paths.json")
    if len(index) != len(labels) or len(index) != len(paths):
        raise CnnkitError(f"{run_path}: the retrieval index is inconsistent; re-create the run")
    query, kept, failures = run.classifier(engine, precision).embed_files([Path(image)])
    if not len(kept):
        raise CnnkitError(f"{failures[0].path}: {failures[0].reason}")
    if query.shape[1] != index.shape[1]:
        raise CnnkitError(f"{run_path}: index has {index.shape[1]} dims, the model gives {query.shape[1]}")
    rows, scores = nearest(index, query, k)
    return [Neighbour(paths[r], run.class_names[int(labels[r])], float(s))
            for r, s in zip(rows[0], scores[0])]

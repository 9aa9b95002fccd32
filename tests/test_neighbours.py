"""The shared nearest-neighbour index: exact cosine neighbours in a PCA-reduced space."""

import numpy as np

from cnnkit.neighbours import NeighbourIndex


def _exact_top(features, k):
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    scores = unit @ unit.T
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1)[:, :k]


def test_without_reduction_the_graph_is_the_exact_cosine_graph_of_the_centred_rows():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((200, 16)).astype(np.float32)
    index = NeighbourIndex.build(features, dims=32)
    assert index.components is None
    indices, similarities = index.graph(5)
    expected = _exact_top(features - features.mean(axis=0), 5)
    assert (indices == expected).mean() > 0.99  # float32 ties aside
    assert np.all(np.diff(similarities, axis=1) <= 1e-6)  # best first
    assert not np.any(indices == np.arange(200)[:, None])  # never itself


def test_reduction_keeps_the_near_neighbours_of_clustered_features():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, 300)).astype(np.float32) * 3
    features = np.repeat(centres, 10, axis=0) + rng.standard_normal((200, 300)).astype(np.float32)
    index = NeighbourIndex.build(features, dims=32)
    assert index.vectors.shape == (200, 32)
    indices, _ = index.graph(9)
    assert np.mean(indices // 10 == (np.arange(200) // 10)[:, None]) > 0.98


def test_exact_copies_are_each_others_nearest_at_similarity_one():
    rng = np.random.default_rng(2)
    features = rng.standard_normal((50, 8)).astype(np.float32)
    features[7] = features[3]
    indices, similarities = NeighbourIndex.build(features).graph(1)
    assert indices[3, 0] == 7 and indices[7, 0] == 3
    assert similarities[3, 0] > 0.9999


def test_queries_use_the_same_projection_and_small_indexes_do_not_fail():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((300, 200)).astype(np.float32)
    index = NeighbourIndex.build(features, dims=16)
    rows, scores = index.search(index.embed(features[:4]), 3)
    assert list(rows[:, 0]) == [0, 1, 2, 3] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    one = NeighbourIndex.build(features[:1])
    assert one.graph(5)[0].shape == (1, 0)


def test_an_uncentred_index_ranks_by_the_cosine_of_the_features_as_given():
    """centre=False: without reduction the exact cosine graph of the rows themselves; reduced (a
    truncated SVD), the same near neighbours, and a shared offset is not subtracted."""
    rng = np.random.default_rng(2)
    offset = np.abs(rng.standard_normal(300)).astype(np.float32) * 4  # what every image shares
    centres = rng.standard_normal((20, 300)).astype(np.float32) * 3
    features = offset + np.repeat(centres, 10, axis=0) + rng.standard_normal((200, 300)).astype(np.float32)
    exact = NeighbourIndex.build(features, dims=400, centre=False)
    assert exact.components is None and not exact.mean.any()
    assert (exact.graph(5)[0] == _exact_top(features, 5)).mean() > 0.99
    reduced = NeighbourIndex.build(features, dims=32, centre=False)
    assert reduced.components.shape == (32, 300) and not reduced.mean.any()
    neighbours = reduced.graph(9)[0]
    assert np.mean(neighbours // 10 == np.arange(200)[:, None] // 10) > 0.95
    # Two images of different clusters still share the offset: similar uncentred, unrelated centred.
    assert float(reduced.vectors[0] @ reduced.vectors[150]) > 0.5
    centred = NeighbourIndex.build(features, dims=32)
    assert abs(float(centred.vectors[0] @ centred.vectors[150])) < 0.3


def test_the_blocked_selection_picks_each_rows_exact_best():
    """Past a few thousand rows each query's ``k`` best come from its best interleaved column groups
    (``neighbours._best``): the same columns and values as sorting every row, remainder columns and
    ties included."""
    from cnnkit.neighbours import BLOCKS, _best

    rng = np.random.default_rng(5)
    k = 7
    scores = rng.standard_normal((40, 4 * BLOCKS * k * 3 + 13)).astype(np.float32)
    scores[:, -1] = 9.0  # a best value among the remainder columns
    scores[0, 5] = scores[0, 6] = 8.0  # a tie
    columns, values = _best(scores, k)
    expected = np.sort(scores, axis=1)[:, ::-1][:, :k]
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(np.take_along_axis(scores, columns, 1), expected)
    assert all(len(set(row)) == k for row in columns.tolist())
    assert (columns[:, 0] == scores.shape[1] - 1).all() and set(columns[0, 1:3]) == {5, 6}


def test_a_large_search_shared_among_processes_finds_the_same_neighbours(monkeypatch):
    """Past ``PARALLEL`` similarities the queries are shared among forked processes on one BLAS thread each:
    the same neighbours, similarities equal to float32 rounding."""
    import cnnkit.forked as forked
    import cnnkit.neighbours as neighbours

    rng = np.random.default_rng(5)
    index = NeighbourIndex.build(rng.normal(size=(700, 40)).astype(np.float32), dims=16)
    alone = index.graph(6)
    monkeypatch.setattr(neighbours, "PARALLEL", 1)
    monkeypatch.setattr(forked, "cores", lambda: 2)
    shared = index.graph(6)
    np.testing.assert_array_equal(shared[0], alone[0])
    np.testing.assert_allclose(shared[1], alone[1], atol=1e-6)

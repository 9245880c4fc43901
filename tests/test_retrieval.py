"""retrieval: cosine k-nearest neighbours (NumPy) and TF-IDF embeddings, checked against brute force."""
from __future__ import annotations

import numpy as np

from semievol_local.core.retrieval import knn, normalize, tfidf_embed


def test_knn_is_the_cosine_ranking_nearest_first():
    rng = np.random.default_rng(0)
    index, queries = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    ids, sims = knn(index, queries, 5, chunk=3)  # chunks: the same as one pass
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (index / np.linalg.norm(index, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(ids, np.argsort(-cos, axis=1)[:, :5])
    np.testing.assert_allclose(sims, np.take_along_axis(cos, ids, axis=1), atol=1e-6)
    assert (np.diff(sims, axis=1) <= 1e-7).all()  # nearest first
    np.testing.assert_array_equal(knn(index, queries, 5)[0], ids)


def test_knn_ties_go_to_the_lower_index_and_k_is_capped():
    index = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # rows 0 and 1: the same direction
    ids, sims = knn(index, np.array([[1.0, 0.0]]), 5)
    assert ids.tolist() == [[0, 1, 2]] and np.allclose(sims, [[1, 1, 0]])
    ids, sims = knn(index, np.array([[1.0, 0.0]]), 0)
    assert ids.shape == (1, 0) and sims.shape == (1, 0)


def test_normalize_leaves_zero_rows_zero():
    x = normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 0.0]])


def test_tfidf_puts_a_text_nearest_to_the_ones_sharing_its_words():
    labeled = ["the bank raised interest rates", "the team won the football match", "rain is expected tomorrow"]
    queries = ["interest rates at the bank", "who won the match", "tomorrow brings rain"]
    a, q = tfidf_embed(labeled, labeled), tfidf_embed(labeled, queries)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-6)
    ids, _ = knn(a, q, 1)
    assert ids[:, 0].tolist() == [0, 1, 2]

"""In-context propagation's retrieval: cosine k-nearest neighbours over embeddings. NumPy in, NumPy out.

Embeddings come from elsewhere (the model's pooled hidden states through llama.cpp, or TF-IDF here);
this module does no I/O and knows nothing about prompts.
"""
from __future__ import annotations

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def knn(index: np.ndarray, queries: np.ndarray, k: int, *, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar rows of `index` (N, d) for each query (Q, d).

    Returns (ids (Q, k), similarities (Q, k)), nearest first; ties go to the lower index, so the
    result is deterministic.
    """
    k = min(k, len(index))
    if k <= 0:
        return np.zeros((len(queries), 0), dtype=np.int64), np.zeros((len(queries), 0), dtype=np.float32)
    a, q = normalize(index), normalize(queries)
    ids, sims = [], []
    for start in range(0, len(q), chunk):  # bounded memory: (chunk, N) similarities at a time
        s = q[start:start + chunk] @ a.T  # (c, N)
        # stable sort on -similarity keeps lower indices first among equals
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (c, k)
        ids.append(top)
        sims.append(np.take_along_axis(s, top, axis=1))
    return np.concatenate(ids).astype(np.int64), np.concatenate(sims).astype(np.float32)


def tfidf_embed(fit_texts: list[str], texts: list[str]) -> np.ndarray:
    """TF-IDF vectors (dense, L2-normalized) of `texts`, vocabulary fitted on `fit_texts`."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1)
    vec.fit(fit_texts)
    return normalize(vec.transform(texts).toarray())

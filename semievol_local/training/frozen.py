"""The frozen blocks' outputs, computed once: blocks below the first LoRA block never change during a
fine-tune, so their output for each sequence is computed before the first step (and kept by token
sequence for the next fine-tune), and every step runs only the blocks that carry LoRA."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.nn import Module as Model
from mlx_lm.models.base import create_attention_mask

from ..core.files import atomic_target
from . import batching

log = logging.getLogger(__name__)


def blocks(model: Model, h: mx.array, first: int, last: int) -> mx.array:
    """Blocks first..last-1 on hidden states (B, L, D), causal, no KV cache (right padding is never seen)."""
    mask = create_attention_mask(h, None)  # as mlx-lm's LlamaModel: "causal", or None for one position
    for layer in model.model.layers[first:last]:
        h = layer(h, mask, cache=None)
    return h


TRUNK_CACHE_BYTES = 2 * 1024**3  # the most the frozen blocks' outputs may take; beyond it they are recomputed


def outputs(model: Model, seqs: list[batching.Seq], first: int, batch_size: int,
           on_progress: Callable[[int, int], None] = lambda done, total: None,
           only: np.ndarray | None = None, store: Path | None = None) -> tuple[list[np.ndarray] | None, int]:
    """The output of blocks 0..first-1 for every sequence's inputs (or the sequences `only`; the others
    get None), (len - 1, D) float32 each, or None when they would take more than TRUNK_CACHE_BYTES; and
    how many were read from `store`.

    Blocks below the first LoRA block are frozen and see no LoRA below them, so their output for a
    sequence never changes during training: computed once here, each step then runs (forward and
    backward) only the blocks that have LoRA. Right padding and causal attention make each row's valid
    positions independent of the batch it is computed in, up to rounding (BLAS sums in an order that
    depends on the shapes: a resumed run groups the same rows as an uninterrupted one).

    `store`: a folder of outputs by token sequence (one .npy each, for this model and `first`); sequences
    found there are read, not computed, and those computed are added (the final fine-tune reuses the
    warm-up's labeled rows)."""
    dim = model.args.hidden_size
    want = np.arange(len(seqs)) if only is None else np.unique(only)
    if sum(len(seqs[i][0]) - 1 for i in want) * dim * 4 > TRUNK_CACHE_BYTES:
        log.info("frozen blocks' outputs exceed %d bytes: recomputed every step", TRUNK_CACHE_BYTES)
        return None, 0
    out: list[np.ndarray | None] = [None] * len(seqs)

    def stored(i: int) -> Path:
        return store / (hashlib.sha256(np.asarray(seqs[i][0][:-1], np.int64).tobytes()).hexdigest()[:32] + ".npy")

    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        for i in want:
            try:
                h = np.load(stored(i))
                if h.shape == (len(seqs[i][0]) - 1, dim) and h.dtype == np.float32:
                    out[i] = h
            except (OSError, ValueError):
                pass  # absent or damaged: computed again
    todo = np.array([i for i in want if out[i] is None], dtype=np.int64)
    reused = len(want) - len(todo)
    order = todo[np.argsort([len(seqs[i][0]) for i in todo], kind="stable")]  # similar lengths together: little padding
    if reused:
        log.info("frozen blocks' outputs of %d sequences read from %s", reused, store)
        on_progress(reused, len(want))
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        inputs = mx.array(batching.collate(seqs, idx)[0])  # (B, L)
        h = blocks(model, model.model.embed_tokens(inputs), 0, first)  # (B, L, D)
        mx.eval(h)
        h = np.array(h, dtype=np.float32)
        for r, j in enumerate(idx):
            out[j] = h[r, : len(seqs[j][0]) - 1]
            if store is not None:
                with atomic_target(stored(j)) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, out[j])
        on_progress(reused + i + len(idx), len(want))
    return out, reused


def padded(trunk: list[np.ndarray], idx, length: int) -> np.ndarray:
    """Cached trunk outputs of the sequences `idx`, right-padded with zeros to `length`: (B, L, D)."""
    h = np.zeros((len(idx), length, trunk[idx[0]].shape[1]), np.float32)
    for r, i in enumerate(idx):
        h[r, : len(trunk[i])] = trunk[i]
    return h

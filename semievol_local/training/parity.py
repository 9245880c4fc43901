"""llama.cpp's logits for a GGUF (+ optional LoRA adapter), and how far another engine's logits are from them.

Used to check that MLX and llama.cpp compute the same model from the same file, with and without the
exported adapter. It does not sample, tokenize or format prompts (that is `llama_engine`'s job), and it
does not touch MLX: the comparison is NumPy in, NumPy out.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def llama_logits_many(model_path, adapter_gguf, sequences: list[list[int]], *,
                      n_threads: int | None = None) -> list[np.ndarray]:
    """(T, vocab) float32 logits of each token sequence, one model load for all of them."""
    import llama_cpp

    n_ctx = max(64, max(len(s) for s in sequences))
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(adapter_gguf) if adapter_gguf else None,
                          logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads or os.cpu_count(),
                          verbose=False)
    try:
        out = []
        for seq in sequences:
            llm.reset()  # no KV prefix reuse between sequences
            llm.eval(list(seq))
            out.append(np.array(llm.scores[: llm.n_tokens], dtype=np.float32))  # copy: the buffer is reused
        return out
    finally:
        llm.close()


def llama_logits(model_path, adapter_gguf: str | Path | None, token_ids: list[int]) -> np.ndarray:
    """(T, vocab) float32 next-token logits from llama.cpp, with the GGUF LoRA adapter applied when given."""
    return llama_logits_many(model_path, adapter_gguf, [token_ids])[0]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, other: np.ndarray) -> dict:
    """Per-position KL(ref || other) over the full vocabulary and top-1 agreement; both (T, vocab)."""
    if ref.shape != other.shape:
        raise ValueError(f"logit shapes differ: {ref.shape} vs {other.shape}")
    lp, lq = _log_softmax(ref), _log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)  # (T,)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((ref.argmax(-1) == other.argmax(-1)).mean()), "n_positions": int(len(kl))}

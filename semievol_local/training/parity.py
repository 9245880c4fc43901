"""llama.cpp's logits for a GGUF (+ optional LoRA adapter), and how far another engine's logits are from them.

Used to check that MLX and llama.cpp compute the same model from the same file, with and without the
exported adapter. It does not sample, tokenize or format prompts (that is `llama_engine`'s job), and it
does not touch MLX: the comparison is NumPy in, NumPy out.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.special import log_softmax


def llama_logits_many(model_path, adapter_gguf, sequences: list[list[int]], *,
                      n_threads: int | None = None) -> list[np.ndarray]:
    """(T, vocab) float32 logits of each token sequence, one model load for all of them."""
    import llama_cpp

    from llama_cpp._utils import suppress_stdout_stderr

    n_ctx = max(64, max(len(s) for s in sequences))
    with suppress_stdout_stderr(disable=False):  # llama.cpp logs from C even with verbose=False
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


ROWS = 64  # positions per float64 pass: under a 262k vocabulary (gemma) 134 MB per array, not T times that


def position_kl(ref: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(ref || other) over the full vocabulary, and whether the top-1 tokens agree; both (T, vocab)."""
    if ref.shape != other.shape:
        raise ValueError(f"logit shapes differ: {ref.shape} vs {other.shape}")
    kl = np.empty(len(ref))
    for i in range(0, len(ref), ROWS):
        lp = log_softmax(ref[i:i + ROWS].astype(np.float64), axis=-1)
        lq = log_softmax(other[i:i + ROWS].astype(np.float64), axis=-1)
        kl[i:i + ROWS] = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return kl, ref.argmax(-1) == other.argmax(-1)


def summarize(kl: np.ndarray, agree: np.ndarray) -> dict:
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(agree.mean()), "n_positions": int(len(kl))}


def compare_logits(ref: np.ndarray, other: np.ndarray) -> dict:
    """Per-position KL(ref || other) over the full vocabulary and top-1 agreement; both (T, vocab)."""
    return summarize(*position_kl(ref, other))


LOGITS_BUDGET = 1 << 30  # bytes of one model's float32 logits held at once by `compare_llama`


def compare_llama(reference: tuple, other: tuple, sequences: list[list[int]], *, vocab: int,
                  n_threads: int | None = None, budget: int = LOGITS_BUDGET) -> dict:
    """`compare_logits` of two llama.cpp models, each a (GGUF, adapter or None), on `sequences`, in chunks whose
    logits fit `budget` bytes per model: 32 fpb prompts under gemma's 262k vocabulary are 2.7 GB of logits each,
    and holding both (plus their float64 softmax) at once ran a 24 GB machine out of memory."""
    per_chunk = max(1, budget // (4 * vocab))
    chunks, cur, n = [], [], 0
    for seq in sequences:
        if cur and n + len(seq) > per_chunk:
            chunks.append(cur)
            cur, n = [], 0
        cur.append(seq)
        n += len(seq)
    chunks.append(cur)
    kls, agrees = [], []
    for chunk in chunks:
        ref = np.concatenate(llama_logits_many(*reference, chunk, n_threads=n_threads))
        got = np.concatenate(llama_logits_many(*other, chunk, n_threads=n_threads))
        kl, agree = position_kl(ref, got)
        del ref, got
        kls.append(kl)
        agrees.append(agree)
    return summarize(np.concatenate(kls), np.concatenate(agrees))


# ---- the gate: the adapter judged against the engines' own floor
# The base alone, MLX (exact float32 weights) against llama.cpp, already differs where llama.cpp computes with the
# file's quantized kernels (quantized activations): tiny Q4_K_M models sit at KL ~0.005, top-1 ~0.9 on near-flat
# logits; gemma-3-270m Q4_K_M at KL 0.0059, top-1 0.93. With the float32 copy the two agree to KL ~1e-6. So the base
# must agree within what its weights allow (a wrong rope or tensor layout fails here), and the adapter may add
# little to that floor (a transposed, mis-scaled or mis-signed adapter moves the logits far beyond it).
FLOOR_LIMITS = {"f32": (0.01, 0.95), "file": (0.1, 0.8)}  # weights kind -> the base's (max mean KL, min top-1)
KL_FACTOR, KL_SLACK, TOP1_SLACK = 2.0, 0.02, 0.05


def judge(floor: dict, adapter: dict, weights: str) -> dict:
    """The gate's verdict from `summarize` of the base alone (`floor`) and with the adapter, llama.cpp computing
    with `weights` ("f32": a float32 copy; anything else: the file's kernels): the figures, the bounds, and
    `failed`, one phrase or None."""
    max_floor_kl, min_floor_top1 = FLOOR_LIMITS["f32" if weights == "f32" else "file"]
    held = "float32" if weights == "f32" else "the file's"
    kl_bound = KL_FACTOR * floor["kl_mean"] + KL_SLACK
    top1_bound = floor["top1_agreement"] - TOP1_SLACK
    out = {**adapter, "floor_kl_mean": floor["kl_mean"], "floor_top1_agreement": floor["top1_agreement"],
           "kl_bound": kl_bound, "top1_bound": top1_bound, "weights": weights, "failed": None}
    if floor["kl_mean"] > max_floor_kl or floor["top1_agreement"] < min_floor_top1:
        out["failed"] = (f"the base alone already differs: KL {floor['kl_mean']:.4f} (max {max_floor_kl} with "
                         f"{held} weights), top-1 agreement "
                         f"{floor['top1_agreement']:.3f} (min {min_floor_top1}): MLX and llama.cpp do not compute "
                         "the same model from this file")
    elif adapter["kl_mean"] > kl_bound or adapter["top1_agreement"] < top1_bound:
        out["failed"] = (f"with the adapter KL {adapter['kl_mean']:.4f} (max {kl_bound:.4f}: {KL_FACTOR:g} x the base's "
                         f"own {floor['kl_mean']:.4f} + {KL_SLACK}), top-1 agreement {adapter['top1_agreement']:.3f} "
                         f"(min {top1_bound:.3f}: the base's own {floor['top1_agreement']:.3f} - {TOP1_SLACK})")
    return out

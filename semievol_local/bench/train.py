"""`bench train`: training speed on random tokens, beside float32 GEMM measured just before and after, and
the fraction of it the shape's FLOPs reach."""
from __future__ import annotations

import tempfile

import numpy as np

from ..core.config import TrainConfig
from ..training.blas import gemm_gflops
from ..training.mlx_engine import load_model, train
from ..training.train_flops import block_weights, train_flops


def bench_train(model_path, steps: int = 8, *, batch_size: int = 4, seq_len: int = 128, rank: int = 8,
                answer_len: int | None = None, skip_steps: int = 2, seed: int = 0, num_layers: int = -1) -> dict:
    """Training speed on random tokens: (batch_size x seq_len) input tokens per step, LoRA on all 7
    projections of the last `num_layers` blocks (-1: all), loss on the last `answer_len` tokens (default:
    all of them), beside float32 GEMM measured just before and just after (averaged).

    `flops_per_token`: what this shape needs per input token (`train_flops`): 4 x the LoRA blocks' weights,
    the vocabulary projection at the answer positions only (4 x vocab x hidden x answer_len / seq_len), and
    the frozen blocks' one forward pass (2 x their weights). With fewer LoRA blocks that pass runs once per
    sequence before the first step (`trunk_seconds`, not timed per step): `tokens_per_s_with_trunk` charges
    it to the steps, and `roofline_fraction` = flops_per_token x tokens_per_s_with_trunk / GEMM FLOPS (the
    trunk's FLOPs over the trunk's time included). `roofline_fraction_steps`: the steps alone, their own
    FLOPs (`flops_per_token_steps`) at `tokens_per_s`. `roofline_tokens_per_s`: tokens/s at GEMM speed.
    Not counted: attention, LoRA's own matrices, the optimizer (small at these lengths and rank).
    `shape` is what a peer benchmark needs to build the same model (`bench.peft`)."""
    from ..training.quantized import n_weights

    gflops_before = gemm_gflops()
    base = load_model(model_path)
    n_params = n_weights(base)
    a = base.args
    shape = {"vocab_size": a.vocab_size, "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
             "num_hidden_layers": a.num_hidden_layers, "num_attention_heads": a.num_attention_heads,
             "num_key_value_heads": a.num_key_value_heads, "rms_norm_eps": a.rms_norm_eps,
             "rope_theta": getattr(a, "rope_theta", 10000.0),
             "tie_word_embeddings": bool(getattr(a, "tie_word_embeddings", True)), "model_type": a.model_type}
    vocab = a.vocab_size
    per_block = block_weights(base.model.layers)
    del base
    answer_len = seq_len if answer_len is None else answer_len
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(batch_size * steps):
        toks = rng.integers(0, vocab, size=seq_len + 1).tolist()  # seq_len inputs, seq_len targets at most
        examples.append((toks[: seq_len + 1 - answer_len], toks[seq_len + 1 - answer_len:]))
    cfg = TrainConfig(rank=rank, num_layers=num_layers, batch_size=batch_size, grad_accum=1, epochs=1.0,
                      max_seq_len=seq_len + 1, warmup=0.0, lr=1e-4, val_fraction=0.0, save_every=10**9, seed=seed)
    speeds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        info = train(model_path, examples, cfg, tmp, valid_examples=[], on_step=lambda r: speeds.append(r["tokens_per_s"]))
    timed = speeds[skip_steps:] or speeds  # the first steps include compilation
    tps = float(np.median(timed))
    gflops_after = gemm_gflops()  # on a shared machine the GEMM speed drifts: measure on both sides, average
    gflops = (gflops_before + gflops_after) / 2
    per_token_trunk = info["trunk_seconds"] / (batch_size * seq_len * steps)
    tps_trunk = tps / (1 + tps * per_token_trunk)  # exactly tps without a trunk pass
    lora_blocks = len(per_block) if num_layers < 0 else min(num_layers, len(per_block))

    def per_token(trunk: float) -> float:  # FLOPs per input token; every sequence passes the trunk once
        return train_flops(per_block, lora_blocks, vocab * shape["hidden_size"],
                           trunk_cached=info["frozen_blocks_cached"] > 0, trunk_tokens=trunk, step_tokens=1.0,
                           answer_tokens=answer_len / seq_len)

    flops_token, flops_steps = per_token(1.0), per_token(0.0)
    return {"tokens_per_s": tps, "tokens_per_s_with_trunk": tps_trunk,
            "gemm_gflops": gflops, "gemm_gflops_before": gflops_before,
            "gemm_gflops_after": gflops_after, "n_params": int(n_params),
            "flops_per_token": flops_token, "flops_per_token_steps": flops_steps,
            "roofline_tokens_per_s": gflops * 1e9 / flops_token,
            "roofline_fraction": tps_trunk * flops_token / (gflops * 1e9),
            "roofline_fraction_steps": tps * flops_steps / (gflops * 1e9),
            "seconds_per_step": batch_size * seq_len / tps,
            "steps_timed": len(timed), "batch_size": batch_size, "seq_len": seq_len, "answer_len": answer_len,
            "lora_blocks": lora_blocks, "frozen_blocks_cached": info["frozen_blocks_cached"],
            "trunk_seconds": info["trunk_seconds"], "keys": cfg.keys.split(","), "rank": rank, "scale": cfg.scale,
            "trainable_params": info["trainable_params"], "first_step_tokens_per_s": speeds[0] if speeds else None,
            "shape": shape}

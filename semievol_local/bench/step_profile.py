"""Where a LoRA training step's time goes on this machine: one trained block (the model's last, with LoRA on
all seven projections) timed forward and backward as the training step runs it, and its parts timed alone at
the same shapes.

- `frozen products`: the seven frozen weight products, forward (x @ W^T) and backward (dy @ W), one product per
  projection; `joined`: the same with q/k/v and gate/up as one product each (`mlx_fast.fuse_projections`);
- `lora products`: the rank-r matrices: (x @ A) @ B forward, and dB, dz, dA, dx backward, per projection;
- `attention`: scores, softmax and the weighted sum, forward and backward (no projections);
- `other`: the rest of the block (norms, rope, the MLP's activation, residual adds, reshapes and the graph's
  own overhead): the whole block less the parts.

Each figure is the best of `repeats` after a warm-up; GEMM speed is measured just before. This module trains
nothing and writes nothing.
"""
from __future__ import annotations

import time

from ..core.config import TrainConfig
from ..training import lora as lora_layers, mlx_engine, mlx_fast  # the package loads the fast BLAS: before MLX
from ..training.blas import gemm_gflops

import mlx.core as mx  # noqa: I001


def _best(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up: compilation, allocations
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - tic)
    return best


def _frozen_products(shapes: list[tuple[int, int]], tokens: int) -> tuple[list[mx.array], list[mx.array]]:
    """Random weights (out, in) and inputs (tokens, in) / output gradients (tokens, out) for each product."""
    ws = [mx.random.normal((o, i)) * 0.02 for o, i in shapes]
    xs = [mx.random.normal((tokens, i)) for _, i in shapes]
    dys = [mx.random.normal((tokens, o)) for o, _ in shapes]
    mx.eval(ws, xs, dys)
    return ws, [(x, dy) for x, dy in zip(xs, dys)]


def split(model_path, *, batch_size: int = 4, seq_len: int = 128, rank: int = 8, repeats: int = 5) -> dict:
    """Milliseconds per trained block for the whole block (its modules as trained here, and with q/k/v and gate/up
    joined) and for each part, with the FLOPs of the frozen products over their time as a GEMM fraction."""
    gflops = gemm_gflops()
    model = mlx_engine.load_model(model_path, base="f32")  # float32 weights: the joined products need them
    lora_layers.apply_lora(model, TrainConfig(rank=rank, num_layers=1))
    layer = model.layers[-1]
    attn, mlp = layer.self_attn, layer.mlp
    d, T = model.args.hidden_size, batch_size * seq_len
    mx.random.seed(0)
    x = mx.random.normal((batch_size, seq_len, d))
    g = mx.random.normal((batch_size, seq_len, d))
    mx.eval(x, g)

    def block_fn():
        def f(params, x):
            layer.update(params)
            return (layer(x, "causal") * g).sum()

        state = [layer.state]  # as the training step: the module's arrays are the compiled function's state
        step = mx.compile(mx.value_and_grad(f, argnums=(0, 1)), inputs=state, outputs=state)
        return lambda: step(layer.trainable_parameters(), x)

    whole = _best(block_fn(), repeats)
    projections = {n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    projections.update({n: getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")})
    shapes = {n: tuple(p.linear.weight.shape) for n, p in projections.items()}
    joinable = type(attn).__name__.startswith("Fast")
    joined_groups = mlx_fast.fuse_projections(model)
    whole_joined = _best(block_fn(), repeats) if joined_groups else None

    # the frozen products, one per projection and joined
    ws, io = _frozen_products(list(shapes.values()), T)
    frozen = _best(lambda: [p for w, (xi, dy) in zip(ws, io) for p in (xi @ w.T, dy @ w)], repeats)
    groups = [("q_proj", "k_proj", "v_proj")] if joinable else [("q_proj",), ("k_proj",), ("v_proj",)]
    groups += [("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    jshapes = [(sum(shapes[n][0] for n in grp), shapes[grp[0]][1]) for grp in groups]
    jws, jio = _frozen_products(jshapes, T)
    frozen_joined = _best(lambda: [p for w, (xi, dy) in zip(jws, jio) for p in (xi @ w.T, dy @ w)], repeats)

    # the rank-r products of LoRA, forward and backward, per projection
    As = [mx.random.normal((i, rank)) * 0.02 for _, i in shapes.values()]
    Bs = [mx.random.normal((rank, o)) * 0.02 for o, _ in shapes.values()]
    mx.eval(As, Bs)

    def lora():
        out = []
        for a, b, (xi, dy) in zip(As, Bs, io):
            z = xi @ a
            dz = dy @ b.T
            out += [z @ b, z.T @ dy, dz, xi.T @ dz, dz @ a.T]
        return out

    lora_s = _best(lora, repeats)

    # attention alone: scores, softmax, weighted sum, and their backward
    H, KVH = model.args.num_attention_heads, model.args.num_key_value_heads
    D = shapes["q_proj"][0] // H
    q = mx.random.normal((batch_size, H, seq_len, D))
    k = mx.random.normal((batch_size, KVH, seq_len, D))
    v = mx.random.normal((batch_size, KVH, seq_len, D))
    dout = mx.random.normal((batch_size, H, seq_len, D))
    mx.eval(q, k, v, dout)

    def core(q, k, v):  # the training step's own attention (mlx_fast)
        return mlx_fast.attend(q, k, v, D ** -0.5)

    attn_step = mx.compile(lambda q, k, v: mx.vjp(core, [q, k, v], [dout]))
    attention = _best(lambda: attn_step(q, k, v), repeats)

    parts = frozen + lora_s + attention
    frozen_flops = 4.0 * T * sum(o * i for o, i in shapes.values())  # forward + input gradient
    sig = lambda x: float(f"{x:.4g}") if x is not None else None  # noqa: E731
    fraction = lambda seconds: sig(frozen_flops / seconds / (gflops * 1e9)) if seconds else None  # noqa: E731
    return {"tokens": T, "gemm_gflops": sig(gflops), "frozen_flops": frozen_flops,
            "block_ms": sig(whole * 1e3), "block_joined_ms": sig(whole_joined * 1e3) if whole_joined else None,
            "frozen_products_ms": sig(frozen * 1e3), "frozen_products_joined_ms": sig(frozen_joined * 1e3),
            "lora_products_ms": sig(lora_s * 1e3), "attention_ms": sig(attention * 1e3),
            "other_ms": sig(max(0.0, whole - parts) * 1e3),
            "frozen_products_gemm_fraction": fraction(frozen), "frozen_products_joined_gemm_fraction": fraction(frozen_joined),
            "block_gemm_fraction": fraction(whole), "block_joined_gemm_fraction": fraction(whole_joined)}

"""The model's exp-heavy ops rewritten for MLX's CPU backend, where `mx.exp` is scalar libm (~9 ms per
million floats, single-threaded) while fused multiply-adds are ~10x faster.

Two of the three places that call exp in a LoRA step on a llama model, SwiGLU's sigmoid and attention's
softmax (and gemma's tanh-approximated GELU, whose tanh is as slow: 82 of a 92 ms MLP forward on
gemma-3-270m), are here a `mx.custom_function` with its own VJP, built on a polynomial `fast_exp` (relative
error <= 4e-6 from -80 to 88, ~1e-7 for |x| < 20; `mx.exp` itself is ~1e-7; exactly 0 below -80, where a
result would be denormal and slow on Intel CPUs). Together they make a
step ~16% faster on AMD EPYC, 21% on a Xeon (SmolLM2, 8 x 110 tokens into 8 LoRA blocks: 1.51 s against
1.90 s with mlx-lm's own modules; measured 2026-12-02). (The third, the loss's log-sum-exp over the vocabulary, was tried too: faster at 25 M
logits, much slower at 50 M, so the loss keeps MLX's own.)
`speed_up(model)` swaps the MLP/attention classes in place for subclasses whose `__call__` uses them
(same parameters, so weight names, LoRA and adapters are untouched); `gguf_loader`'s table says which
architecture gets which. On a GPU none of this is used: Metal's exp and fused SDPA are fast.

This module does not load, train or export anything.
"""
from __future__ import annotations

import math

import mlx.core as mx

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds a float32 to the nearest integer
_POLY = [math.log(2.0) ** k / math.factorial(k) for k in range(8)]  # 2**f = e**(f ln 2), |f| <= 0.5
UNDERFLOW = -80.0  # exp(-80) = 1.8e-35: nothing a softmax or sigmoid can use, and far from denormal


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) = 2**n * 2**f with n = round(x log2 e): a degree-7 polynomial and exponent bits.

    Below UNDERFLOW the result is exactly 0, never a denormal: near float32's smallest normal the product
    (and everything computed from it, such as softmax's backward) would be denormal, and on Intel CPUs each
    operation on a denormal takes a microcode assist. A causal mask's -1e9 entries made a whole LoRA step
    2.5x slower on a Xeon (3.4 s -> 1.4 s, 8 x 110 tokens into 8 blocks of SmolLM2) until these were zeros."""
    t = mx.minimum(mx.maximum(x, -87.0), 88.0) * _LOG2E  # keeps 2**n a normal float32
    n = (t + _ROUND) - _ROUND
    f = t - n
    p = _POLY[7]
    for c in reversed(_POLY[:7]):
        p = p * f + c
    return mx.where(x < UNDERFLOW, 0.0, p * mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32))


# ---- SwiGLU: silu(g) * u

@mx.custom_function
def swiglu(g: mx.array, u: mx.array) -> mx.array:
    return g * (1.0 / (1.0 + fast_exp(-g))) * u


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    g, u = primals
    s = 1.0 / (1.0 + fast_exp(-g))
    gs = g * s
    return cotangent * u * (s + gs * (1.0 - s)), cotangent * gs


# ---- softmax over the last axis

@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    e = fast_exp(x - mx.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return (output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True)),)


# ---- GELU (tanh approximation, gemma's): 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = c (x + 0.044715 x^3)

_GELU_C = math.sqrt(2.0 / math.pi)


@mx.custom_function
def gelu_tanh(x: mx.array) -> mx.array:
    return x / (1.0 + fast_exp(-2.0 * _GELU_C * (x + 0.044715 * x * x * x)))


@gelu_tanh.vjp
def _gelu_tanh_vjp(primals, cotangent, output):
    x = primals  # a one-argument function gets its argument as is
    s = 1.0 / (1.0 + fast_exp(-2.0 * _GELU_C * (x + 0.044715 * x * x * x)))
    du = 2.0 * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return (cotangent * (s + x * s * (1.0 - s) * du),)


# ---- projections that share an input, computed as one (`fuse_projections`)

def _base(m):
    """The frozen Linear of a projection: itself, or the one inside its LoRA layer."""
    return m.linear if "lora_a" in m else m


class _Joined:
    """Projections of one input (q/k/v, or gate/up) as one matrix product: their frozen weights side by side
    in one array (each projection's own weight is then a view of its rows: no second copy), and, where each
    carries LoRA, x @ [A_1 | A_2 | ...] and a block-diagonal B, so the whole projection is two products
    instead of 2 x n. Built once, after LoRA is applied and the weights are final (`fuse_projections`)."""

    def __init__(self, mods: list):
        lora = [m for m in mods if "lora_a" in m]
        linears = [_base(m) for m in mods]
        self.mods, self.lora = mods, len(lora) == len(mods)
        self.sizes = [int(lin.weight.shape[0]) for lin in linears]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.weight_t = mx.concatenate([lin.weight for lin in linears], axis=0).T  # (in, sum out): x @ it
        mx.eval(self.weight_t)
        for lin, start, n in zip(linears, self.starts, self.sizes):
            lin.weight = self.weight_t.T[start: start + n]  # a view of the joined rows
        mx.eval([lin.weight for lin in linears])
        self.bias = mx.concatenate([lin.bias for lin in linears]) if "bias" in linears[0] else None
        self.scale = mods[0].scale if self.lora else 0.0

    def __call__(self, x: mx.array) -> list[mx.array]:
        y = x @ self.weight_t
        if self.bias is not None:
            y = y + self.bias
        if self.lora:
            a = mx.concatenate([m.lora_a for m in self.mods], axis=1)  # (in, n x r)
            total = sum(self.sizes)
            # block-diagonal B: projection i reads only its own r columns of x @ a
            b = mx.concatenate([mx.pad(m.lora_b, [(0, 0), (start, total - start - n)])
                                for m, start, n in zip(self.mods, self.starts, self.sizes)], axis=0)
            y = y + (self.scale * ((x @ a) @ b)).astype(x.dtype)
        return mx.split(y, self.starts[1:], axis=-1)


def _joinable(mods: list) -> bool:
    """Plain float Linear layers, or LoRA layers over them with one scale and rank and no dropout (one
    dropout mask for all would change what is trained), all with a bias or all without."""
    import mlx.nn as nn

    lora = ["lora_a" in m for m in mods]
    if any(lora) and not all(lora):
        return False
    linears = [_base(m) for m in mods]
    if not all(type(lin) is nn.Linear for lin in linears) or len({"bias" in lin for lin in linears}) > 1:
        return False
    if all(lora):
        if len({(m.scale, m.lora_a.shape[1]) for m in mods}) > 1 or any(m.dropout._p_1 != 1 for m in mods):
            return False
    return True


def fuse_projections(model) -> int:
    """Join the q/k/v projections of every sped-up attention and the gate/up ones of every sped-up MLP
    (`_Joined`); return how many groups were joined. Call it after LoRA is applied and before training.
    Not called by `mlx_engine.train`: one trained block alone is 22% faster joined (`bench train --split`),
    but whole compiled steps were not (SmolLM2, 16 blocks, 4 x 128 tokens, four interleaved pairs in one
    process: 340/348, 344/351, 452/354, 439/433 tok/s without/with; the step's own spread is wider)."""
    joined = 0
    for layer in model.layers:
        for module, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            if not type(module).__name__.startswith("Fast") or not all(n in module for n in names):
                continue
            mods = [module[n] for n in names]
            if _joinable(mods):
                object.__setattr__(module, "_joined", _Joined(mods))
                joined += 1
    return joined


# ---- mlx-lm modules using them: subclasses of the model's own classes (only __call__ differs)

def _projections(self, x, names: tuple[str, ...]) -> list[mx.array]:
    joined = self.__dict__.get("_joined")
    return joined(x) if joined is not None else [self[n](x) for n in names]


def _swiglu_mlp(self, x):
    g, u = _projections(self, x, ("gate_proj", "up_proj"))
    return self.down_proj(swiglu(g, u))


def _gelu_mlp(self, x):
    g, u = _projections(self, x, ("gate_proj", "up_proj"))
    return self.down_proj(gelu_tanh(g) * u)


def _attention(self, x, mask=None, cache=None):
    """Causal attention without a KV cache as plain matmuls + `softmax`; anything else (a KV cache, a
    sliding-window mask array) goes to the model's own class."""
    if cache is not None or not (mask is None or isinstance(mask, str)):
        return type(self).__mro__[1].__call__(self, x, mask, cache)
    B, L, _ = x.shape
    H, KVH = self.n_heads, self.n_kv_heads
    q, k, v = _projections(self, x, ("q_proj", "k_proj", "v_proj"))
    q = self.rope(q.reshape(B, L, H, -1).transpose(0, 2, 1, 3))  # (B, H, L, D)
    k = self.rope(k.reshape(B, L, KVH, -1).transpose(0, 2, 1, 3))  # (B, KVH, L, D)
    v = v.reshape(B, L, KVH, -1).transpose(0, 2, 1, 3)  # (B, KVH, L, D)
    o = attend(q, k, v, self.scale, causal=mask is not None)  # a str mask: "causal"
    return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


def attend(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = True) -> mx.array:
    """Attention without projections: q (B, H, L, D), k and v (B, KVH, L, D) -> (B, H, L, D)."""
    B, H, L, D = q.shape
    KVH = k.shape[1]
    # query heads h = kvh * rep + r share kv head kvh (as in mlx and llama.cpp): stack them as rows
    rep = H // KVH
    q = (q * scale).reshape(B, KVH, rep * L, D)
    s = (q @ k.swapaxes(-1, -2)).reshape(B, KVH, rep, L, L)  # (B, KVH, rep, L, L)
    if causal:
        s = s + mx.triu(mx.full((L, L), -1e9, dtype=s.dtype), k=1)
    p = softmax(s).reshape(B, KVH, rep * L, L)
    return (p @ v).reshape(B, H, L, D)


_CALLS = {"swiglu": _swiglu_mlp, "gelu_tanh": _gelu_mlp, "attention": _attention}
_FAST: dict[tuple[type, str], type] = {}


def _swap(module, kind: str) -> None:
    base = type(module)
    if base.__name__.startswith("Fast"):
        return
    if (base, kind) not in _FAST:
        _FAST[base, kind] = type(f"Fast{base.__name__}", (base,), {"__call__": _CALLS[kind]})
    module.__class__ = _FAST[base, kind]


def speed_up(model, *, mlp: str | None = "swiglu", attention: bool = True) -> None:
    """Swap the CPU-friendly MLP (`mlp`: "swiglu" for gate/up/down SwiGLU, "gelu_tanh" for gemma's GELU
    MLP, None) and attention into every block, in place: the same parameters, so weight names, LoRA and
    adapters are untouched. Attention needs q/k/v/o projections, `rope`, `scale`, optional q/k norms."""
    for layer in model.layers:
        if mlp:
            _swap(layer.mlp, mlp)
        if attention:
            _swap(layer.self_attn, "attention")

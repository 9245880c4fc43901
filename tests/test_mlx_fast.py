"""mlx_fast: the CPU-friendly layers training swaps in (fast exp, MLP, attention, joined projections), against
mlx-lm's own modules on the tiny models of every family."""
from __future__ import annotations

import numpy as np
import pytest
from tinymodel import write_tiny_gguf
from toyset import toy_cfg, toy_examples

from semievol_local.training import mlx_engine as me  # first: it loads OpenBLAS before mlx.core (blas.py)
from semievol_local.training import batching, lora
from semievol_local.training.parity import compare_logits

import mlx.core as mx  # noqa: E402, I001  only after mlx_engine, or MLX keeps its reference BLAS for good


@pytest.fixture(scope="module")
def toy(tiny_q4):
    return toy_examples(tiny_q4)


def test_fast_exp_is_accurate_over_float32_range():
    from semievol_local.training.mlx_fast import fast_exp

    x = np.linspace(-80, 88, 200_001, dtype=np.float32)
    got = np.array(fast_exp(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 5e-6



def test_fast_exp_never_returns_a_denormal():
    """Denormals cost a microcode assist per operation on Intel CPUs: a causal mask's -1e9 entries through the
    softmax made a LoRA step 2.5x slower. Below -80 the result is exactly 0; above it, a normal float."""
    from semievol_local.training.mlx_fast import fast_exp

    x = np.concatenate([np.linspace(-200, -75, 100_001), [-1e9, -87.5, -87.0, -80.0001]]).astype(np.float32)
    got = np.array(fast_exp(mx.array(x)))
    tiny = np.finfo(np.float32).tiny  # the smallest normal
    assert np.all((got == 0) | (got >= tiny))
    assert np.all(got[x < -80] == 0) and np.all(got[x >= -80] > 0)



@pytest.mark.parametrize("arch,kwargs", [
    ("llama", {}),                                # SwiGLU + attention
    ("qwen2", {}),                                # SwiGLU + attention, q/k/v biases inside the projections
    ("qwen3", {"head_dim": 32}),                  # SwiGLU (its attention has q/k norms: mlx-lm's own)
    ("gemma3", {"head_dim": 32}),                 # tanh GELU
])
def test_fast_layers_match_mlx_lm_values_and_gradients(tmp_path, toy, arch, kwargs):
    """The CPU MLP/attention/softmax rewrites, alone and with the projections that share an input joined
    (q/k/v, gate/up: one product each), against mlx-lm's own modules: same loss, same LoRA gradients."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from semievol_local.training import mlx_fast

    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch, **kwargs)
    inputs, pos, targets, mask = map(mx.array, batching.collate(batching.prepare(toy, 64, "test"), range(4)))
    results = []
    for variant in ("joined", "fast", "mlx-lm"):
        model = me.load_model(path)
        assert type(model.layers[0].mlp).__name__.startswith("Fast")
        lora.apply_lora(model, toy_cfg())
        mx.random.seed(1)  # non-zero B, random (a constant B sums the output gradient to near 0): LoRA path live
        model.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
        if variant == "joined":  # gate/up everywhere; q/k/v where the attention is mlx_fast's
            fast_attention = type(model.layers[0].self_attn).__name__.startswith("Fast")
            assert mlx_fast.fuse_projections(model) == len(model.layers) * (1 + fast_attention)
        if variant == "mlx-lm":  # back to mlx-lm's own classes
            for layer in model.layers:
                for m in (layer.mlp, layer.self_attn):
                    if type(m).__name__.startswith("Fast"):
                        m.__class__ = type(m).__mro__[1]
        loss, grads = nn.value_and_grad(model, me._loss)(model, inputs, pos, targets, mask, mx.array(1.0))
        results.append((loss[0].item(), dict(tree_flatten(grads)), me.logits(model, toy[0][0])))
    l2, g2, z2 = results[-1]
    for l1, g1, z1 in results[:-1]:
        assert l1 == pytest.approx(l2, rel=1e-5)
        assert g1.keys() == g2.keys()
        for k in g1:
            a, b = np.array(g1[k], np.float64), np.array(g2[k], np.float64)
            assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-12, k  # floor: saturated softmax -> ~0
        assert compare_logits(z2, z1)["kl_max"] < 1e-6



def test_joined_projections_keep_one_copy_of_the_weights(tmp_path):
    """Each projection's frozen weight becomes a view of the joined array: the weights a checkpoint or an
    export would read are unchanged, and none is held twice."""
    from mlx.utils import tree_flatten

    from semievol_local.training import mlx_fast

    path = write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    model = me.load_model(path)
    lora.apply_lora(model, toy_cfg())
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    mx.eval(model.parameters())
    mx.clear_cache()
    held = mx.get_active_memory()
    assert mlx_fast.fuse_projections(model) == 2 * len(model.layers)
    mx.clear_cache()
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert np.array_equal(np.array(v), before[k]), k
    joined = sum(m.__dict__["_joined"].weight_t.nbytes for layer in model.layers for m in (layer.self_attn, layer.mlp))
    assert mx.get_active_memory() - held < 0.5 * joined  # the old per-projection arrays were freed

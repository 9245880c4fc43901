"""The matmul FLOPs a LoRA training needs, counted from the model's shape and the work done: the yardstick
of `bench train`'s and `bench run`'s fractions of float32 GEMM."""
from __future__ import annotations

import mlx.nn as nn
from mlx.nn import Module as Model
from mlx.utils import tree_flatten


def block_weights(layers) -> list[int]:
    """Elements of each block's weight matrices, block by block: what a token's matmuls multiply (2 FLOPs
    each, forward). LoRA's own matrices are left out (rank 8: a few per mille of a block); a matrix kept
    quantized (on a GPU) counts at its logical shape; norms and biases (vectors, no matmul) count nothing."""
    out = []
    for layer in layers:
        n = 0
        for _, m in layer.named_modules():  # a LoRA layer is no Linear: it holds the frozen one as `.linear`
            if isinstance(m, nn.QuantizedLinear):  # packed: 32 / bits weights per uint32
                n += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
            elif isinstance(m, nn.Linear):
                n += m.weight.size
        out.append(int(n))
    return out


def train_flops(per_block: list[int], lora_blocks: int, vocab_weights: int, *, trunk_cached: bool,
                trunk_tokens: float, step_tokens: float, answer_tokens: float) -> float:
    """The matmul FLOPs a LoRA training needs (no I/O): the frozen blocks below the first LoRA block, 2 x
    their weights per token they run forward on (once per sequence, `trunk_tokens`, when their outputs are
    cached; else in every step, `step_tokens`); the LoRA blocks, 4 x their weights per step token (forward,
    and backward to the activations: frozen weights get no gradient); the vocabulary projection, 4 x
    `vocab_weights` (vocab x hidden) per answer token (forward and backward to the activations; it runs only
    where the loss is). The embedding lookup costs nothing; attention, LoRA's own matrices, the optimizer and
    the forward pass that gradient checkpointing repeats are left out (small, or work no training needs)."""
    frozen = sum(per_block[:len(per_block) - lora_blocks])
    trained = sum(per_block[len(per_block) - lora_blocks:])
    return float(2 * frozen * (trunk_tokens if trunk_cached else step_tokens) + 4 * trained * step_tokens
                 + 4 * vocab_weights * answer_tokens)


def lora_blocks(layers) -> int:
    """How many blocks, counted from the last, carry LoRA (the blocks `apply_lora` converted)."""
    with_lora = [i for i, layer in enumerate(layers) if any("lora" in k for k, _ in tree_flatten(layer.parameters()))]
    return len(layers) - with_lora[0] if with_lora else 0


def needed(model: Model, seqs, first: int, steps_run: list[dict], reused: int = 0) -> float:
    """The matmul FLOPs this training needed (`train_flops`; the yardstick of `bench run`'s fraction), for the
    steps run and, when `first` > 0 (the frozen blocks' outputs cached), one trunk pass over the sequences not
    read back from a trunk store (`reused` of them were: their share of the tokens is left out, an estimate).
    Answer tokens are the steps' input tokens times the training set's share of answer tokens, exact over
    whole epochs."""
    layers = model.model.layers
    inputs = sum(len(s[0]) - 1 for s in seqs)
    computed = inputs * (len(seqs) - reused) / len(seqs) if seqs else 0
    answers = sum(len(s[0]) - s[1] for s in seqs)
    step_tokens = sum(r.get("tokens", 0) for r in steps_run)
    a = model.args
    return train_flops(block_weights(layers), lora_blocks(layers), a.vocab_size * a.hidden_size,
                       trunk_cached=first > 0, trunk_tokens=computed, step_tokens=step_tokens,
                       answer_tokens=step_tokens * answers / inputs if inputs else 0)

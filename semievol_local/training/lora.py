"""LoRA on an mlx-lm model: putting it on the chosen projections, gradient checkpointing per block, the
memory a step keeps for its backward pass, and the adapter on disk (written in mlx-lm's layout and as a
GGUF adapter llama.cpp loads as it is; read back as a starting point)."""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.nn import Module as Model
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..core import adapter_gguf as ag
from ..core.config import TrainConfig
from ..core.errors import UserError
from ..core.files import atomic_target, atomic_write_text, sha256_file


def apply_lora(model: Model, cfg: TrainConfig) -> dict:
    """Freeze the base and put mlx-lm LoRA layers on the chosen projections; return mlx-lm's adapter config."""
    keys = [k.strip() for k in cfg.keys.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ag.LORA_TARGETS]
    if unknown or not keys:
        raise UserError(f"LoRA keys {unknown or cfg.keys!r} are not projections of this model; "
                        f"choose from {','.join(ag.LORA_TARGETS)}.")
    n_blocks = len(model.layers)
    if cfg.num_layers == 0 or cfg.num_layers < -1:
        raise UserError(f"Requested LoRA on {cfg.num_layers} blocks; use a number from 1 (the last block) "
                        f"up, or -1 for all {n_blocks}.")
    num_layers = n_blocks if cfg.num_layers == -1 else min(cfg.num_layers, n_blocks)  # a small model: all
    lora = {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout, "keys": [ag.LORA_TARGETS[k] for k in keys]}
    mx.random.seed(cfg.seed)  # LoRA A init
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora}


_CHECKPOINTED: dict[type, type] = {}


def checkpoint_blocks(model: Model) -> None:
    """Keep only each transformer block's input for the backward pass and recompute the rest (mlx-lm's
    grad_checkpoint, but per model instance: the block's class is swapped, not patched). Activation memory
    drops from every block's intermediates to one block's; a step costs about one more forward pass."""
    for layer in model.layers:
        base = type(layer)
        if base not in _CHECKPOINTED:
            def call(self, x, *args, _base_call=base.__call__, **kwargs):
                def block(params, x):
                    self.update(params)
                    return _base_call(self, x, *args, **kwargs)
                return mx.checkpoint(block)(self.trainable_parameters(), x)

            _CHECKPOINTED[base] = type(f"Checkpointed{base.__name__}", (base,), {"__call__": call})
        layer.__class__ = _CHECKPOINTED[base]


def activation_bytes(args, batch: int, length: int, blocks: int, checkpoint: bool = False) -> float:
    """Estimated bytes a training step keeps for its backward pass: per token and block, float32 copies of
    about 10 hidden-size vectors, 4 MLP-width ones and 3 rows of attention weights (fits 57-59 KB per
    token and block measured for SmolLM2: 30 blocks x 8 x 163 tokens -> 2.3 GB; 16 x 8 x 177 -> 1.3 GB).
    With checkpointing: each block's input, plus `CHECKPOINTED_BLOCKS` blocks' worth (measured, below)."""
    d = args.hidden_size
    f = getattr(args, "intermediate_size", 4 * d)
    h = args.num_attention_heads
    per_token_block = 4.0 * (10 * d + 4 * f + 3 * h * length)
    tokens = batch * length
    if checkpoint:
        return tokens * (4.0 * d * blocks + CHECKPOINTED_BLOCKS * per_token_block)
    return tokens * per_token_block * blocks


def trainable_count(args, blocks: int, rank: int) -> int:
    """LoRA weights on all seven projections of `blocks` blocks (an upper bound for fewer keys): r x (in + out) each."""
    d, h = args.hidden_size, args.num_attention_heads
    hd = getattr(args, "head_dim", None) or d // h
    kv = getattr(args, "num_key_value_heads", None) or h
    f = getattr(args, "intermediate_size", 4 * d)
    return blocks * rank * (2 * (d + h * hd) + 2 * (d + kv * hd) + 3 * (d + f))


# A checkpointed step holds more than one block's worth at its peak: the block being recomputed, the cotangents
# of its backward, and the buffers MLX's CPU stream allocates ahead of the computation. Measured on the 1B
# shape (Q4_K_M, 8 x 112-131 tokens, compiled step, MLX's peak less the model): 0.76 GB with 2 LoRA blocks, 0.98
# GB with 16, against 0.70 and 0.91 from this count; one block's worth (the count before) said 0.24 and 0.41, and
# a 40-row fpb training the pre-run check put at 1.3 GB peaked at 3.3 GB RSS.
CHECKPOINTED_BLOCKS = 3.3


def write_adapter(out_dir: Path, flat: dict[str, mx.array], adapter_cfg: dict, arch: str, n_blocks: int,
            cfg: TrainConfig) -> None:
    """Write the adapter in both layouts from flat trainable params ('model.layers.3.self_attn.q_proj.lora_a')."""
    with atomic_target(out_dir / "adapters.safetensors") as tmp:
        mx.save_safetensors(str(tmp), flat)
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(adapter_cfg, indent=2))
    pairs = {}
    for name in flat:
        if name.endswith(".lora_a"):
            mod = name[: -len(".lora_a")]
            pairs[mod] = (np.array(flat[name]), np.array(flat[mod + ".lora_b"]))  # (in, r), (r, out)
    ag.write_lora_gguf(out_dir / "adapter.gguf", arch, n_blocks, pairs, scale=cfg.scale, rank=cfg.rank)


def load_init_adapter(model: Model, adapter_dir: Path) -> str:
    """Load LoRA weights written by `train` as the starting point; return the file's sha256 (for resume)."""
    f = adapter_dir / "adapters.safetensors" if adapter_dir.is_dir() else adapter_dir
    if not f.is_file():
        raise UserError(f"{adapter_dir}: no adapters.safetensors to start training from.")
    weights = mx.load(str(f))
    params = dict(tree_flatten(model.trainable_parameters()))
    misfit = sorted(set(params) ^ set(weights)) + [k for k in weights if k in params and weights[k].shape != params[k].shape]
    if misfit:
        raise UserError(f"{f}: this adapter does not fit this run's LoRA settings (rank, keys, num_layers), "
                        f"e.g. {misfit[0]}. Train with the settings it was made with.")
    model.load_weights(list(weights.items()), strict=False)
    return sha256_file(f)

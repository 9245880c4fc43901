"""What a LoRA training needs in memory, known before anything loads (`memory_check`), and the estimate a
running training checks its budget against (`step_peak`)."""
from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np

from ..core.config import TrainConfig
from ..core.errors import UserError
from ..core.runfolder import ram_bytes
from . import batching, frozen, gguf_loader, lora
from .batching import Example
from .guard import KEPT_STEPS


RUNTIME_BYTES = 600e6  # Python, MLX and llama.cpp's libraries, the tokenizer: what a training process holds besides


def memory_check(model_path, examples: list[Example], cfg: TrainConfig, ram: int | None = None) -> dict:
    """Before anything loads or is written: the peak a training of `examples` needs on this machine (the base as
    `cfg.frozen_base` holds it, the LoRA blocks' activations with gradient checkpointing, the frozen trunk's
    cached outputs, one slice of float32 weights in each direction), or a one-line `UserError` naming what would
    fit (fewer LoRA blocks, a shorter --max-seq-len) where this machine's RAM cannot hold it."""
    from types import SimpleNamespace

    from . import quantized

    ram = ram_bytes() if ram is None else ram
    held, fields = gguf_loader.held_bytes(model_path, cfg.frozen_base, gpu=mx.default_device().type == mx.DeviceType.gpu)
    args = SimpleNamespace(**fields)
    n_blocks = args.num_hidden_layers

    def need(num_layers: int, max_len: int) -> float:
        blocks = n_blocks if num_layers == -1 else min(num_layers, n_blocks)
        lengths = sorted(min(len(p) + len(a), max_len) - 1 for p, a in examples)[-cfg.batch_size:] or [0]
        acts = lora.activation_bytes(args, len(lengths), batching.padded_length(np.array(lengths)), blocks,
                                     checkpoint=True)
        trunk = min(frozen.TRUNK_CACHE_BYTES, 4.0 * args.hidden_size * sum(min(len(p) + len(a), max_len)
                                                                          for p, a in examples))
        # LoRA weights and AdamW's two moments, live and at the start of each kept step (the divergence guard's)
        lora_state = (KEPT_STEPS + 1) * 3 * 4.0 * lora.trainable_count(args, blocks, cfg.rank)
        return held + acts + (trunk if blocks < n_blocks else 0) + 2 * quantized.CHUNK_BYTES + RUNTIME_BYTES + lora_state

    want = need(cfg.num_layers, cfg.max_seq_len)
    out = {"estimated_peak_gb": round(want / 1e9, 2), "estimated_peak_bytes": int(want), "base_gb": round(held / 1e9, 2),
           "ram_gb": round(ram / 1e9, 1)}
    if not ram or want <= ram:
        return out
    fits = [n for n in range(min(cfg.num_layers if cfg.num_layers > 0 else n_blocks, n_blocks) - 1, 0, -1)
            if need(n, cfg.max_seq_len) <= ram]
    lens = [m for m in (256, 128, 64) if m < cfg.max_seq_len and need(cfg.num_layers, m) <= ram]
    hint = (f"--num-layers {fits[0]}" if fits else "") + (" or " if fits and lens else "") + \
        (f"--max-seq-len {lens[0]}" if lens else "")
    if cfg.frozen_base == "f32" and not hint:
        kept = memory_check(model_path, examples, dataclasses.replace(cfg, frozen_base="file"), ram=0)
        if kept["estimated_peak_bytes"] <= ram:
            hint = f"--frozen-base file (about {kept['estimated_peak_gb']:.1f} GB)"
    raise UserError(f"{model_path}: training needs about {want / 1e9:.1f} GB (the base {held / 1e9:.1f} GB as "
                    f"{'the file holds it' if cfg.frozen_base == 'file' else 'float32'}), more than this machine's "
                    f"{ram / 1e9:.1f} GB of RAM; " + (f"try {hint}" if hint else "pick a smaller model file"))


def step_peak(model, held: float, lengths: np.ndarray, pieces: list[list[np.ndarray]], first: int, world: int,
              checkpoint: bool) -> float:
    """A running training's peak: what the process holds now (`held` bytes) and the activations of the largest
    piece any process computes over the LoRA blocks (from block `first`), recomputed in the backward pass
    where `checkpoint`."""
    return held + max(lora.activation_bytes(model.args, -(-len(q) // world), batching.padded_length(lengths[q]),
                                            len(model.layers) - first, checkpoint=checkpoint)
                      for v in pieces for q in v)

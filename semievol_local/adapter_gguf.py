"""GGUF naming for llama-family models and the llama.cpp LoRA adapter format, in one place.

- `GGUF_TO_MLX` maps GGUF tensor names onto mlx-lm's llama module (FACTS §2); the loader in
  `mlx_engine` and the adapter writer below both use it, so the two directions cannot drift.
- `write_lora_gguf` writes an MLX LoRA adapter as a GGUF LoRA adapter that llama.cpp loads as-is
  (FACTS §4): no fusing, no re-quantizing, no Q/K un-permuting (MLX trained on the GGUF's own layout).
- `read_lora_gguf` reads one back (numpy, llama.cpp layout) for checks and tests.

This module knows nothing about MLX arrays or training: numpy in, files out.
"""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np

from .files import atomic_target

# ---- what llama.cpp reads from an adapter file (llama-adapter.cpp) ----
KEY_GENERAL_TYPE = gguf.Keys.General.TYPE            # "general.type"
KEY_ARCHITECTURE = gguf.Keys.General.ARCHITECTURE    # "general.architecture"
KEY_ADAPTER_TYPE = gguf.Keys.Adapter.TYPE            # "adapter.type"
KEY_LORA_ALPHA = gguf.Keys.Adapter.LORA_ALPHA        # "adapter.lora.alpha"
GENERAL_TYPE_ADAPTER = gguf.GGUFType.ADAPTER         # "adapter"
ADAPTER_TYPE_LORA = "lora"
SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"            # appended to the base tensor name, e.g. blk.7.attn_q.weight.lora_a

# ---- GGUF <-> mlx-lm llama module names ----
BLOCK_TENSORS = {  # GGUF "blk.N.<key>" -> mlx-lm "model.layers.N.<value>"
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
MLX_TO_BLOCK = {v: k for k, v in BLOCK_TENSORS.items()}
# short projection name (TrainConfig.keys) -> path inside a block, for the 7 projections that can carry LoRA
LORA_TARGETS = {v.split(".")[1]: v for k, v in BLOCK_TENSORS.items() if "norm" not in k}

_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|scales|biases|bias)$")
_GLOBAL = re.compile(r"^([a-z_]+)\.(weight|scales|biases|bias)$")
_MLX_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)$")


def gguf_to_mlx_name(name: str) -> str | None:
    """'blk.3.attn_q.scales' -> 'model.layers.3.self_attn.q_proj.scales'; None for tensors MLX does not use."""
    if m := _BLK.match(name):
        target = BLOCK_TENSORS.get(m.group(2))
        return f"model.layers.{m.group(1)}.{target}.{m.group(3)}" if target else None
    if m := _GLOBAL.match(name):
        target = GLOBAL_TENSORS.get(m.group(1))
        return f"{target}.{m.group(2)}" if target else None
    return None


def mlx_module_to_gguf_weight(module_path: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q.weight' (the base tensor a LoRA pair attaches to)."""
    m = _MLX_LAYER.match(module_path)
    key = m and MLX_TO_BLOCK.get(f"{m.group(2)}.{m.group(3)}")
    if not key:
        raise ValueError(f"no GGUF tensor for MLX module {module_path!r}: only block projections carry LoRA")
    return f"blk.{m.group(1)}.{key}.weight"


def write_lora_gguf(path: str | Path, arch: str, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
                    scale: float, rank: int) -> Path:
    """Write LoRA pairs as a llama.cpp adapter.

    pairs: MLX module path -> (lora_a (in, r), lora_b (r, out)) in mlx-lm's layout.
    llama.cpp wants A as (r, in) and B as (out, r) in numpy terms, and computes
    W x + (alpha / r) * B A x, while mlx-lm computes W x + scale * x A B: so alpha = scale * r.
    """
    path = Path(path)
    with atomic_target(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)  # writes general.architecture = base arch
        w.add_type(GENERAL_TYPE_ADAPTER)
        w.add_string(KEY_ADAPTER_TYPE, ADAPTER_TYPE_LORA)
        w.add_float32(KEY_LORA_ALPHA, float(scale) * int(rank))
        for module_path in sorted(pairs, key=_layer_order):
            a, b = pairs[module_path]
            base = mlx_module_to_gguf_weight(module_path)
            w.add_tensor(base + SUFFIX_A, np.ascontiguousarray(np.asarray(a, np.float32).T))  # (r, in)
            w.add_tensor(base + SUFFIX_B, np.ascontiguousarray(np.asarray(b, np.float32).T))  # (out, r)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_lora_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata {key: value} for the adapter keys, tensors {name: array in llama.cpp's numpy layout})."""
    r = gguf.GGUFReader(str(path))
    meta = {}
    for key in (KEY_GENERAL_TYPE, KEY_ARCHITECTURE, KEY_ADAPTER_TYPE, KEY_LORA_ALPHA):
        field = r.get_field(key)
        if field is not None:
            meta[key] = field.contents()
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in r.tensors}
    return meta, tensors


def _layer_order(module_path: str):
    m = _MLX_LAYER.match(module_path)
    return (int(m.group(1)), module_path) if m else (-1, module_path)

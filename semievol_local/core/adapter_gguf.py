"""GGUF naming for the trainable architectures and the llama.cpp LoRA adapter format, in one place.

- `name_map` / `gguf_name` map mlx-lm parameter names onto GGUF tensor names through gguf-py's
  `TensorNameMap`; the loader in `gguf_loader` and the adapter writer below both use it, so the two
  directions cannot drift.
- `write_lora_gguf` writes an MLX LoRA adapter as a GGUF LoRA adapter that llama.cpp loads as-is
  (`adapter.lora.alpha` = scale x rank, A as (rank, in), B as (out, rank)): no fusing, no re-quantizing, no Q/K un-permuting (MLX trained on the GGUF's own layout).
- `read_lora_gguf` reads one back (numpy, llama.cpp layout) for checks and tests; `check_adapter` refuses,
  in one line, a file llama.cpp would reject or crash on; `random_adapter` writes one of training's shape
  (the run plan's calibration).

This module knows nothing about MLX arrays or training: numpy in, files out. The format and the names it
relies on: docs/engines.md.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import gguf
import numpy as np

from .errors import UserError
from .files import atomic_target

# ---- what llama.cpp reads from an adapter file (llama-adapter.cpp) ----
KEY_GENERAL_TYPE = gguf.Keys.General.TYPE            # "general.type"
KEY_ARCHITECTURE = gguf.Keys.General.ARCHITECTURE    # "general.architecture"
KEY_ADAPTER_TYPE = gguf.Keys.Adapter.TYPE            # "adapter.type"
KEY_LORA_ALPHA = gguf.Keys.Adapter.LORA_ALPHA        # "adapter.lora.alpha"
GENERAL_TYPE_ADAPTER = gguf.GGUFType.ADAPTER         # "adapter"
ADAPTER_TYPE_LORA = "lora"
SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"            # appended to the base tensor name, e.g. blk.7.attn_q.weight.lora_a

# ---- GGUF <-> mlx-lm names ----
# mlx-lm's module paths are the Hugging Face names that llama.cpp's converter maps with gguf-py's
# TensorNameMap, so that map serves both directions for every architecture in `gguf_loader.ARCHITECTURES`.
# short projection name (TrainConfig.keys) -> path inside a block, for the 7 projections that can carry LoRA
LORA_TARGETS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                "down_proj": "mlp.down_proj"}
_SUFFIXES = (".weight", ".bias", ".scales", ".biases")
_MLX_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@functools.lru_cache(maxsize=8)
def name_map(arch: str, n_blocks: int) -> gguf.TensorNameMap:
    """gguf-py's name map of an architecture (by its GGUF name, e.g. 'llama', 'gemma3')."""
    ids = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in ids:
        raise ValueError(f"gguf-py does not know architecture {arch!r}")
    return gguf.TensorNameMap(ids[arch], n_blocks)


def gguf_name(names: gguf.TensorNameMap, mlx_name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.scales' -> 'blk.3.attn_q.scales' (None: no GGUF tensor)."""
    for suffix in _SUFFIXES:
        if mlx_name.endswith(suffix):
            base = names.get_name(mlx_name[: -len(suffix)])
            return base + suffix if base else None
    base = names.get_name(mlx_name)
    return base


def mlx_module_to_gguf_weight(arch: str, n_blocks: int, module_path: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q.weight' (the base tensor a LoRA pair attaches to)."""
    name = gguf_name(name_map(arch, n_blocks), module_path + ".weight")
    if not name or not name.startswith("blk."):
        raise ValueError(f"no GGUF block tensor for MLX module {module_path!r} ({arch}): only block projections carry LoRA")
    return name


def write_lora_gguf(path: str | Path, arch: str, n_blocks: int, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
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
            base = mlx_module_to_gguf_weight(arch, n_blocks, module_path)
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


def random_adapter(path: str | Path, model_path: str | Path, keys: str, num_layers: int, rank: int,
                   scale: float, seed: int = 0) -> Path:
    """An adapter of the shape training would give `model_path` (LoRA rank `rank` on the `keys` projections of
    the last `num_layers` blocks, -1: all), with small random weights: what llama.cpp computes with a trained
    adapter, for timing it before one exists (the run plan's calibration)."""
    from .gguf_file import open_gguf

    f = open_gguf(model_path)
    arch = str(f.fields["general.architecture"])
    n_blocks = int(f.fields[f"{arch}.block_count"])
    shapes = {t.name: t.shape for t in f.tensors}
    first = 0 if num_layers < 0 else max(0, n_blocks - num_layers)
    rng = np.random.default_rng(seed)
    pairs = {}
    for i in range(first, n_blocks):
        for key in (k.strip() for k in keys.split(",") if k.strip()):
            module = f"model.layers.{i}.{LORA_TARGETS[key]}"
            out, inp = shapes[mlx_module_to_gguf_weight(arch, n_blocks, module)][:2]
            pairs[module] = (rng.normal(0, 0.01, (inp, rank)).astype(np.float32),
                             rng.normal(0, 0.01, (rank, out)).astype(np.float32))
    return write_lora_gguf(path, arch, n_blocks, pairs, scale=scale, rank=rank)


def check_adapter(path: Path, architecture: str) -> None:
    """Refuse, with one line, a file llama.cpp would reject or crash on: it must be a GGUF LoRA for this arch."""
    from .gguf_file import read

    if not path.is_file():
        raise UserError(f"{path}: adapter file not found")
    reader = read(path)

    def meta(key):
        return reader.fields.get(key)

    if meta("general.type") != "adapter" or meta("adapter.type") != "lora":
        raise UserError(f"{path}: not a LoRA adapter (general.type={meta('general.type')!r}); "
                        "give the adapter.gguf that `semievol train` writes, not a model")
    if meta("general.architecture") != architecture:
        raise UserError(f"{path}: adapter is for architecture {meta('general.architecture')!r}, "
                        f"the model is {architecture!r}")

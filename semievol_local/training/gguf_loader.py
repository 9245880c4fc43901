"""GGUF -> MLX: one table of the architectures MLX trains, and the loader that builds mlx-lm's model on a
GGUF file's own weights.

`ARCHITECTURES` holds, per GGUF architecture, the mlx-lm model class, how its arguments come from the
GGUF's metadata, the rope convention of its Q/K rows, the weight fix-ups, and which CPU fast paths apply.
`support()` answers "can MLX train this file?" from that table alone (no MLX import), for `models info`
and for `load_model`, so the two cannot disagree. Tensor names GGUF <-> MLX come from gguf-py's
`TensorNameMap` (mlx-lm's module paths are the Hugging Face names the converter maps), not from our own
patterns. Every tensor type is read: gguf-py dequantizes what MLX cannot (Q5_0, Q5_K, IQ4_NL, ...).

What it does NOT do: LoRA, training, export (that is `mlx_engine`), or running llama.cpp. The tensor names
and rope layouts it relies on: docs/engines.md.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..core import gguf_file
from ..core.errors import UserError

log = logging.getLogger(__name__)

GROUP_SIZE = 32  # Q4_0 / Q4_1 / Q8_0 blocks: 32 weights per scale, as MLX's quantized layout keeps them
KEPT_QUANTIZED = ("Q4_0", "Q4_1", "Q8_0")  # on a GPU these stay quantized, exactly (QLoRA)
PLAIN = ("F32", "F16")


# ----------------------------------------------------------------------------- metadata

class Meta:
    """A GGUF's metadata with `arch.`-prefixed lookups that fail with one line naming the file and key."""

    def __init__(self, path: Path, fields: dict):
        self.path, self.fields = path, fields
        self.arch = str(fields.get("general.architecture", "unknown"))

    def raw(self, key: str, default=None):
        return self.fields.get(f"{self.arch}.{key}", default)

    def get(self, key: str, default=..., cast=int):
        v = self.raw(key)
        if v is None:
            if default is ...:
                raise UserError(f"{self.path}: metadata {self.arch}.{key} is missing; the file is not a complete "
                                f"{self.arch} GGUF. Download or convert it again.")
            return default
        return cast(v)


def _common_args(m: Meta, tensors: dict) -> dict:
    """ModelArgs fields every mlx-lm decoder shares, from llama.cpp's keys (llama-arch.cpp)."""
    dim, n_head = m.get("embedding_length"), m.get("attention.head_count")
    return dict(
        model_type=m.arch, hidden_size=dim, num_hidden_layers=m.get("block_count"),
        intermediate_size=m.get("feed_forward_length"), num_attention_heads=n_head,
        num_key_value_heads=m.get("attention.head_count_kv", n_head),
        rms_norm_eps=m.get("attention.layer_norm_rms_epsilon", cast=float),
        vocab_size=int(tensors["token_embd.weight"][0]), head_dim=m.get("attention.key_length", dim // n_head),
        max_position_embeddings=m.get("context_length", 4096), rope_theta=m.get("rope.freq_base", 10000.0, float),
        rope_scaling=_linear_rope_scaling(m), tie_word_embeddings="output.weight" not in tensors)


def _linear_rope_scaling(m: Meta) -> dict | None:
    kind = m.raw("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": m.get("rope.scaling.factor", cast=float)}
    raise UserError(f"{m.path}: rope scaling {kind!r} is not supported for MLX training (none, linear, or "
                    "llama 3's rope_freqs). Pick a file without it.")


def _qwen2_args(m: Meta, tensors: dict) -> dict:
    args = _common_args(m, tensors)
    if args.pop("head_dim") != args["hidden_size"] // args["num_attention_heads"]:
        raise UserError(f"{m.path}: qwen2 with a head size other than hidden/heads cannot be built with mlx-lm's qwen2.")
    return args


def _gemma3_args(m: Meta, tensors: dict) -> dict:
    args = _common_args(m, tensors)
    pattern = m.raw("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per-layer flags (is sliding): mlx-lm needs a period, so find one
        period = next((p for p in range(1, len(pattern) + 1)
                       if all(bool(s) == (i % p < p - 1) for i, s in enumerate(pattern))), None)
        if period is None:
            raise UserError(f"{m.path}: gemma3 sliding-window layout {pattern} is not periodic; mlx-lm cannot build it.")
        pattern = period
    if m.get("final_logit_softcapping", 0.0, float):
        raise UserError(f"{m.path}: gemma3 with final logit soft-capping is not supported by mlx-lm's gemma3.")
    n_embd, n_head = args["hidden_size"], args["num_attention_heads"]
    return {**args, "rope_local_base_freq": m.get("rope.freq_base_swa", 10000.0, float),
            "sliding_window": m.get("attention.sliding_window", 4096), "sliding_window_pattern": int(pattern),
            # llama.cpp (models/gemma3.cpp): queries scale by 1/sqrt(head_dim), 27B (62 blocks) by 1/sqrt(dim/heads)
            "query_pre_attn_scalar": n_embd / n_head if args["num_hidden_layers"] == 62 else args["head_dim"]}


@dataclass(frozen=True)
class Arch:
    """How one GGUF architecture becomes an mlx-lm model."""

    mlx_module: str                       # mlx_lm.models.<this>
    rope: str                             # "interleaved": Q/K rows permuted for it by llama.cpp's converter; "neox": as in HF
    args: Callable[[Meta, dict], dict]    # ModelArgs fields from metadata and tensor shapes
    norm_offset: float = 0.0              # subtracted from norm weights (the gemma converter stored 1 + w)
    rope_freqs: bool = False              # llama 3: per-frequency factors in rope_freqs.weight
    fast_mlp: str | None = "swiglu"       # mlx_fast's MLP on the CPU: "swiglu", "gelu_tanh", or None
    fast_attention: bool = True           # mlx_fast's attention on the CPU (llama-shaped: no q/k norms)
    trunk_cache: bool = True              # the frozen blocks' outputs can be cached (plain embed, one mask)
    examples: str = ""
    # training defaults measured to work for the family (where `--lr` is not given): see docs/models.md
    lr: float = 3e-4


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("llama", "interleaved", _common_args, rope_freqs=True,
                  examples="SmolLM2, Llama 2/3.x, Mistral"),
    "qwen2": Arch("qwen2", "neox", _qwen2_args, examples="Qwen2, Qwen2.5"),
    "qwen3": Arch("qwen3", "neox", _common_args, fast_attention=False, examples="Qwen3"),
    # gemma3: no trunk cache (its embeddings are scaled and its sliding layers need their own masks); its
    # tanh GELU through mlx_fast: a LoRA step on gemma-3-270m 5.8 -> 4.1 s (batch 8 x 96 tokens, 2 cores)
    # lr 1e-4: at 3e-4 gemma-3-270m's loss spiked to 11 nats and the warm-up learned only the label prior on
    # fpb; at 1e-4 its SFT scored 0.912 (majority 0.603)
    "gemma3": Arch("gemma3_text", "neox", _gemma3_args, norm_offset=1.0, fast_mlp="gelu_tanh",
                   fast_attention=False, trunk_cache=False, examples="Gemma 3", lr=1e-4),
}
DEFAULT_LR = 3e-4  # an architecture outside the table (nothing trains it; kept for messages)


def default_lr(arch: str) -> float:
    """The peak learning rate a run uses for this GGUF architecture when `--lr` is not given."""
    spec = ARCHITECTURES.get(arch) or ARCHITECTURES.get({"gemma3_text": "gemma3"}.get(arch, arch))
    return spec.lr if spec else DEFAULT_LR


def supported_names() -> str:
    return ", ".join(f"{a} ({s.examples})" for a, s in ARCHITECTURES.items())


def readable_types() -> set[str]:
    import gguf

    return set(PLAIN) | {t.name for t in gguf.quants._type_traits}


# ----------------------------------------------------------------------------- can MLX train it?

def support(path: Path, fields: dict, tensor_shapes: dict, tensor_types: set[str]) -> str | None:
    """None when MLX can train this file, else the reason in one line (the file named)."""
    m = Meta(path, fields)
    spec = ARCHITECTURES.get(m.arch)
    if spec is None:
        return (f"{path}: architecture {m.arch!r} cannot be trained with MLX here (supported: {supported_names()}). "
                "Pick a GGUF of one of these.")
    bad = sorted(tensor_types - readable_types())
    if bad:
        return f"{path}: tensor type(s) {', '.join(bad)} cannot be read (gguf-py has no dequantizer for them)."
    if "token_embd.weight" not in tensor_shapes:
        return f"{path}: no token_embd.weight tensor; the file is not a complete {m.arch} model."
    if "rope_freqs.weight" in tensor_shapes and not spec.rope_freqs:
        return f"{path}: rope_freqs is not supported for {m.arch} in MLX training."
    try:
        args = spec.args(m, tensor_shapes)
    except UserError as e:
        return str(e)
    head_dim = args.get("head_dim") or args["hidden_size"] // args["num_attention_heads"]
    if m.get("rope.dimension_count", head_dim) != head_dim:
        return f"{path}: partial rotary embeddings ({m.arch}.rope.dimension_count) are not supported for MLX training."
    return None


def describe(fields: dict, tensor_types: set[str], reason: str | None) -> str:
    """`models info`'s one phrase for MLX support."""
    from . import quantized

    if reason:
        return "no: " + reason.split(": ", 1)[-1]
    arch = str(fields.get("general.architecture"))
    how = f"{arch} via mlx_lm.models.{ARCHITECTURES[arch].mlx_module}"
    loose = sorted(t for t in tensor_types - set(PLAIN) if not quantized.keeps(t))
    cpu = "on a CPU the file's weights kept as they are, dequantized exactly where multiplied"
    if loose:
        cpu += f" ({', '.join(loose)} as float32)"
    gpu = [t for t in tensor_types - set(PLAIN) - set(KEPT_QUANTIZED)]
    return (f"yes ({how}); {cpu}; on a GPU Q4_0/Q4_1/Q8_0 kept quantized"
            + (f", {', '.join(sorted(gpu))} as float16" if gpu else ""))


# ----------------------------------------------------------------------------- reading tensors

def shapes_and_types(f) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """{name: numpy shape (rows, cols)} and the set of tensor type names."""
    return {t.name: t.shape for t in f.tensors}, {t.tensor_type.name for t in f.tensors}


def dequantized(t, dtype=np.float32) -> np.ndarray:
    """Any GGUF tensor as a dense array in numpy shape (gguf-py's dequantizers, exact for F32)."""
    import gguf

    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape).astype(dtype, copy=False)


def mlx_quantized(t) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A Q4_0/Q4_1/Q8_0 tensor in MLX's affine quantized layout, exactly (weight uint32, scales, biases, bits):
    each 32-weight block's value is scale * q + bias with the block's own float16 scale and bias."""
    kind = t.tensor_type.name
    rows = int(np.prod(t.shape[:-1]))
    blocks = np.asarray(t.data).reshape(rows, -1).view(np.uint8)
    if kind == "Q8_0":  # d (f16), 32 x int8: value = d * q
        b = blocks.reshape(rows, -1, 34)
        d = b[..., :2].copy().view(np.float16)[..., 0]
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # 0..255
        scales, biases, bits = d, (-128.0 * d.astype(np.float32)).astype(np.float16), 8
    else:  # Q4_0: d, 16 bytes: value = d * (q - 8); Q4_1: d, m, 16 bytes: value = d * q + m
        size = 18 if kind == "Q4_0" else 20
        b = blocks.reshape(rows, -1, size)
        d = b[..., :2].copy().view(np.float16)[..., 0]
        if kind == "Q4_0":
            m = (-8.0 * d.astype(np.float32)).astype(np.float16)
        else:
            m = b[..., 2:4].copy().view(np.float16)[..., 0]
        qs = b[..., size - 16:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # weights 0..15 in low nibbles, 16..31 in high
        scales, biases, bits = d, m, 4
    q = q.reshape(rows, -1).astype(np.uint32)
    per = 32 // bits  # values per uint32, the first in the lowest bits
    q = q.reshape(rows, -1, per)
    packed = np.zeros(q.shape[:2], np.uint32)
    for i in range(per):
        packed |= q[..., i] << np.uint32(bits * i)
    return packed, scales, biases, bits


# ----------------------------------------------------------------------------- the model

def load_model(gguf_path, *, dequantize: bool | None = None, base: str = "file"):
    """An mlx-lm model (the class the architecture table names) holding the GGUF's weights.

    On a CPU (`dequantize`, the default there) the model computes in float32: quantized matmuls there do not
    use BLAS and train ~15x slower (SmolLM2 here: 8 against 125 tokens/s). With `base="file"` (the default)
    every weight matrix of a type `quantized.KEPT` reads (and F16/BF16) stays as the file's bytes and is
    dequantized exactly where it is multiplied (`quantized.QuantLinear`): memory about the file's size;
    `base="f32"` dequantizes the whole base to float32 here (about 8x a 4-bit file). On a GPU Q4_0/Q4_1/Q8_0
    layers stay quantized (QLoRA) and other quantized tensors are dequantized to float16.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from ..core import adapter_gguf as ag

    path = Path(gguf_path)
    reader = gguf_file.read(path)
    fields = reader.fields
    shapes, types = shapes_and_types(reader)
    reason = support(path, fields, shapes, types)
    if reason:
        raise UserError(reason)
    meta = Meta(path, fields)
    spec = ARCHITECTURES[meta.arch]
    if dequantize is None:
        dequantize = mx.default_device().type != mx.DeviceType.gpu

    module = importlib.import_module(f"mlx_lm.models.{spec.mlx_module}")
    traditional = spec.rope == "interleaved"
    args = module.ModelArgs.from_dict({**spec.args(meta, shapes), "rope_traditional": traditional})
    model = module.Model(args)
    # classes without a rope_traditional argument hard-code theirs: it must be the table's
    assert all(layer.self_attn.rope.traditional == traditional for layer in model.layers), spec
    tied = "output.weight" not in shapes
    if "lm_head" in model and tied:  # gemma3's Model always builds one (mlx-lm's sanitize pops it)
        model.pop("lm_head")
        model.tie_word_embeddings = True

    # GGUF name -> MLX parameter name, both ways through gguf-py's TensorNameMap
    names = ag.name_map(meta.arch, args.num_hidden_layers)
    to_mlx = {}
    for mlx_name, _ in tree_flatten(model.parameters()):
        gguf_name = ag.gguf_name(names, mlx_name)
        if gguf_name is None:
            raise UserError(f"{path}: mlx-lm's {spec.mlx_module} parameter {mlx_name} has no GGUF tensor name.")
        to_mlx[gguf_name] = mlx_name

    from mlx.utils import tree_unflatten

    from . import quantized

    modules = dict(model.named_modules())
    params, qbits, kept = {}, {}, []
    for t in reader.tensors:
        target = to_mlx.get(t.name)
        if target is None:
            if t.name != "rope_freqs.weight":
                log.debug("%s: tensor %s is not used by MLX", path, t.name)
            continue
        kind = t.tensor_type.name
        mod = target[: -len(".weight")]
        if (dequantize and base == "file" and quantized.keeps(kind) and target.endswith(".weight")
                and len(t.shape) == 2 and isinstance(modules.get(mod), (nn.Linear, nn.Embedding))):
            # the file's bytes, dequantized where multiplied: memory of the file's size, not 8x it
            rows, cols = (int(n) for n in t.shape)
            data = quantized.stored(kind, t.data)
            if isinstance(modules[mod], nn.Embedding):
                layer = quantized.QuantEmbedding(kind, data, rows, cols)
            else:  # a bias (qwen2's q/k/v) is a placeholder here: load_weights below sets the file's
                layer = quantized.QuantLinear(kind, data, rows, cols, modules[mod].bias if "bias" in modules[mod] else None)
            kept.append((mod, layer))
            params[mod + ".qweight"] = data
            reader.forget(t)  # copied: its pages of the file need not stay resident too
            continue
        if not dequantize and kind in KEPT_QUANTIZED and target.endswith(".weight"):
            w, s, b, bits = mlx_quantized(t)
            params[target], params[mod + ".scales"], params[mod + ".biases"] = (mx.array(w), mx.array(s), mx.array(b))
            qbits[mod] = bits
            continue
        arr = dequantized(t, np.float32)
        if spec.norm_offset and "norm" in target:
            arr = arr - np.float32(spec.norm_offset)
        # a GPU keeps F32 tensors (norms) in float32 and dequantized ones in float16, as mx.load does
        keep32 = dequantize or kind == "F32"
        params[target] = mx.array(arr if keep32 else arr.astype(np.float16))
        reader.forget(t)
    if kept:
        model.update_modules(tree_unflatten(kept))
    if qbits:
        nn.quantize(model, class_predicate=lambda p, m: {"group_size": GROUP_SIZE, "bits": qbits[p]} if p in qbits else False)
    if spec.rope_freqs and "rope_freqs.weight" in shapes:
        factors = dequantized(next(t for t in reader.tensors if t.name == "rope_freqs.weight"))
        _use_rope_freqs(model, factors, args.rope_theta)
    try:
        model.load_weights(list(params.items()), strict=True)
    except ValueError as e:
        raise UserError(f"{path}: its tensors do not fit mlx-lm's {spec.mlx_module} model ({e}). "
                        "The file may be damaged.") from None
    mx.eval(model.parameters())
    del reader, modules, kept
    if mx.default_device().type != mx.DeviceType.gpu:
        from . import mlx_fast

        mlx_fast.speed_up(model, mlp=spec.fast_mlp, attention=spec.fast_attention)
    model.eval()
    return model


def held_bytes(gguf_path, base: str = "file", gpu: bool = False) -> tuple[int, dict]:
    """Bytes of weights `load_model` holds for this file (on a CPU the file's bytes where kept, float32 where not,
    every tensor with `base="f32"`; on a GPU Q4_0/Q4_1/Q8_0 as the file, F32 as it is, the rest float16), and the
    model's ModelArgs fields, from the tensor table alone (no load)."""
    from . import quantized

    path = Path(gguf_path)
    reader = gguf_file.read(path)
    shapes, types = shapes_and_types(reader)
    reason = support(path, reader.fields, shapes, types)
    if reason:
        raise UserError(reason)
    meta = Meta(path, reader.fields)
    held = 0
    for t in reader.tensors:
        kind = t.tensor_type.name
        if gpu:
            held += t.data.nbytes if kind in KEPT_QUANTIZED or kind == "F32" else 2 * t.n_elements
            continue
        keep = base == "file" and len(t.shape) == 2 and quantized.keeps(kind)
        held += t.data.nbytes if keep else 4 * t.n_elements
    return held, ARCHITECTURES[meta.arch].args(meta, shapes)


def _use_rope_freqs(model, factors: np.ndarray, base: float) -> None:
    """Llama 3 rope scaling as llama.cpp applies it: rotary frequency i divided by factors[i]. mx.fast.rope's
    `freqs` are the inverse frequencies (periods), so they are base^(2i/d) * factors[i]."""
    import mlx.core as mx
    import mlx.nn as nn

    class FreqsRoPE(nn.Module):
        def __init__(self, dims: int, traditional: bool, periods: mx.array):
            super().__init__()
            self.dims, self.traditional, self._freqs = dims, traditional, periods  # _: not a parameter

        def __call__(self, x, offset: int = 0):
            return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset,
                                freqs=self._freqs)

    for layer in model.layers:
        attn = layer.self_attn
        dims = attn.rope.dims
        if len(factors) != dims // 2:
            raise UserError(f"rope_freqs has {len(factors)} factors, the heads need {dims // 2}; the file is damaged.")
        periods = base ** (np.arange(0, dims, 2, dtype=np.float64) / dims) * factors.astype(np.float64)
        attn.rope = FreqsRoPE(dims, attn.rope.traditional, mx.array(periods.astype(np.float32)))


def spec_of(model) -> Arch:
    """The table entry a model loaded by `load_model` was built from."""
    return ARCHITECTURES[model.args.model_type]


def lm_head(model, h):
    """Logits from final hidden states: the untied output layer, or the tied embedding."""
    return model.lm_head(h) if "lm_head" in model else model.model.embed_tokens.as_linear(h)


"""Random-weight GGUF models of the shapes users bring, for speed and memory benchmarks offline.

No model hub is reachable here, and speed depends on a model's shape and quantization, not on what its
weights learned. So a benchmark writes a model of a released shape (Llama 3.2 1B: 16 blocks, width 2048,
FFN 8192, 32 query and 8 KV heads, llama3 rope scaling; Llama 3.2 3B; Llama 3.1 8B) with random weights and a
real tokenizer copied from a GGUF at hand (its token list padded with reserved tokens up to the shape's
vocabulary, so the embedding and output tables have their released size), laid out as llama.cpp's converter
lays out a llama file (Q/K rows in its rope order, `rope_freqs` for the llama3 scaling), then quantized by
llama.cpp's own quantizer. The answers such a model gives mean nothing; this module does not evaluate or train
anything.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    n_layer: int
    dim: int
    n_ff: int
    n_head: int
    n_head_kv: int
    rope_base: float
    rope_scaling: tuple[float, float, float, int] | None  # llama3: (factor, low_freq, high_freq, original ctx)
    n_ctx: int
    tied: bool
    n_vocab: int = 0  # 0: the tokenizer's own; more: its token list padded with reserved tokens


SHAPES = {
    "llama-1b": Shape(n_layer=16, dim=2048, n_ff=8192, n_head=32, n_head_kv=8, rope_base=500000.0,
                      rope_scaling=(32.0, 1.0, 4.0, 8192), n_ctx=131072, tied=True),
    "llama-3b": Shape(n_layer=28, dim=3072, n_ff=8192, n_head=24, n_head_kv=8, rope_base=500000.0,
                      rope_scaling=(32.0, 1.0, 4.0, 8192), n_ctx=131072, tied=True, n_vocab=128256),
    "llama-8b": Shape(n_layer=32, dim=4096, n_ff=14336, n_head=32, n_head_kv=8, rope_base=500000.0,
                      rope_scaling=(8.0, 1.0, 4.0, 8192), n_ctx=131072, tied=False, n_vocab=128256),
}
QUANTS = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K")


def llama3_rope_factors(shape: Shape) -> np.ndarray:
    """One factor per rotary pair (llama.cpp divides each frequency by it), as llama.cpp's converter computes
    them for a llama3 `rope_scaling`."""
    factor, low, high, old_ctx = shape.rope_scaling
    head_dim = shape.dim // shape.n_head
    freqs = 1.0 / shape.rope_base ** (np.arange(0, head_dim, 2) / head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_random_model(out: Path, shape: str | Shape, tokenizer_from: Path, qtype: str = "Q4_K_M",
                       seed: int = 0) -> Path:
    """Write a random model of `shape` (a name in SHAPES, or a Shape) with the tokenizer (and chat template) of
    the GGUF `tokenizer_from`, quantized to `qtype` by llama.cpp; the file appears whole or not at all."""
    import gguf

    from ..method.models import check_gguf

    if isinstance(shape, str) and shape not in SHAPES:
        raise UserError(f"--shape {shape!r}: choose one of {', '.join(SHAPES)}")
    shape_name, shape = (shape, SHAPES[shape]) if isinstance(shape, str) else ("custom", shape)
    if qtype.upper() not in QUANTS:
        raise UserError(f"--type {qtype!r}: choose one of {', '.join(QUANTS)}")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out}: exists; give a new file name")
    qtype = qtype.upper()
    check_gguf(Path(tokenizer_from))
    src = gguf.GGUFReader(str(tokenizer_from))  # gguf-py's reader: the whole token list and merges
    f16 = out.with_name(f".{out.name}.{os.getpid()}.f16.tmp")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        w = gguf.GGUFWriter(str(f16), "llama")
        w.add_name(f"random-{shape_name}")
        w.add_context_length(shape.n_ctx)
        w.add_embedding_length(shape.dim)
        w.add_block_count(shape.n_layer)
        w.add_feed_forward_length(shape.n_ff)
        w.add_head_count(shape.n_head)
        w.add_head_count_kv(shape.n_head_kv)
        w.add_rope_dimension_count(shape.dim // shape.n_head)
        w.add_rope_freq_base(shape.rope_base)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
        own = len(src.fields["tokenizer.ggml.tokens"].contents())
        n_vocab = max(own, shape.n_vocab)
        pad = {"tokenizer.ggml.tokens": [f"<|reserved_special_token_{i}|>" for i in range(n_vocab - own)],
               "tokenizer.ggml.token_type": [int(gguf.TokenType.CONTROL)] * (n_vocab - own),
               "tokenizer.ggml.scores": [0.0] * (n_vocab - own)}
        for key, field in src.fields.items():  # the tokenizer as it is, token list and chat template included
            if key.startswith("tokenizer."):
                value = field.contents()
                if key in pad:
                    value = list(value) + pad[key]
                w.add_key_value(key, value, field.types[0], field.types[-1] if field.types[0] ==
                                gguf.GGUFValueType.ARRAY else None)
        w.add_vocab_size(n_vocab)
        rng = np.random.default_rng(seed)
        head_dim = shape.dim // shape.n_head

        def mat(rows: int, cols: int) -> np.ndarray:  # (rows, cols) float16, variance 1/cols: activations stay O(1)
            return (rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(math.sqrt(cols))).astype(np.float16)

        # (name, shape, maker): declared first, then written one at a time (an 8B model is 16 GB in float16)
        ones = lambda n: (lambda: np.ones(n, np.float32))  # noqa: E731
        matrix = lambda rows, cols: (lambda: mat(rows, cols))  # noqa: E731
        tensors = [("token_embd.weight", (n_vocab, shape.dim), matrix(n_vocab, shape.dim))]
        if shape.rope_scaling:
            factors = llama3_rope_factors(shape)
            tensors.append(("rope_freqs.weight", factors.shape, lambda: factors))
        for i in range(shape.n_layer):
            q, kv, d, f = shape.n_head * head_dim, shape.n_head_kv * head_dim, shape.dim, shape.n_ff
            tensors += [(f"blk.{i}.attn_norm.weight", (d,), ones(d)),
                        (f"blk.{i}.attn_q.weight", (q, d), matrix(q, d)),
                        (f"blk.{i}.attn_k.weight", (kv, d), matrix(kv, d)),
                        (f"blk.{i}.attn_v.weight", (kv, d), matrix(kv, d)),
                        (f"blk.{i}.attn_output.weight", (d, q), matrix(d, q)),
                        (f"blk.{i}.ffn_norm.weight", (d,), ones(d)),
                        (f"blk.{i}.ffn_gate.weight", (f, d), matrix(f, d)),
                        (f"blk.{i}.ffn_up.weight", (f, d), matrix(f, d)),
                        (f"blk.{i}.ffn_down.weight", (d, f), matrix(d, f))]
        tensors.append(("output_norm.weight", (shape.dim,), ones(shape.dim)))
        if not shape.tied:
            tensors.append(("output.weight", (n_vocab, shape.dim), matrix(n_vocab, shape.dim)))
        for name, dims, _ in tensors:
            dtype = np.dtype(np.float16 if len(dims) == 2 else np.float32)
            w.add_tensor_info(name, dims, dtype, int(np.prod(dims)) * dtype.itemsize)
        log.info("writing a random %s model (%s) to %s", shape_name, qtype, out)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, _, make in tensors:
            w.write_tensor_data(make())
        w.close()
        if qtype == "F16":
            os.replace(f16, out)
        else:
            quantize(f16, tmp, qtype)
            os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"{out}: the model could not be written ({e.strerror or e})") from None
    finally:
        f16.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out


def quantize(src: Path, dst: Path, qtype: str) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (`qtype`: Q4_K_M, Q8_0, ...), as users' files are made."""
    from ..engines.quantizer import quantize as llama_quantize

    llama_quantize(src, dst, qtype)

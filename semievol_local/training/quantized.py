"""The frozen base as the GGUF file holds it: every quantized weight matrix stays in memory as the file's own
bytes, and is dequantized to float32 only where it is multiplied, one slice of rows at a time, in the forward
pass and again in the backward pass.

Training on a CPU multiplies float32 (MLX's quantized matmul there does not use BLAS and trains ~15x slower),
but a float32 copy of the whole base is ~8x a 4-bit file: a 1B Q4_K_M file trained at a 6.7 GB peak. Here the
base costs its file size, and at most one slice of float32 weights (`CHUNK_BYTES`) lives at a time:
`QuantLinear` multiplies through `matmul_fn`'s `mx.custom_function`, whose forward is x @ W.T and whose
backward is dy @ W with W dequantized again (frozen weights get no gradient, so nothing of W is kept between
the two). The embedding table gathers the rows of the tokens it looks up and dequantizes only those; as the
tied output projection it multiplies like `QuantLinear`.

Exactness: each dequantizer is gguf-py's NumPy dequantizer (`gguf.quants`) written in MLX operations, the same
float32 operations in the same order, so the weights the trainer computes with equal gguf-py's float32
dequantization bit for bit (tests compare them on tensors written by llama.cpp's quantizer, type by type).
The types kept this way are `KEPT`; a tensor of any other type (Q2_K, Q3_K, IQ*) is dequantized to float32
when the model loads, as before.

What it does NOT do: read files, build models or train (that is `gguf_loader` and `mlx_engine`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import mlx.core as mx
import mlx.nn as nn

QK_K = 256
CHUNK_BYTES = 64 << 20  # the float32 weights one multiplication dequantizes at a time


# ----------------------------------------------------------------------------- dequantizers (gguf-py's, in MLX)
# Each takes the file's blocks as uint8 (n_blocks, type size) and returns float32 (n_blocks, block size).

def _f16(b: mx.array) -> mx.array:
    return mx.view(b, mx.float16).astype(mx.float32)


def _nibbles(qs: mx.array, n: int) -> mx.array:
    """(nb, k, n/2) bytes -> (nb, k, n): the low nibbles of each run of n/2 bytes, then its high nibbles."""
    shifts = mx.array([0, 4], dtype=mx.uint8).reshape(1, 1, 2, 1)
    return ((qs[:, :, None, :] >> shifts) & 15).reshape(qs.shape[0], qs.shape[1], n)


def _high_bits(qh: mx.array, n_blocks: int) -> mx.array:
    """Q5_0/Q5_1: bit i of the little-endian uint32 `qh` is weight i's fifth bit -> (nb, 32) uint8 (read byte by
    byte: bit i is bit i % 8 of byte i // 8; bytes, not 32-bit words, pass through memory)."""
    return ((qh.reshape(n_blocks, 4, 1) >> mx.arange(8, dtype=mx.uint8).reshape(1, 1, 8)) & 1).reshape(n_blocks, 32)


def _q8_0(b):
    return b[:, 2:].view(mx.int8).astype(mx.float32) * _f16(b[:, :2])


def _q4_0(b):
    q = _nibbles(b[:, None, 2:], 32).reshape(b.shape[0], 32).view(mx.int8) - 8
    return _f16(b[:, :2]) * q.astype(mx.float32)


def _q4_1(b):
    q = _nibbles(b[:, None, 4:], 32).reshape(b.shape[0], 32).astype(mx.float32)
    return (_f16(b[:, :2]) * q) + _f16(b[:, 2:4])


def _q5_0(b):
    ql = _nibbles(b[:, None, 6:], 32).reshape(b.shape[0], 32)
    q = (ql | (_high_bits(b[:, 2:6], b.shape[0]) << 4)).view(mx.int8) - 16
    return _f16(b[:, :2]) * q.astype(mx.float32)


def _q5_1(b):
    ql = _nibbles(b[:, None, 8:], 32).reshape(b.shape[0], 32)
    q = (ql | (_high_bits(b[:, 4:8], b.shape[0]) << 4)).astype(mx.float32)
    return (_f16(b[:, :2]) * q) + _f16(b[:, 2:4])


def _k_scale_min(s: mx.array) -> tuple[mx.array, mx.array]:
    """Q4_K/Q5_K: the 12 bytes of eight 6-bit scales and mins -> two (nb, 8) uint8 arrays (gguf-py's get_scale_min)."""
    s = s.reshape(s.shape[0], 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = mx.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = mx.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_affine(b, q):
    """Q4_K/Q5_K: (d * sc_j) * q - (dmin * m_j) per 32-weight group j."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.astype(mx.float32)).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.astype(mx.float32)).reshape(n, 8, 1)
    return (d * q.astype(mx.float32) - dm).reshape(n, QK_K)


def _q4_k(b):
    return _k_affine(b, _nibbles(b[:, 16:].reshape(b.shape[0], 4, 32), 64).reshape(b.shape[0], 8, 32))


def _q5_k(b):
    n = b.shape[0]
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32), 64).reshape(n, 8, 32)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> mx.arange(8, dtype=mx.uint8).reshape(1, 8, 1)) & 1
    return _k_affine(b, ql | (qh << 4))


def _q6_k(b):
    n = b.shape[0]
    ql = _nibbles(b[:, :128].reshape(n, 2, 64), 128).reshape(n, 8, 32)
    shifts = mx.array([0, 2, 4, 6], dtype=mx.uint8).reshape(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).view(mx.int8) - 32).reshape(n, 16, 16).astype(mx.float32)
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(mx.int8).astype(mx.float32)).reshape(n, 16, 1)
    return (d * q).reshape(n, QK_K)


class Kind(NamedTuple):
    block: int  # weights per block
    size: int  # bytes per block
    dequantize: Callable[[mx.array], mx.array]


KEPT: dict[str, Kind] = {
    "Q8_0": Kind(32, 34, _q8_0), "Q4_0": Kind(32, 18, _q4_0), "Q4_1": Kind(32, 20, _q4_1),
    "Q5_0": Kind(32, 22, _q5_0), "Q5_1": Kind(32, 24, _q5_1),
    "Q4_K": Kind(QK_K, 144, _q4_k), "Q5_K": Kind(QK_K, 176, _q5_k), "Q6_K": Kind(QK_K, 210, _q6_k),
}
FLOAT = ("F16", "BF16")  # kept in their 16 bits; widened to float32 where multiplied (exact)


def keeps(kind: str) -> bool:
    """Whether a tensor of this GGML type stays as the file's bytes (else: float32 at load)."""
    return kind in KEPT or kind in FLOAT


def to_float32(kind: str, data: mx.array, cols: int) -> mx.array:
    """Rows of a kept tensor (`data` as `stored` made them) as float32 (rows, cols), as gguf-py computes them."""
    if kind == "F16":
        return data.astype(mx.float32)
    if kind == "BF16":  # gguf-py: (int16 -> int32) << 16, viewed as float32
        return mx.view(data.astype(mx.uint32) << 16, mx.float32)
    spec = KEPT[kind]
    rows = data.shape[0]
    return spec.dequantize(data.reshape(-1, spec.size)).reshape(rows, cols)


def stored(kind: str, data) -> mx.array:
    """A GGUF tensor's data (NumPy: F16 typed (rows, cols), others bytes (rows, row bytes)) as kept in memory."""
    import numpy as np

    if kind == "BF16":
        return mx.array(np.asarray(data).view(np.uint16))
    return mx.array(np.asarray(data))


# ----------------------------------------------------------------------------- multiplying by a kept matrix

_MATMULS: dict[tuple, Callable] = {}


def _slices(rows: int, cols: int) -> list[tuple[int, int]]:
    per = max(1, CHUNK_BYTES // (4 * cols))
    return [(r, min(r + per, rows)) for r in range(0, rows, per)]


def matmul_fn(kind: str, rows: int, cols: int) -> Callable[[mx.array, mx.array], mx.array]:
    """x @ W.T for W (rows, cols) kept as `kind`: float32 W slice by slice, forward and backward."""
    key = (kind, rows, cols)
    if key in _MATMULS:
        return _MATMULS[key]
    parts = _slices(rows, cols)

    # MLX evaluates a graph's shallow branches early: a dequantization depends on nothing but the file's bytes,
    # so without `mx.depends` every slice of every layer was computed up front and held until its product (8
    # layers of a 1B model: 0.9 GB more). Each slice waits for what it multiplies, and for the slice before it.
    @mx.custom_function
    def matmul(x, data):
        ys, after = [], x
        for a, b in parts:
            ys.append(x @ to_float32(kind, mx.depends(data[a:b], after), cols).T)
            after = ys[-1]
        return ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=-1)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, data = primals
        dx = cotangent
        for a, b in parts:
            part = cotangent[..., a:b] @ to_float32(kind, mx.depends(data[a:b], dx), cols)
            dx = part if dx is cotangent else dx + part
        return dx, mx.zeros_like(data)  # frozen: no gradient (never evaluated)

    _MATMULS[key] = matmul
    return matmul


class Dims(NamedTuple):
    """What code written for nn.Linear / nn.Embedding reads of `.weight` (mlx-lm's LoRA reads its shape)."""

    shape: tuple[int, int]
    dtype: mx.Dtype = mx.float32

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


class QuantLinear(nn.Linear):
    """A frozen linear layer (rows = outputs) kept as the file's bytes; `qweight` is its only weight parameter."""

    def __init__(self, kind: str, qweight: mx.array, rows: int, cols: int, bias: mx.array | None = None):
        nn.Module.__init__(self)
        self.qweight = qweight
        if bias is not None:
            self.bias = bias
        self._kind, self._rows, self._cols = kind, rows, cols  # underscored: not parameters

    @property
    def weight(self) -> Dims:
        return Dims((self._rows, self._cols))

    def __call__(self, x: mx.array) -> mx.array:
        y = matmul_fn(self._kind, self._rows, self._cols)(x, self.qweight)
        return y + self.bias if "bias" in self else y


class QuantEmbedding(nn.Embedding):
    """A frozen embedding table kept as the file's bytes: a lookup dequantizes the rows it reads; as the tied
    output projection it multiplies like `QuantLinear`."""

    def __init__(self, kind: str, qweight: mx.array, rows: int, cols: int):
        nn.Module.__init__(self)
        self.qweight = qweight
        self._kind, self._rows, self._cols = kind, rows, cols

    @property
    def weight(self) -> Dims:
        return Dims((self._rows, self._cols))

    def __call__(self, ids: mx.array) -> mx.array:
        rows = to_float32(self._kind, self.qweight[ids.reshape(-1)], self._cols)
        return rows.reshape(*ids.shape, self._cols)

    def as_linear(self, x: mx.array) -> mx.array:
        return matmul_fn(self._kind, self._rows, self._cols)(x, self.qweight)


def kept_bytes(model) -> int:
    """Bytes of the file's weights a model holds as they are (QuantLinear / QuantEmbedding)."""
    return sum(m.qweight.nbytes for _, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding)))


def n_weights(model) -> int:
    """A model's weights counted at their logical shapes (a kept matrix as rows x cols, not as its bytes)."""
    from mlx.utils import tree_flatten

    kept = [m for _, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    return sum(v.size for _, v in tree_flatten(model.parameters())) + sum(m.weight.size - m.qweight.size for m in kept)

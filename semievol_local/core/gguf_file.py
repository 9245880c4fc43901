"""A GGUF file's metadata and tensor table, read fast, with the tensor data memory-mapped.

gguf-py's `GGUFReader` builds a NumPy view for every element of every metadata array: on gemma-3-270m
(a 262,144-token vocabulary, three arrays of that length) it takes ~15 s before the first tensor is
seen, and every command that resolves a model paid it. This reader walks the same format (gguf-py's
constants, GGUF v2/v3, little-endian) and keeps arrays longer than `max_array` as an `Array` stub
(type and length), so opening any model takes milliseconds. Tensor data comes out in the layout
gguf-py's dequantizers take (`gguf.quants.dequantize(t.data, t.tensor_type)`).

`write_like` writes a new file with this one's metadata (some keys dropped or replaced) and new tensors.

What it does NOT do: interpret any key.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

_SCALARS = {  # GGUFValueType -> struct format
    gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.UINT64: "Q", gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT64: "d", gguf.GGUFValueType.BOOL: "?",
}


@dataclass(frozen=True)
class Array:
    """A metadata array too long to be worth reading (a vocabulary): its element type and length."""

    type: gguf.GGUFValueType
    length: int


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]              # NumPy order: (rows, cols) for a matrix
    tensor_type: gguf.GGMLQuantizationType
    data: np.ndarray                    # memory-mapped: F32/F16 typed in `shape`, others bytes (rows, row bytes)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


class GGUFFile:
    """`fields` {key: value} (str, number, bool, list, or `Array`) and `tensors` in file order."""

    def __init__(self, path: str | Path, max_array: int = 4096):
        self.path = Path(path)
        self._mm = np.memmap(self.path, mode="r")
        buf = self._mm
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"not a GGUF file (starts with {bytes(buf[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        self._buf, self._off, self._max_array = buf, 24, max_array
        self.fields: dict[str, object] = {}
        self.spans: dict[str, tuple[int, int]] = {}  # each key's bytes in the file (key, type, value): `write_like`
        for _ in range(n_kv):
            begin = self._off
            key = self._str()
            self.fields[key] = self._value(gguf.GGUFValueType(self._unpack("I")))
            self.spans[key] = (begin, self._off)
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            n_dims = self._unpack("I")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self._off)
            self._off += 8 * n_dims
            kind, offset = self._unpack("I"), self._unpack("Q")
            infos.append((name, tuple(int(d) for d in reversed(dims)), gguf.GGMLQuantizationType(kind), offset))
        align = int(self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        start = -(-self._off // align) * align
        self.tensors = [self._tensor(name, shape, kind, start + offset) for name, shape, kind, offset in infos]
        del self._buf

    def _unpack(self, fmt: str):
        (v,) = struct.unpack_from("<" + fmt, self._buf, self._off)
        self._off += struct.calcsize(fmt)
        return v

    def _str(self) -> str:
        n = self._unpack("Q")
        s = bytes(self._buf[self._off: self._off + n]).decode("utf-8", errors="replace")
        self._off += n
        return s

    def _value(self, kind: gguf.GGUFValueType):
        if kind == gguf.GGUFValueType.STRING:
            return self._str()
        if kind != gguf.GGUFValueType.ARRAY:
            return self._unpack(_SCALARS[kind])
        sub, n = gguf.GGUFValueType(self._unpack("I")), self._unpack("Q")
        if n <= self._max_array:
            return [self._value(sub) for _ in range(n)]
        if sub == gguf.GGUFValueType.STRING:  # step over n (length, bytes) strings without decoding them
            for _ in range(n):
                self._off += 8 + struct.unpack_from("<Q", self._buf, self._off)[0]
        elif sub in _SCALARS:
            self._off += n * struct.calcsize(_SCALARS[sub])
        else:  # arrays of arrays: walk them
            for _ in range(n):
                self._value(sub)
        return Array(sub, n)

    def forget(self, t: Tensor | np.ndarray) -> None:
        """Drop the pages of a tensor's data (or of an array viewing this file) from this process's memory once
        they are copied or written (they stay in the page cache, and a later read maps them again). A loader that
        copies every tensor would otherwise hold the whole file twice in its resident memory until the end: the
        8B shape's 4.9 GB file, 9.8 GB. An array not in this file is left alone."""
        import mmap

        data = t.data if isinstance(t, Tensor) else t
        handle = getattr(self._mm, "_mmap", None)  # numpy's memmap keeps the mmap object here
        if handle is None or not hasattr(mmap, "MADV_DONTNEED") or not isinstance(data, np.ndarray):
            return  # no madvise (not Linux/macOS): the pages go when the file is closed
        begin = data.__array_interface__["data"][0] - self._mm.__array_interface__["data"][0]
        end = begin + data.nbytes
        if begin < 0 or end > self._mm.nbytes:
            return
        begin -= begin % mmap.PAGESIZE
        try:
            handle.madvise(mmap.MADV_DONTNEED, begin, end - begin)
        except (OSError, ValueError):
            pass  # an advice, not a need

    def _tensor(self, name: str, shape: tuple[int, ...], kind: gguf.GGMLQuantizationType, start: int) -> Tensor:
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
            n = int(np.prod(shape))
            data = self._mm[start: start + n * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
        else:
            byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, kind))
            data = self._mm[start: start + int(np.prod(byte_shape))].reshape(byte_shape)
        return Tensor(name, shape, kind, data)


def _gguf_str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_like(dst: str | Path, src: GGUFFile, tensors: list[tuple[str, tuple[int, ...], int, np.ndarray]], *,
               drop: tuple[str, ...] = (), add: dict[str, str | bool] | None = None) -> None:
    """Write `dst`: `src`'s metadata byte for byte (less the keys in `drop` and `add`, then `add`'s string and
    bool keys) with `tensors` (name, NumPy-order shape, ggml type, data: F32/F16 typed, others raw bytes, or a
    function that returns it, called when its turn comes so that one computed tensor is held at a time). gguf-py's
    reader takes ~10 s to walk a 262k-token vocabulary that this copies as it is."""
    add = add or {}
    align = int(src.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    kv = [bytes(src._mm[a:b]) for key, (a, b) in src.spans.items() if key not in drop and key not in add]
    for key, value in add.items():
        kind = gguf.GGUFValueType.BOOL if isinstance(value, bool) else gguf.GGUFValueType.STRING
        kv.append(_gguf_str(key) + struct.pack("<I", kind) +
                  (struct.pack("<?", value) if isinstance(value, bool) else _gguf_str(str(value))))
    infos, offset, sizes = [], 0, []
    for name, shape, kind, _ in tensors:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        sizes.append(int(np.prod(shape)) // block * size)
        infos.append(_gguf_str(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *reversed(shape), int(kind),
                                                    offset))
        offset += -(-sizes[-1] // align) * align
    with open(dst, "wb") as f:
        f.write(struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), len(kv)))
        for part in kv + infos:
            f.write(part)
        f.write(b"\0" * (-f.tell() % align))
        for (name, _, _, data), size in zip(tensors, sizes):
            view = data() if callable(data) else data  # a callable: computed only now
            data = np.ascontiguousarray(view)
            if data.nbytes != size:
                raise ValueError(f"{name}: {data.nbytes} bytes of data for a tensor of {size}")
            f.write(memoryview(data).cast("B"))
            f.write(b"\0" * (-size % align))
            src.forget(view)  # a tensor copied from `src` as it is: its pages of `src` need not stay resident


def open_gguf(path: str | Path) -> GGUFFile:
    return GGUFFile(path)


def read(path: str | Path) -> GGUFFile:
    """The opened GGUF at `path`, or a one-line `UserError` (no such file, not a GGUF, truncated): the one
    place a model file given by a user is opened."""
    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file. Pass the path of a .gguf model.")
    try:
        return GGUFFile(path)
    except Exception as e:  # not a GGUF, or truncated
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:100]}); the file may be "
                        "truncated: download it again") from None

"""Crash-safe writes for writers that insist on a path (mx.save_safetensors, gguf.GGUFWriter).

`files.atomic_write_bytes` covers data already in memory; this covers the rest with the same rule:
write beside the target, fsync, `os.replace`. A reader sees the old file or the new one, never half.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike):
    """Yield a temporary path next to `path` with the same suffix (mx.save_safetensors appends one
    otherwise); on success fsync it and move it over `path`, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

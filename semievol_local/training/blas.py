"""Make MLX's CPU matmuls fast on Linux by loading an optimized BLAS before MLX starts.

The Linux `mlx-cpu` wheel links the reference (netlib) BLAS: a float32 GEMM runs at ~7 GFLOPS where
OpenBLAS reaches ~202 GFLOPS on the same 2 cores. Loading a library that exports the standard
`cblas_*` symbols with RTLD_GLOBAL *before* `import mlx.core` makes MLX bind to it instead; no
LD_PRELOAD or re-exec is needed. On macOS MLX uses Accelerate and this module does nothing.

`tune_malloc()` is the other Linux CPU fix: glibc hands big freed buffers straight back to the kernel,
so every step's 100 MB logits buffer page-faults in again (slow in a VM); keeping them in the heap makes
a training step 3-6% faster. `untune_malloc()` puts glibc's defaults back and gives the kept memory back
once training is over, so the long llama.cpp stages that follow do not sit on the training peak.

OpenBLAS picks its kernels by CPU model, and a release older than the CPU falls back to generic SSE3
("Prescott") kernels: Debian 12's OpenBLAS 0.3.21 on a Sapphire Rapids Xeon ran MLX's float32 GEMM at
32-48 GFLOPS, and at 212 with `OPENBLAS_CORETYPE=SkylakeX`. So, unless the user set it, the core type
is chosen from the CPU's own flags before the library loads (AVX-512 F/CD/BW/DQ/VL: SkylakeX; AVX2 +
FMA: Haswell); a CPU OpenBLAS knows gets the same kernels either way.

This module does not install anything and does not print: it logs one warning when no BLAS is found.
More on BLAS and the build flags: docs/engines.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import platform
import sys
import time

log = logging.getLogger(__name__)

# Debian/Ubuntu multiarch first (libopenblas0-pthread / -openmp), then RPM-style and generic names.
_CANDIDATE_GLOBS = (
    "/usr/lib/*-linux-gnu*/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu*/openblas-openmp/libopenblas.so.0",
    "/usr/lib/*-linux-gnu*/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
)
_SLOW_BLAS_WARNING = (
    "No optimized BLAS found: MLX will use its bundled reference BLAS and LoRA training will be many times "
    "slower (docs/engines.md has the figures). Fix: `sudo apt-get install libopenblas0-pthread` "
    "(Debian/Ubuntu) or your distribution's OpenBLAS package, then start again.")

_state: dict = {"done": False, "path": None}


def _candidates() -> list[str]:
    paths: list[str] = []
    for pattern in _CANDIDATE_GLOBS:
        paths.extend(sorted(glob.glob(pattern)))
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    return paths


def openblas_coretype(cpuinfo: str) -> str | None:
    """The OpenBLAS core type for an x86-64 CPU's /proc/cpuinfo flags (None: leave it to OpenBLAS)."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _choose_coretype() -> None:
    if os.environ.get("OPENBLAS_CORETYPE") or platform.machine() not in ("x86_64", "AMD64"):
        return
    try:
        with open("/proc/cpuinfo") as f:
            core = openblas_coretype(f.read())
    except OSError:
        return
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core  # read once, when the library loads


def ensure_fast_blas() -> str | None:
    """Load an optimized cblas library globally (Linux only); return its path, or None.

    Call before the first `import mlx.core`. Idempotent: later calls return the first answer and log nothing.
    """
    if _state["done"]:
        return _state["path"]
    _state["done"] = True
    if not sys.platform.startswith("linux"):
        return None
    if "mlx.core" in sys.modules:
        # Python loads extensions with RTLD_NOW: MLX's cblas_* calls are already bound to its bundled
        # reference BLAS, and loading OpenBLAS now changes nothing.
        log.warning("mlx.core was imported before semievol_local set up OpenBLAS: MLX training will be many "
                    "times slower. Import semievol_local.training before importing mlx.")
    _choose_coretype()
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if not hasattr(lib, "cblas_sgemm"):  # e.g. a build with prefixed symbols: useless to MLX
            continue
        _state["path"] = path
        log.debug("loaded %s for MLX's CPU matmuls", path)
        return path
    log.warning(_SLOW_BLAS_WARNING)
    return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # <malloc.h> mallopt parameters


def _mallopt(*pairs: tuple[int, int]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(bool(libc.mallopt(k, v)) for k, v in pairs)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return False


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap for reuse (process-wide, until `untune_malloc`: for training
    only). True if applied."""
    # no mmap for big blocks, and only give memory back when more than 1 GiB sits free at the top
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30))


def untune_malloc() -> bool:
    """glibc's defaults again (big blocks mmap'ed and unmapped when freed, the heap trimmed past 128 KiB),
    then the kept memory handed back: after training, the llama.cpp stages and the parity check's large
    temporaries must not pile up in a heap that never shrinks (measured: 0.9 GB held after a fpb warm-up)."""
    done = _mallopt((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 128 * 1024), (M_TRIM_THRESHOLD, 128 * 1024))
    return trim_malloc() and done


def trim_malloc() -> bool:
    """Return the free memory of glibc's heap to the system (after training); True if glibc did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def gemm_gflops(m: int = 512, k: int = 2048, n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 GEMM speed of MLX on the default device, (m,k) @ (k,n), best of `repeats`."""
    ensure_fast_blas()
    import mlx.core as mx

    a = mx.random.normal((m, k), dtype=mx.float32)
    b = mx.random.normal((k, n), dtype=mx.float32)
    mx.eval(a, b, a @ b)  # warm-up: allocations and thread start-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9

"""blas: an optimized BLAS loaded before MLX, and OpenBLAS's core type chosen from the CPU's flags."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from semievol_local.training.blas import ensure_fast_blas

ensure_fast_blas()  # before the first `import mlx.core` (blas.py says why)

import mlx.core as mx  # noqa: E402


def test_ensure_fast_blas_loads_once(monkeypatch, caplog):
    """The first call loads the library (and it is then mapped into this process); later calls load nothing,
    log nothing and give the same answer."""
    import ctypes
    import logging
    import os
    import sys

    from semievol_local.training import blas

    loads = []
    real = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda path, *a, **k: loads.append(path) or real(path, *a, **k))
    monkeypatch.setattr(blas, "_state", {"done": False, "path": None})
    first = blas.ensure_fast_blas()
    if sys.platform.startswith("linux") and blas._candidates():
        assert first is not None and loads and loads[-1] == first
        assert os.path.realpath(first) in open("/proc/self/maps").read()
    caplog.set_level(logging.DEBUG, logger="semievol_local.training.blas")
    caplog.clear()  # the first call warned: mlx.core is imported in this test process
    before = len(loads)
    assert blas.ensure_fast_blas() == first and blas.ensure_fast_blas() == first
    assert len(loads) == before and not caplog.records


def test_mlx_matmuls_use_the_optimized_blas():
    """Regression: this file once imported mlx.core before semievol_local, which bound MLX to its reference
    BLAS for the whole session (7 instead of ~200 GFLOPS) and made the slow test take 5x longer."""
    import sys

    from semievol_local.training.blas import gemm_gflops

    if not sys.platform.startswith("linux") or ensure_fast_blas() is None:
        pytest.skip("no optimized BLAS on this machine")
    assert gemm_gflops(256, 1024, 1024, repeats=3) > 30  # reference BLAS: ~7; OpenBLAS, 2 busy cores: 50+


def test_openblas_core_type_is_chosen_from_the_cpu_flags_and_results_stay_exact():
    """Regression: Debian's OpenBLAS 0.3.21 ran generic SSE3 kernels on a Sapphire Rapids Xeon (32-48 instead
    of 212 GFLOPS); the core type now comes from the CPU's flags, and the products must still be right."""
    from semievol_local.training.blas import openblas_coretype

    avx512 = "flags\t\t: fpu sse2 avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl\n"
    assert openblas_coretype(avx512) == "SkylakeX"
    assert openblas_coretype("flags : sse2 avx avx2 fma\n") == "Haswell"
    assert openblas_coretype("flags : sse2 sse4_2\n") is None  # older CPUs: OpenBLAS decides
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 500)).astype(np.float32), rng.normal(size=(500, 200)).astype(np.float32)
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("module", ["mlx_fast", "quantized", "lora", "mlx_engine"])
def test_any_training_module_loads_blas_before_mlx(module):
    """Importing any module of the training package (as the first thing a process does) loads the fast BLAS
    before MLX: the package's import does it once, and no module needs its own call."""
    import subprocess

    code = (f"import logging; logging.basicConfig(level=logging.WARNING)\n"
            f"import semievol_local.training.{module}\n"
            "import sys; from semievol_local.training import blas\n"
            "assert 'mlx.core' in sys.modules and blas._state['done']\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "imported before" not in res.stderr

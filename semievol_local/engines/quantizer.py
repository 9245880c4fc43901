"""llama.cpp's own quantizer, the one way this package writes a GGUF in another type: the float32 copy
(`weights`), a merged model (`method.merge`) and the files benchmarks and tests make as users' are made."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

from ..core.errors import UserError


def quantize(src: Path, dst: Path, ftype: int | str, *, types: dict[str, int] | None = None,
             n_threads: int | None = None, hint: str = "") -> None:
    """`src` -> `dst` in `ftype` (a llama.cpp file type: its number, or a name such as "Q4_K_M", "Q8_0" or
    "ALL_F32"), each tensor named in `types` in exactly that ggml type. A failure is one line naming the file,
    followed by `hint` (what to do)."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    if isinstance(ftype, str):
        name = ftype if ftype.startswith("ALL_") else f"MOSTLY_{ftype}"
        if not hasattr(llama_cpp, f"LLAMA_FTYPE_{name}"):
            raise UserError(f"{ftype}: not a file type llama.cpp's quantizer writes (Q4_K_M, Q5_K_M, Q8_0, ...)")
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{name}")
    else:
        params.ftype = ftype
    params.allow_requantize = True
    params.nthread = n_threads or 0  # 0: llama.cpp takes the machine's hardware threads
    keep = None  # the overrides must outlive the call
    if types:
        Override = llama_cpp.llama_model_tensor_override
        keep = (Override * (len(types) + 1))()  # ends with a null pattern
        for i, (tensor, kind) in enumerate(sorted(types.items())):
            keep[i].pattern = ("^" + re.escape(tensor) + "$").encode()
            keep[i].type = kind
        params.tt_overrides = ctypes.cast(keep, ctypes.POINTER(Override))
    with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor from C
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise UserError(f"{src}: llama.cpp's quantizer failed (code {rc}) writing {Path(dst).name} as {ftype}{hint}")

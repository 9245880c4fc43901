"""A LoRA adapter merged into its base GGUF: one self-contained file, in the base's own quantization, for the
front ends that load no adapter (Ollama 0.34.1 and later refuse `ADAPTER`; LM Studio and others have no
adapter support).

1. `merge_tensors`: every adapted tensor becomes float32 W + (alpha / rank) B A, W dequantized from the base file
   one tensor at a time by gguf-py (bit for bit the weights MLX trained on, `training.quantized`; no float32 copy
   of the model on disk or in memory), as llama.cpp applies the adapter at scale 1; every other tensor keeps the
   base file's bytes, every metadata key is copied byte for byte (`core.gguf_file`), and
   three keys say where the file came from (`semievol.merged`, `semievol.base`, `semievol.adapter_sha256`).
2. `quantize`: llama.cpp's own quantizer writes the adapted tensors in the base's type where that holds 8 bits
   or more, else in Q8_0 (`ADAPTED_FLOOR`), and copies the others as they are (each tensor's type pinned to
   the base's); `--outtype base` puts the adapted tensors back in the base's types too, another `--outtype`
   writes the whole file in that type. A float32 result is every tensor dequantized (one at a time), the adapted
   ones merged.
3. `agreement`: llama.cpp's logits of the merged file against the base file with the adapter (the same kernels),
   on the run's own prompts (mean KL, top-1), within the parity gate's bounds or refused.

Why this rather than llama.cpp's `export-lora` tool, measured on gemma-3-270m Q4_K_M with an 8-block fpb adapter
(2 cores): `export-lora` merges in 1.0 s but needs a second build of llama.cpp's tools (3.5 min and a compiler) and
writes the adapted tensors in F16 (312 MB, mean KL 0.0062 against base + adapter); requantized to these types by
the same quantizer, 270 MB and KL 0.0074. This merge and quantization take 1.4 s with what is installed and give
the same 270 MB file at KL 0.0074 (those figures against the base's float32 copy + adapter; the check now compares
with the base file + adapter, computed by the same kernels as the merged file, so no float32 copy is made).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..core.adapter_gguf import KEY_LORA_ALPHA, SUFFIX_A, SUFFIX_B, read_lora_gguf
from ..core.errors import UserError
from ..core.files import sha256_file
from ..engines.quantizer import quantize

log = logging.getLogger(__name__)

KEYS = ("semievol.merged", "semievol.base", "semievol.adapter_sha256")
KL_PROMPTS = 32  # prompts whose every position's logits are compared
# Measured on the demo run (SmolLM2-135M Q4_1, LoRA on 16 blocks): W + BA requantized to Q4_1 missed base + adapter
# by mean KL 1.48 (top-1 0.62), far beyond the parity gate; Q8_0 everywhere by 0.016. So a merged tensor whose
# base type holds fewer than 8 bits is written in Q8_0; the tensors the adapter did not touch keep their bytes.
ADAPTED_FLOOR = "q8_0"
FINE_TYPES = ("F32", "F16", "BF16", "Q8_0")  # ggml types a merged tensor may stay in


def outtypes() -> dict[str, int]:
    """--outtype names (f32, f16, bf16, q8_0, q4_k_m, ...) -> llama.cpp's file types, from the installed llama.cpp."""
    import llama_cpp

    table = {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_MOSTLY_"):
            table[name[len("LLAMA_FTYPE_MOSTLY_"):].lower()] = getattr(llama_cpp, name)
    return table


def check_outtype(name: str | None) -> int | None:
    """The file type of `--outtype` (None for the default and for `base`), or a `UserError` listing the ones
    llama.cpp knows."""
    if name is None or name.lower() == "base":
        return None
    table = outtypes()
    if name.lower() not in table:
        raise UserError(f"--outtype {name}: llama.cpp does not know this type; give base or one of "
                        f"{', '.join(sorted(table))}, or leave it out (the base's types, adapted tensors at least "
                        "Q8_0)")
    return table[name.lower()]


def tensor_types(path: Path) -> dict[str, int]:
    """{tensor name: ggml type} of a GGUF file."""
    from ..core.gguf_file import read

    return {t.name: int(t.tensor_type) for t in read(Path(path)).tensors}


def file_type(path: Path) -> int | None:
    from ..core.gguf_file import read

    v = read(Path(path)).fields.get("general.file_type")
    return None if v is None else int(v)


def merge_tensors(base: Path, adapter: Path, dst: Path, *, base_name: str, whole: bool = False) -> list[str]:
    """Write `dst`: `base`'s metadata and tensors, each byte as it is, except that every tensor `adapter` adapts
    becomes float32 W + (alpha / rank) B A, W dequantized from `base` by gguf-py (the weights MLX trained on),
    one tensor at a time; `whole`: every tensor in float32. Returns the tensors changed."""
    import gguf

    from ..core.gguf_file import read, write_like
    from ..training.gguf_loader import dequantized

    meta, lora = read_lora_gguf(adapter)
    alpha = float(meta.get(KEY_LORA_ALPHA) or 0.0)
    src = read(base)
    f32 = gguf.GGMLQuantizationType.F32
    tensors, merged = [], []

    def widened(t):  # float32 from the file's bytes, whose pages then leave this process's memory
        w = dequantized(t)
        src.forget(t)
        return w

    for t in src.tensors:
        if t.name + SUFFIX_A not in lora:
            if whole and t.tensor_type != f32:
                tensors.append((t.name, t.shape, f32, lambda t=t: widened(t)))
            else:
                tensors.append((t.name, t.shape, t.tensor_type, t.data))
            continue
        a, b = lora[t.name + SUFFIX_A].astype(np.float32), lora[t.name + SUFFIX_B].astype(np.float32)
        scale = alpha / a.shape[0] if alpha else 1.0  # llama.cpp: adapter scale x alpha / rank
        tensors.append((t.name, t.shape, f32,  # computed when written: one at a time
                        lambda t=t, a=a, b=b, s=np.float32(scale): widened(t) + s * (b @ a)))
        merged.append(t.name)
    if len(merged) != sum(name.endswith(SUFFIX_A) for name in lora):
        raise UserError(f"{adapter}: some of its tensors have no base tensor in {base_name}; is it this model's "
                        "adapter?")
    write_like(dst, src, tensors, drop=KEYS,
               add={KEYS[0]: True, KEYS[1]: base_name, KEYS[2]: sha256_file(adapter)})
    return merged


def vocab_size(path: Path) -> int:
    from ..core.gguf_file import Array, read

    tokens = read(Path(path)).fields["tokenizer.ggml.tokens"]
    return tokens.length if isinstance(tokens, Array) else len(tokens)


def agreement(reference: tuple[Path, Path], merged: Path, sequences: list[list[int]], n_threads: int) -> dict:
    """Mean KL and top-1 agreement of `merged`'s logits against `reference` (model, adapter) at every position of
    `sequences`, both in llama.cpp."""
    from ..training.parity import compare_llama

    return compare_llama(reference, (merged, None), sequences, vocab=vocab_size(merged), n_threads=n_threads)


def merge_model(model_path: Path, adapter: Path, out_file: Path, sequences: list[list[int]], *,
                outtype: str | None = None, n_threads: int | None = None, say=lambda msg: None) -> dict:
    """`out_file`: `model_path` with `adapter` merged in, in the base's types with the adapted tensors at least
    Q8_0 (or every tensor in the base's type: `outtype` "base"; or all in `outtype`), checked against base +
    adapter on `sequences`; beyond the parity gate's bounds a `UserError`, and no `out_file`."""
    import time

    import gguf

    from ..core.files import atomic_target
    from ..engines.weights import default_threads
    from .finetune import MAX_KL, MIN_TOP1

    n_threads = n_threads or default_threads()
    want = check_outtype(outtype)
    t0 = time.perf_counter()
    base_types = tensor_types(model_path)
    if want is None and set(base_types.values()) <= {int(gguf.GGMLQuantizationType.F32)}:  # float32 stays float32
        want = outtypes()["f32"]
    tmp_merged = out_file.with_name(f".{out_file.name}.merged-{os.getpid()}")
    try:
        with atomic_target(out_file) as tmp_out:
            say("merging the adapter into the float32 weights")
            # a float32 result: every tensor dequantized one at a time; else the untouched ones keep the base's bytes
            whole = want == outtypes()["f32"]
            changed = merge_tensors(model_path, adapter, tmp_merged, base_name=Path(model_path).name, whole=whole)
            pinned = dict(base_types)
            if outtype is None:  # an adapted tensor in a type under 8 bits goes to Q8_0
                floor = int(gguf.GGMLQuantizationType[ADAPTED_FLOOR.upper()])
                pinned.update({n: floor for n in changed
                               if gguf.GGMLQuantizationType(base_types[n]).name not in FINE_TYPES})
            if whole:
                os.replace(tmp_merged, tmp_out)
            else:
                say(f"quantizing with llama.cpp's quantizer ({outtype or 'the base file types, adapted tensors at least Q8_0'})")
                # each tensor pinned; the file type (its label) where the base names none: Q8_0
                quantize(tmp_merged, tmp_out,
                         want if want is not None else (file_type(model_path) or outtypes()["q8_0"]),
                         types=None if want is not None else pinned, n_threads=n_threads)
            seconds = time.perf_counter() - t0
            say(f"checking the merged file against base + adapter on {len(sequences)} prompts")
            got = agreement((Path(model_path), adapter), tmp_out, sequences, n_threads)
            if not (got["kl_mean"] <= MAX_KL and got["top1_agreement"] >= MIN_TOP1):
                raise UserError(f"the merged file differs from base + adapter beyond the parity gate's bounds (mean KL "
                                f"{got['kl_mean']:.3g}, limit {MAX_KL}; top-1 {got['top1_agreement']:.3f}, limit "
                                f"{MIN_TOP1}); nothing was written: try --outtype q8_0 or f16")
            types = tensor_types(tmp_out)
            same = sum(types.get(n) == t for n, t in base_types.items())
            raised = sum(types.get(n) != base_types[n] for n in changed)
    finally:
        tmp_merged.unlink(missing_ok=True)
    return {"merge_seconds": round(seconds, 1), "bytes": out_file.stat().st_size, "tensors_merged": len(changed),
            "outtype": outtype or "the base's, adapted tensors at least Q8_0",
            "tensor_types_as_base": f"{same} of {len(base_types)}", "adapted_tensors_retyped": raised,
            "kl_mean": got["kl_mean"], "top1_agreement": got["top1_agreement"], "positions": got["n_positions"],
            "adapter_sha256": sha256_file(adapter)}

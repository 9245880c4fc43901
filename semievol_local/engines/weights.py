"""Which weights llama.cpp computes with: the GGUF file itself (its own quantized kernels) or a float32
copy of it (the exact weights MLX trains on), chosen by measuring both once per file, machine and thread
count (`--weights auto`), and the float32 copies cached beside those measurements."""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from llama_cpp._utils import suppress_stdout_stderr

from ..core.config import EngineConfig
from ..core.errors import UserError
from ..core.files import atomic_target, cache_dir
from ..core.runfolder import ram_bytes
from .quantizer import quantize

log = logging.getLogger(__name__)


def default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))

# Which weights evaluate prompts faster depends on the quantization type, the model's size and the CPU: on 2 Xeon
# cores SmolLM2's Q4_1 file ran at ~200 tok/s and its float32 copy at 616-714, while a 1B model's Q4_K_M file
# (int8 VNNI kernels) ran at 129-135 and its float32 copy at 83-85. So `auto` measures both, once per file,
# machine and thread count, and keeps the answer in the weights cache.

FILE_MARGIN = 1.1  # the file must be this much faster: the float32 copy holds exactly the weights MLX trains on
PROBE_DECODES = ((0, 128), (256, 16))  # (cached, new) tokens timed: a prompt, and a short suffix after a prefix
MEASURED = "measured.json"  # in weights_dir(): prompt rates by file digest, machine and threads


@dataclass(frozen=True)
class Weights:
    path: Path  # the file llama.cpp loads
    kind: str  # "file" (the GGUF as given) or "f32" (a cached float32 copy of it)
    why: str  # in a phrase, for `models info` and the log
    f32_bytes: int = 0  # the size of the float32 copy (where the plan read the file's tensors)
    rates: tuple = ()  # ((kind, prompt tokens/s), ...) where `auto` measured them on this machine


def weights_dir() -> Path:
    """Where float32 copies are cached: $SEMIEVOL_WEIGHTS, else ~/.cache/semievol/weights."""
    if os.environ.get("SEMIEVOL_WEIGHTS"):
        return Path(os.environ["SEMIEVOL_WEIGHTS"])
    return cache_dir("weights")


def choose(rates: dict[str, float]) -> str:
    """The weights to compute with from measured prompt rates ({"file": tok/s, "f32": tok/s}): the file only
    where it is clearly faster (FILE_MARGIN), since a close call goes to the weights MLX trains on."""
    return "file" if rates["file"] > FILE_MARGIN * rates["f32"] else "f32"


def plan_weights(model_path: Path, cfg: EngineConfig, *, measure: bool = True) -> Weights:
    """The file llama.cpp should compute with for `cfg.weights`. For `auto` on a CPU with a quantized file
    whose float32 copy fits, the faster of the two as measured on this machine (`measure_weights`, once: the
    answer is cached); with `measure=False` an unmeasured file gets kind "unmeasured" and nothing is written."""
    import llama_cpp

    from ..core import gguf_file

    model_path = Path(model_path)
    if cfg.weights == "file":
        return Weights(model_path, "file", "--weights file")
    tensors = gguf_file.read(model_path).tensors
    types = {t.tensor_type.name for t in tensors}
    f32_bytes = 4 * sum(int(t.n_elements) for t in tensors)
    if types <= {"F32"}:
        return Weights(model_path, "file", "the file is float32")
    copy = f32_path(model_path)
    if cfg.weights == "f32":
        return Weights(copy, "f32", f"float32 copy of {model_path.name} ({f32_bytes / 1e9:.2f} GB), --weights f32",
                       f32_bytes)
    if types <= {"F32", "F16", "BF16"}:
        return Weights(model_path, "file", "the file is not quantized")
    if cfg.n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload():
        return Weights(model_path, "file", "a GPU computes with the quantized weights")
    ram = ram_bytes()
    if ram and f32_bytes > ram / 4:
        return Weights(model_path, "file", f"a float32 copy ({f32_bytes / 1e9:.1f} GB) would take more than "
                                           f"a quarter of the RAM ({ram / 1e9:.0f} GB)", f32_bytes)
    rates = _measured().get(_measure_key(model_path, cfg))
    if rates is None and not measure:
        return Weights(model_path, "unmeasured", "not measured on this machine yet", f32_bytes)
    if rates is None:
        rates = measure_weights(model_path, cfg, f32_bytes)
    kind = choose(rates)
    shown = tuple(sorted(rates.items()))
    if not rates["f32"]:
        return Weights(model_path, "file", "no float32 copy could be made", f32_bytes, shown)
    if kind == "file":
        return Weights(model_path, "file", f"measured faster here: {rates['file']:.0f} vs {rates['f32']:.0f} prompt "
                                          "tok/s for its float32 copy", f32_bytes, shown)
    return Weights(copy, "f32", f"float32 copy of {model_path.name} ({f32_bytes / 1e9:.2f} GB), the weights MLX "
                                f"trains on; measured {rates['f32']:.0f} vs {rates['file']:.0f} prompt tok/s for "
                                "the file", f32_bytes, shown)


def f32_path(model_path: Path) -> Path:
    """Where the float32 copy of a GGUF is cached (named by the file's digest)."""
    from ..core.runfolder import file_digest

    return weights_dir() / f"{Path(model_path).stem}-{file_digest(model_path)[:16]}-f32.gguf"


def measure_weights(model_path: Path, cfg: EngineConfig, f32_bytes: int) -> dict[str, float]:
    """Time llama.cpp's prompt evaluation (PROBE_DECODES) with the file's own kernels and with its float32
    copy (made here), record both rates in the weights cache, and remove the copy where the file wins. Where
    no copy can be made, the file alone: {"file": rate, "f32": 0}."""
    n_threads = cfg.n_threads or default_threads()
    copy = f32_path(model_path)
    log.info("measuring which weights llama.cpp computes %s faster with on this machine (once)", Path(model_path).name)
    try:
        if not copy.is_file():
            _write_f32(Path(model_path), copy, f32_bytes + (64 << 20), n_threads)
    except UserError as e:
        log.warning("computing with %s as given: no float32 copy could be made (%s)", model_path, e)
        (rate,) = _prompt_rates([Path(model_path)], n_threads)
        return {"file": rate, "f32": 0.0}  # not recorded: a later run with space or a writable cache measures again
    rates = dict(zip(("file", "f32"), _prompt_rates([Path(model_path), copy], n_threads)))
    log.info("prompt tokens/s: %.0f with the file, %.0f with its float32 copy", rates["file"], rates["f32"])
    if choose(rates) == "file":
        copy.unlink(missing_ok=True)  # disk and page cache back (4.3 GB for a 1B model)
    _record(_measure_key(model_path, cfg), rates)
    return rates


def _prompt_rates(paths: list[Path], n_threads: int, repeats: int = 3) -> list[float]:
    """Prompt tokens/s of each GGUF on the CPU: the decodes of PROBE_DECODES (random tokens) timed together,
    best of `repeats` after a warm-up. The files take turns, repeat by repeat: a busy moment on a shared
    machine slows them alike instead of deciding between them (on 2 shared cores, timing one file after the
    other put a 1B Q4_K_M file at 46-81 tok/s against 53-60 for its float32 copy)."""
    import llama_cpp

    llms = []
    try:
        for path in paths:
            with suppress_stdout_stderr(disable=False):
                llms.append(llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=n_threads,
                                            n_threads_batch=n_threads, n_gpu_layers=0, verbose=False))
        rng = np.random.default_rng(0)
        n_vocab = llms[0].n_vocab()
        work = [(rng.integers(0, n_vocab, size=c).tolist(), rng.integers(0, n_vocab, size=n).tolist())
                for c, n in PROBE_DECODES]
        best = [float("inf")] * len(llms)
        for _ in range(repeats + 1):
            for i, llm in enumerate(llms):
                took = 0.0
                for cached, new in work:
                    llm.reset()
                    if cached:
                        llm.eval(cached)
                    tic = time.perf_counter()
                    llm.eval(new)
                    took += time.perf_counter() - tic
                best[i] = min(best[i], took)
        return [sum(n for _, n in PROBE_DECODES) / b for b in best]
    finally:
        for llm in llms:
            llm.close()


def _machine_id() -> str:
    """What the measured rates depend on besides the file: the CPU and llama.cpp's build (its kernels)."""
    import hashlib
    import platform

    import llama_cpp

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return hashlib.sha256(f"{cpu}|{platform.machine()}|{llama_cpp.__version__}|".encode()
                          + llama_cpp.llama_print_system_info()).hexdigest()[:12]


def _measure_key(model_path: Path, cfg: EngineConfig) -> str:
    from ..core.runfolder import file_digest

    return f"{file_digest(model_path)[:16]}|{_machine_id()}|{cfg.n_threads or default_threads()}"


def _measured() -> dict:
    import json

    try:
        return json.loads((weights_dir() / MEASURED).read_text())
    except (OSError, ValueError):
        return {}


def _record(key: str, rates: dict[str, float]) -> None:
    from ..core.files import atomic_write_json

    try:
        atomic_write_json(weights_dir() / MEASURED, {**_measured(), key: rates})
    except OSError as e:
        log.warning("%s: the measured rates could not be kept (%s); the next run measures again", weights_dir(), e)


def inference_weights(model_path: Path, cfg: EngineConfig) -> Weights:
    """`plan_weights`, with the float32 copy made (once, cached) where the plan wants one."""
    w = plan_weights(model_path, cfg)
    if w.kind == "f32" and not w.path.is_file():
        try:
            _write_f32(Path(model_path), w.path, w.f32_bytes + (64 << 20), cfg.n_threads or default_threads())
        except UserError:
            if cfg.weights == "f32":
                raise
            log.warning("computing with %s as given: no float32 copy could be made", model_path)
            return Weights(Path(model_path), "file", "no float32 copy could be made")
    return w


def _write_f32(src: Path, dst: Path, need: int, n_threads: int) -> None:
    """Dequantize a GGUF to float32 with llama.cpp's own quantizer (`need` bytes of disk); the copy appears
    whole or not at all."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dst.parent).free
    except OSError as e:
        raise UserError(f"{dst.parent}: cannot hold the float32 copy of {src.name} ({e.strerror or e}); set "
                        "SEMIEVOL_WEIGHTS to a writable folder, or use --weights file") from None
    if free < need:
        raise UserError(f"{dst.parent}: {free / 1e9:.1f} GB free, the float32 copy of {src.name} needs "
                        f"{need / 1e9:.1f} GB; free space, set SEMIEVOL_WEIGHTS to another folder, or use --weights file")
    log.info("writing a float32 copy of %s to %s (once)", src, dst)
    try:
        with atomic_target(dst) as tmp:
            quantize(src, tmp, "ALL_F32", n_threads=n_threads, hint="; use --weights file")
    except OSError as e:
        raise UserError(f"{dst}: the float32 copy could not be written ({e.strerror or e}); use --weights file") from None

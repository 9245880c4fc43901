"""llama.cpp engine: one loaded GGUF per process, scoring, sampling, embedding, full logits.

Operations take token ids and return NumPy arrays; building prompts is `prompts`' job. LoRA adapters
(GGUF) are switched on the live context, so the base model and a warm adapter share one set of weights.
The engine remembers which tokens sit in its KV cache and only evaluates what is new, so n samples or
n option scores of one prompt pay for the prompt once.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_cpp._utils import suppress_stdout_stderr

from .config import EngineConfig
from .errors import UserError
from .prompts import ANSWER_PREFIX, ChatTemplate
from .runfolder import ram_bytes

log = logging.getLogger(__name__)


def default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@dataclass
class Score:
    """An option distribution from one forward pass."""

    probs: np.ndarray  # (n_options,) renormalized over the option letters
    entropy: float  # nats, of `probs`
    mass: float  # probability the model put on the option letters before renormalizing

    @classmethod
    def from_letter_probs(cls, p: np.ndarray) -> "Score":
        """The score of the next-token probabilities `p` of the option letters (renormalized; uniform if 0)."""
        mass = float(p.sum())
        probs = p / mass if mass > 0 else np.full(len(p), 1.0 / len(p))
        return cls(probs=probs, entropy=entropy(probs), mass=mass)


@dataclass
class Sample:
    text: str
    tokens: list[int]
    logprobs: np.ndarray  # (n_tokens,) log P(token) under the model (temperature 1)

    @property
    def mean_nll(self) -> float:
        """The paper's 'entropy' of a response (Eq. 6): mean negative log-likelihood of its tokens."""
        return float(-self.logprobs.mean()) if len(self.logprobs) else float("inf")


# --- which weights llama.cpp computes with -------------------------------------------------------------
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
    root = os.environ.get("XDG_CACHE_HOME")
    return (Path(root) if root else Path.home() / ".cache") / "semievol" / "weights"


def choose(rates: dict[str, float]) -> str:
    """The weights to compute with from measured prompt rates ({"file": tok/s, "f32": tok/s}): the file only
    where it is clearly faster (FILE_MARGIN), since a close call goes to the weights MLX trains on."""
    return "file" if rates["file"] > FILE_MARGIN * rates["f32"] else "f32"


def plan_weights(model_path: Path, cfg: EngineConfig, *, measure: bool = True) -> Weights:
    """The file llama.cpp should compute with for `cfg.weights`. For `auto` on a CPU with a quantized file
    whose float32 copy fits, the faster of the two as measured on this machine (`measure_weights`, once: the
    answer is cached); with `measure=False` an unmeasured file gets kind "unmeasured" and nothing is written."""
    import llama_cpp

    from .models import read_gguf

    model_path = Path(model_path)
    if cfg.weights == "file":
        return Weights(model_path, "file", "--weights file")
    tensors = read_gguf(model_path).tensors
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
    from .runfolder import file_digest

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
    from .runfolder import file_digest

    return f"{file_digest(model_path)[:16]}|{_machine_id()}|{cfg.n_threads or default_threads()}"


def _measured() -> dict:
    import json

    try:
        return json.loads((weights_dir() / MEASURED).read_text())
    except (OSError, ValueError):
        return {}


def _record(key: str, rates: dict[str, float]) -> None:
    from .files import atomic_write_json

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
    import llama_cpp

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
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = n_threads
    try:
        with suppress_stdout_stderr(disable=False):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise UserError(f"{src}: llama.cpp could not write a float32 copy (code {rc}); use --weights file")
        os.replace(tmp, dst)
    except OSError as e:
        raise UserError(f"{dst}: the float32 copy could not be written ({e.strerror or e}); use --weights file") from None
    finally:
        tmp.unlink(missing_ok=True)


def decode_shape(past: int, n: int) -> tuple[int, int]:
    """A decode's shape, binned: (cached tokens before it, to 128; tokens in it: exact up to 8, to 8 up to 64,
    then to 32). llama.cpp's tokens/s depends on both (attention over the cache, matrix sizes)."""
    size = n if n <= 8 else 8 * round(n / 8) if n <= 64 else 32 * round(n / 32)
    return 128 * round(past / 128), size


class Engine:
    """A GGUF model loaded in llama.cpp."""

    def __init__(self, model_path: Path, cfg: EngineConfig | None = None, *, vocab_only: bool = False):
        """`vocab_only`: the tokenizer and metadata without the weights (tokenize, templates, embed; no
        forward passes), for a process whose forward passes run elsewhere (`server_engine`)."""
        import llama_cpp

        self._lc = llama_cpp
        self.cfg = cfg = cfg or EngineConfig()
        self.model_path = Path(model_path)
        self.n_threads = cfg.n_threads or default_threads()
        # the source file's vocabulary and metadata; for forward passes, the weights the plan chose
        self.weights = (plan_weights(self.model_path, cfg, measure=False) if vocab_only
                        else inference_weights(self.model_path, cfg))
        self.llm = self._open(vocab_only)
        self.released = False  # weights freed by `release` until the next forward pass
        self.n_ctx = self.llm.n_ctx()
        self.vocab_only = vocab_only
        self.n_vocab = self.llm.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        meta = self.llm.metadata
        self.architecture = meta.get("general.architecture", "unknown")
        self.template = ChatTemplate(
            source=meta.get("tokenizer.chat_template"),
            bos_token=self._token_text(self.llm.token_bos()),
            eos_token=self._token_text(self.llm.token_eos()))
        self.eos_token = self.llm.token_eos()  # the id that ends an answer (-1: none)
        # whether the tokenizer puts BOS before a text (SmolLM2's does not: its BOS is <|im_start|>, in the template)
        self.adds_bos = bool(self.llm._model.add_bos_token()) if hasattr(self.llm._model, "add_bos_token") else True
        self._kv: list[int] = []  # tokens whose keys/values sit in the cache, in order
        self.decodes = 0  # llama_decode calls (their mean size sets the prefill rate: `bench run`)
        # tokens llama.cpp evaluated (prompts after prefix reuse, samples, embeddings) by adapter file ("": none)
        # and decode shape (cached tokens before the decode, tokens in it; binned by `decode_shape`): the
        # decode's shape sets llama.cpp's rate, so `bench run`'s yardstick takes each shape
        self.decode_shapes: dict[str, dict[tuple[int, int], int]] = {}
        self._adapters: dict[str, object] = {}
        self.adapter: tuple[str, float] | None = None
        self._embedder = None
        self._letters: dict[int, list[int]] = {}

    @property
    def remote(self) -> bool:
        return self.vocab_only

    def counts(self) -> tuple[int, dict]:
        """(llama_decode calls, tokens by adapter and decode shape) so far in this process (a copy)."""
        return self.decodes, {a: dict(d) for a, d in self.decode_shapes.items()}

    @property
    def tokens_by_adapter(self) -> dict[str, int]:
        return {a: sum(d.values()) for a, d in self.decode_shapes.items()}

    @property
    def tokens_computed(self) -> int:
        return sum(self.tokens_by_adapter.values())

    def _count(self, n: int, adapter: str = "", past: int = 0) -> None:
        shapes = self.decode_shapes.setdefault(adapter, {})
        key = decode_shape(past, n)
        shapes[key] = shapes.get(key, 0) + n

    def _open(self, vocab_only: bool):
        cfg = self.cfg
        try:
            with suppress_stdout_stderr(disable=False):  # llama.cpp logs from C even with verbose=False
                return self._lc.Llama(
                    model_path=str(self.model_path if vocab_only else self.weights.path),
                    n_ctx=64 if vocab_only else cfg.n_ctx, n_batch=512,
                    n_threads=self.n_threads, n_threads_batch=self.n_threads, n_gpu_layers=cfg.n_gpu_layers,
                    logits_all=False, vocab_only=vocab_only, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"{self.model_path}: llama.cpp cannot load this model ({e}); its architecture or "
                            "quantization is not supported by this llama.cpp build") from None

    def release(self) -> None:
        """Free the weights, contexts and adapters while something else needs the memory (MLX training);
        the vocabulary stays, and the next forward pass loads the rest again (from the page cache)."""
        if self.vocab_only or self.released:
            return
        self._close_weights()
        self.llm = self._open(vocab_only=True)
        self._vocab = self._lc.llama_model_get_vocab(self.llm._model.model)
        self.released = True

    def _ready(self) -> None:
        if self.released:
            self.llm.close()
            self.llm = self._open(vocab_only=False)
            self._vocab = self._lc.llama_model_get_vocab(self.llm._model.model)
            self._kv, self.released = [], False

    # --- tokens ---------------------------------------------------------------------------------
    def _token_text(self, tok: int) -> str:
        if tok < 0:
            return ""
        return self.llm.detokenize([tok], special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered prompt; chat markers parse as special tokens; BOS added if the model wants one."""
        bos = self.template.bos_token
        add_bos = self.adds_bos and not (bos and text.startswith(bos))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def raw_tokens(self, text: str, special: bool) -> list[int]:
        """Token ids of a bare text: no BOS; chat markers parse as special tokens only where `special`."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def token_bytes(self, tok: int) -> bytes:
        """A token's bytes, special tokens spelled out (a token may end inside a UTF-8 character)."""
        return self.llm.detokenize([tok], special=True)

    def is_eog(self, tok: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, tok))

    def letter_tokens(self, n_options: int) -> list[int]:
        """Token ids of ' A', ' B', ... as they follow `Answer:`; each must be a single token."""
        if n_options not in self._letters:
            base = self.llm.tokenize(ANSWER_PREFIX.encode(), add_bos=False, special=False)
            ids = []
            for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_options]:
                full = self.llm.tokenize(f"{ANSWER_PREFIX} {letter}".encode(), add_bos=False, special=False)
                if full[: len(base)] != base or len(full) != len(base) + 1:
                    raise UserError(f"{self.model_path}: option letter '{letter}' is not one token after "
                                    f"'{ANSWER_PREFIX}' in this model's vocabulary; use --mode sample")
                ids.append(full[-1])
            self._letters[n_options] = ids
        return self._letters[n_options]

    # --- adapters -------------------------------------------------------------------------------
    def set_adapter(self, path: Path | None, scale: float | None = None) -> None:
        """Apply a GGUF LoRA adapter (or none) to the live context; switching clears the KV cache."""
        scale = self.cfg.adapter_scale if scale is None else scale
        # the file's size and mtime are part of its identity: a stage rebuilt in place is a new adapter
        want = (str(Path(path).resolve()), float(scale), _stat_key(Path(path))) if path else None
        self._ready()
        if want == self.adapter:
            return
        lc = self._lc
        if path is None:
            lc.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            key = want[0] + "@" + want[2]
            if key not in self._adapters:
                check_adapter(Path(path), self.architecture)
                ad = lc.llama_adapter_lora_init(self.llm._model.model, want[0].encode())
                if ad is None:
                    raise UserError(f"{path}: llama.cpp cannot load this LoRA adapter; it must be a GGUF adapter "
                                    f"made for this model ({self.architecture})")
                self._adapters[key] = ad
            adapters = (lc.llama_adapter_lora_p_ctypes * 1)(self._adapters[key])
            scales = (ctypes.c_float * 1)(scale)
            if lc.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, scales):
                raise UserError(f"{path}: llama.cpp could not apply this adapter to {self.model_path}")
        self.adapter = want
        self.reset()

    # --- forward passes -------------------------------------------------------------------------
    def _check_fits(self, n: int) -> None:
        if n >= self.n_ctx:
            raise UserError(f"a prompt of {n} tokens does not fit the context of {self.n_ctx} tokens; "
                            "raise --n-ctx or shorten the input")

    def _decode(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """Evaluate `tokens` after what is cached; return the last row of logits (V,) or all rows (T, V)."""
        self._ready()
        self._check_fits(len(self._kv) + len(tokens))
        ctx, batch, n_batch = self.llm._ctx, self.llm._batch, self.llm.n_batch
        rows = []
        for i in range(0, len(tokens), n_batch):
            chunk = tokens[i: i + n_batch]
            batch.set_batch(batch=chunk, n_past=len(self._kv), logits_all=all_logits)
            ctx.decode(batch)
            self.decodes += 1
            self._count(len(chunk), self.adapter[0] if self.adapter else "", past=len(self._kv))
            n_out = len(chunk) if all_logits else 1
            rows.append(np.ctypeslib.as_array(ctx.get_logits(), shape=(n_out, self.n_vocab)).copy())
            self._kv.extend(chunk)
        out = np.concatenate(rows)
        return out if all_logits else out[-1]

    def _prefill(self, tokens: list[int]) -> np.ndarray:
        """Bring the cache to exactly `tokens`, reusing the longest cached prefix; the last logits (V,)."""
        self._check_fits(len(tokens))
        self._ready()
        keep = 0
        limit = min(len(self._kv), len(tokens) - 1)  # at least one token must be evaluated for logits
        while keep < limit and self._kv[keep] == tokens[keep]:
            keep += 1
        self.llm._ctx.kv_cache_seq_rm(-1, keep, -1)
        del self._kv[keep:]
        return self._decode(tokens[keep:])

    def reset(self) -> None:
        """Empty the KV cache, so that what follows does not depend on what came before (bit for bit)."""
        self._ready()
        self.llm._ctx.kv_cache_clear()
        self._kv = []

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Full-vocabulary logits at every position (T, V), from a clean cache: for parity checks."""
        self.reset()
        return self._decode(list(tokens), all_logits=True)

    def prefill_rate(self, n_tokens: int, repeats: int = 3, seed: int = 0, past: int = 0) -> float:
        """Raw llama.cpp prompt evaluation, tokens/s: `n_tokens` random tokens decoded after `past` cached ones
        (decoded first, not timed) with the adapter now applied, best of `repeats` (`bench run`'s reference and
        the run plan's calibration; counts as no stage's work)."""
        rng = np.random.default_rng(seed)
        past = max(0, min(past, self.n_ctx - 2))
        before = rng.integers(0, self.n_vocab, size=past).tolist()
        toks = rng.integers(0, self.n_vocab, size=max(1, min(n_tokens, self.n_ctx - 1 - past))).tolist()
        counted = self.decodes, {a: dict(d) for a, d in self.decode_shapes.items()}
        best = float("inf")
        for _ in range(repeats):
            self.reset()
            if before:
                self._decode(before)
            tic = time.perf_counter()
            self._decode(toks)
            best = min(best, time.perf_counter() - tic)
        self.reset()
        self.decodes, self.decode_shapes = counted
        return len(toks) / best

    def score(self, prompt: list[int], n_options: int) -> Score:
        """The distribution over option letters after a prompt that ends in `Answer:`: one forward pass."""
        ids = self.letter_tokens(n_options)
        logp = log_softmax(self._prefill(prompt))  # (V,)
        return Score.from_letter_probs(np.exp(logp[ids]))

    def sample(self, prompt: list[int], seeds: list[int], *, temperature: float = 1.0,
               max_tokens: int = 256) -> list[Sample]:
        """One sample per seed, each from the same cached prompt; seeds must be explicit and non-zero."""
        self._check_fits(len(prompt) + 1)
        max_tokens = min(max_tokens, self.n_ctx - len(prompt) - 1)
        first = self._prefill(prompt)
        out = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            self.llm._ctx.kv_cache_seq_rm(-1, len(prompt), -1)
            del self._kv[len(prompt):]
            logits, toks, lps = first, [], []
            for _ in range(max_tokens):
                logp = log_softmax(logits)
                if temperature <= 0:
                    tok = int(np.argmax(logp))
                else:
                    z = logp / temperature
                    p = np.exp(z - z.max())
                    tok = int(np.searchsorted(np.cumsum(p), rng.random() * p.sum()))
                    tok = min(tok, self.n_vocab - 1)
                if self.is_eog(tok):
                    break
                toks.append(tok)
                lps.append(logp[tok])
                logits = self._decode([tok])
            out.append(Sample(text=self.detokenize(toks), tokens=toks, logprobs=np.array(lps, dtype=np.float64)))
        return out

    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled, L2-normalized hidden states (N, dim): retrieval vectors (mean pooling: on fpb its 3 nearest
        labeled neighbours voted 0.695 right, the last token's 0.64)."""
        if self._embedder is None:
            # A second context on the same mmap'ed weights, in embedding mode.
            n_ctx = self.n_ctx if not self.vocab_only else (self.cfg.n_ctx or 2048)  # as the in-process context
            with suppress_stdout_stderr(disable=False):
                self._embedder = self._lc.Llama(
                    model_path=str(inference_weights(self.model_path, self.cfg).path),  # the forward passes' weights
                    n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                    n_threads=self.n_threads, n_threads_batch=self.n_threads, n_gpu_layers=self.cfg.n_gpu_layers,
                    embedding=True, pooling_type=self._lc.LLAMA_POOLING_TYPE_MEAN, verbose=False)
        rows = []
        for t in texts:
            vec, n = self._embedder.embed(t, truncate=True, return_count=True)
            rows.append(vec)
            self._count(n)
        self.decodes += len(texts)
        vecs = np.asarray(rows, dtype=np.float32)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)

    def _close_weights(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        for ad in self._adapters.values():
            self._lc.llama_adapter_lora_free(ad)
        self._adapters.clear()
        self.adapter = None
        self.llm.close()

    def close(self) -> None:
        self._close_weights()


def _stat_key(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_adapter(path: Path, architecture: str) -> None:
    """Refuse, with one line, a file llama.cpp would reject or crash on: it must be a GGUF LoRA for this arch."""
    from .models import check_gguf

    if not path.is_file():
        raise UserError(f"{path}: adapter file not found")
    reader = check_gguf(path)

    def meta(key):
        return reader.fields.get(key)

    if meta("general.type") != "adapter" or meta("adapter.type") != "lora":
        raise UserError(f"{path}: not a LoRA adapter (general.type={meta('general.type')!r}); "
                        "give the adapter.gguf that `semievol train` writes, not a model")
    if meta("general.architecture") != architecture:
        raise UserError(f"{path}: adapter is for architecture {meta('general.architecture')!r}, "
                        f"the model is {architecture!r}")


_LOADED: dict[tuple, Engine] = {}


def load(model_path: Path, cfg: EngineConfig | None = None) -> Engine:
    """The process's engine for a model (loaded once, reused)."""
    cfg = cfg or EngineConfig()
    key = (str(Path(model_path).resolve()), cfg.n_ctx, cfg.n_threads, cfg.n_gpu_layers, cfg.weights)
    if key not in _LOADED:
        for other in list(_LOADED):  # one loaded model per process
            _LOADED.pop(other).close()
        _LOADED[key] = Engine(model_path, cfg)
    return _LOADED[key]


def unload() -> None:
    """Close the process's loaded model (the next `load` loads it again)."""
    for key in list(_LOADED):
        _LOADED.pop(key).close()

"""llama.cpp engine: one loaded GGUF per process, scoring, sampling, embedding, full logits.

Operations take token ids and return NumPy arrays; building prompts is `prompts`' job. LoRA adapters
(GGUF) are switched on the live context, so the base model and a warm adapter share one set of weights.
The engine remembers which tokens sit in its KV cache and only evaluates what is new, so n samples or
n option scores of one prompt pay for the prompt once.
"""
from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

from llama_cpp._utils import suppress_stdout_stderr

from ..core.adapter_gguf import check_adapter
from ..core.config import EngineConfig
from ..core.errors import UserError
from ..core.prompts import ANSWER_PREFIX, ChatTemplate
from .protocol import N_BATCH, AdapterKey, Counts, Sample, Score, decode_shape
from .weights import default_threads, inference_weights, plan_weights

log = logging.getLogger(__name__)


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
        self.adapter: AdapterKey | None = None
        self._embedder = None
        self._letters: dict[int, list[int]] = {}

    @property
    def weights_kind(self) -> str:
        return self.weights.kind

    def counts(self) -> Counts:
        """llama_decode calls and tokens by adapter and decode shape so far in this process (a copy)."""
        return Counts(self.decodes, {a: dict(d) for a, d in self.decode_shapes.items()})

    @property
    def tokens_by_adapter(self) -> dict[str, int]:
        return {a: sum(d.values()) for a, d in self.decode_shapes.items()}

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
                    n_ctx=64 if vocab_only else cfg.n_ctx, n_batch=N_BATCH,
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
                with suppress_stdout_stderr(disable=False):  # "cannot use buft 'CPU_REPACK'": one line per tensor
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

    def reference_logits(self, sequences: list[list[int]], adapter: Path | None) -> list[np.ndarray]:
        """(T, vocab) logits of each sequence from a clean cache, with `adapter` at scale 1 or none (the parity
        gate's reference; the adapter applied before is applied again after)."""
        previous = self.adapter
        try:
            self.set_adapter(adapter, 1.0)
            return [self.logits(s) for s in sequences]
        finally:
            self.set_adapter(Path(previous[0]) if previous else None, previous[1] if previous else None)

    def each(self, work, fn):
        """(item, fn(self, item)) for every item, in order."""
        for item in work:
            yield item, fn(self, item)

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
        logp = log_softmax(self._prefill(prompt).astype(np.float64))  # (V,)
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
                logp = log_softmax(logits.astype(np.float64))
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

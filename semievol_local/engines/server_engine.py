"""llama-server engine: the operations of `llama_engine.Engine`, computed by llama.cpp's own HTTP server.

Tokens never travel as text. The GGUF's vocabulary is loaded here (llama.cpp, vocabulary only: no
weights), so prompts are tokenized and templated exactly as in process, and sent as token ids. A score is
one generated token after `Answer:` with `n_probs` (probabilities before sampling: `post_sampling_probs` false); a sample
is a generation with an explicit seed, plain temperature sampling over the whole vocabulary, and the
probability of each sampled token under the model. Adapters are loaded by the server at start (`--lora`,
matched here by path) and chosen per request with zero scale for the others.

One `Lane` is one slot of one server (`server_client.Server`): the pipeline runs questions concurrently over a `Fleet`'s lanes
(`Fleet.each`), and a server that stops answering has its questions asked again on the others.

Equal to the in-process engine (same llama.cpp source and build flags): a score's probabilities are the
server's float32 softmax (relative difference to the in-process float64 one ~1e-7), the option chosen
and the selection are the same unless two values tie to that precision.
"""
from __future__ import annotations

import dataclasses
import http.client
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from ..core import apikey
from ..core.adapter_gguf import check_adapter
from ..core.config import EngineConfig
from ..core.errors import UserError
from .llama_engine import Engine as LocalEngine
from .protocol import AdapterKey, Sample, Score
from .server_client import Server, ServerDown

log = logging.getLogger(__name__)

TOP_FIRST = 64  # n_probs asked first for a score; the whole vocabulary only when a letter is not among them
PROBE = "Answer: A\n<|im_start|>user The 3 quick brown foxes jumped; résumé naïve 42.5%"


class Lane:
    """One slot of one server, with the engine's operations (`llama_engine.Engine`'s names)."""

    def __init__(self, fleet: "Fleet", server: Server, slot: int):
        self.fleet, self.server, self.slot = fleet, server, slot
        self._conn: http.client.HTTPConnection | None = None
        self.adapter: AdapterKey | None = None

    # the vocabulary and the prompt format are the fleet's (one local vocabulary load)
    def __getattr__(self, name):
        return getattr(self.fleet, name)

    def set_adapter(self, path: Path | None, scale: float | None = None) -> None:
        """Ask the following requests with this adapter (or none); the server's adapter id is looked up per
        request, since a server restarted with more adapters (`semievol serve --run`) numbers them anew."""
        scale = self.fleet.cfg.adapter_scale if scale is None else scale
        if path is None:
            self.adapter = None
            return
        self.fleet.check_adapter(Path(path))
        self.adapter = (str(Path(path).resolve()), float(scale), "")

    def _lora(self) -> list[dict]:
        """Every adapter the server holds, at scale 0 except the chosen one (an adapter a request does not
        list gets the scale the server was started with, not 0)."""
        if self.adapter is not None and self.adapter[0] not in self.server.adapters:
            self.server.wait_for_adapter(self.adapter[0])
        want = self.server.adapters[self.adapter[0]] if self.adapter is not None else None
        return [{"id": i, "scale": self.adapter[1] if i == want else 0.0} for i in self.server.adapters.values()]

    def reset(self) -> None:
        """Nothing to do: the server reuses a cached prefix only where it is the same tokens, which gives the
        same logits (llama.cpp on CPU computes a token's logits the same with or without the cached prefix)."""

    def _complete(self, prompt: list[int], **params) -> dict:
        self.fleet.check_fits(len(prompt))
        body = {"prompt": list(map(int, prompt)), "id_slot": self.slot, "cache_prompt": True, "lora": self._lora(),
                "stream": False, **params}
        if self._conn is None:
            parts = urlsplit(self.server.url)
            self._conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.server.timeout)
        try:
            return self.server.request("POST", "/completion", body, conn=self._conn)
        except ServerDown:
            self._conn = None
            raise

    def score(self, prompt: list[int], n_options: int) -> Score:
        ids = self.fleet.letter_tokens(n_options)
        for n_probs in (TOP_FIRST, self.fleet.n_vocab):
            top = self._next_logprobs(prompt, n_probs)
            if all(i in top for i in ids):
                break
        return Score.from_letter_probs(np.array([math.exp(top[i]) if i in top else 0.0 for i in ids], dtype=np.float64))

    def sample(self, prompt: list[int], seeds: list[int], *, temperature: float = 1.0,
               max_tokens: int = 256) -> list[Sample]:
        """One generation per seed: temperature sampling over the whole vocabulary by llama.cpp's sampler
        (seeded, so repeatable on the servers; the in-process engine draws with NumPy, so the same seed gives
        other draws from the same distribution; greedy, temperature 0, gives the same tokens)."""
        max_tokens = min(max_tokens, self.fleet.n_ctx - len(prompt) - 1)
        out = []
        for seed in seeds:
            r = self._complete(prompt, n_predict=max_tokens, seed=int(seed), temperature=float(max(temperature, 0.0)),
                               samplers=["temperature"], top_k=0, top_p=1.0, min_p=0.0, n_probs=1,
                               post_sampling_probs=False, return_tokens=True)
            toks = [int(t) for t in r.get("tokens", [])]
            if toks and self.fleet.is_eog(toks[-1]):  # the end-of-generation token is not part of the answer
                toks = toks[:-1]
            probs = iter(r.get("completion_probabilities", []))
            lps = []
            for j, complete in enumerate(self._completes_text(toks)):
                if complete:
                    p = next(probs)
                    assert int(p["id"]) == toks[j], (p, toks[j])
                    lps.append(float(p["logprob"]))
                else:  # the server reports no probability for a token that ends inside a UTF-8 character
                    lps.append(self._token_logprob(prompt + toks[:j], toks[j]))
            out.append(Sample(text=self.fleet.detokenize(toks), tokens=toks, logprobs=np.array(lps, dtype=np.float64)))
        return out

    def _completes_text(self, toks: list[int]) -> list[bool]:
        """Per generated token, whether the text so far ends on a whole UTF-8 character (the server's
        `validate_utf8`): the tokens the server reports a probability for."""
        text, out = b"", []
        for t in toks:
            text += self.fleet.vocab.token_bytes(t)
            cut = any((text[-i] & m) == v and i < need for i in range(1, min(4, len(text)) + 1)
                      for m, v, need in ((0xE0, 0xC0, 2), (0xF0, 0xE0, 3), (0xF8, 0xF0, 4)))
            out.append(not cut)
        return out

    def _token_logprob(self, prefix: list[int], tok: int) -> float:
        return self._next_logprobs(prefix, self.fleet.n_vocab)[tok]

    def _next_logprobs(self, prompt: list[int], n_probs: int) -> dict[int, float]:
        """{token: log P} of the `n_probs` likeliest next tokens, from the logits before any sampler. The one
        token generated is forced (logit bias) to a plain ASCII one: the server reports no probabilities
        after a token that ends inside a UTF-8 character, and the bias does not touch the logits reported."""
        r = self._complete(prompt, n_predict=1, n_probs=n_probs, post_sampling_probs=False, temperature=0.0,
                           samplers=["temperature"], logit_bias=[[self.fleet.plain_token, 1e4]])
        return {int(t["id"]): float(t["logprob"]) for t in r["completion_probabilities"][0]["top_logprobs"]}

    def logits(self, tokens: list[int]) -> np.ndarray:
        raise UserError("full logits (the parity check) need the in-process engine; run it without --server")


class Fleet:
    """Every lane of every server, plus the local vocabulary: the engine interface for the pipeline.

    Calls made on the fleet itself go to its first live lane; `each` spreads work over all of them."""

    def __init__(self, model_path: Path, urls: list[str], cfg: EngineConfig | None = None, *, timeout: float = 300.0):
        self.cfg = cfg = cfg or EngineConfig()
        self.model_path = Path(model_path)
        self.vocab = LocalEngine(model_path, cfg, vocab_only=True)
        self.n_vocab, self.template, self.architecture = self.vocab.n_vocab, self.vocab.template, self.vocab.architecture
        self.eos_token, self.adds_bos = self.vocab.eos_token, self.vocab.adds_bos
        self.plain_token = self.vocab.raw_tokens(" A", special=False)[-1]  # ASCII text
        self._local_meta: dict | None = None
        key = apikey.find(cfg.api_key_file)
        self.servers = []
        for url in urls:
            try:
                self.servers.append(Server(url, timeout, key))
            except ServerDown as e:
                raise UserError(f"--server {url}: no llama-server answers there ({e}); start one "
                                "(`semievol serve`) or drop it from the list") from None
        self.weights = self._served_weights(self.vocab.weights)  # what the servers must compute with
        self.n_ctx = cfg.n_ctx or min(s.n_ctx for s in self.servers)
        for s in self.servers:
            self._check_same_model(s)
            if s.n_ctx < self.n_ctx:
                raise UserError(f"{s.url}: its slots hold {s.n_ctx} tokens, this run needs --n-ctx {self.n_ctx}; "
                                f"start it with -c {self.n_ctx * s.slots} (--parallel {s.slots}) or lower --n-ctx")
        self.lanes = [Lane(self, s, k) for s in self.servers for k in range(s.slots)]
        self._checked: set[str] = set()

    # --- the vocabulary (local) -----------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.vocab.tokenize(text)

    def detokenize(self, tokens: list[int]) -> str:
        return self.vocab.detokenize(tokens)

    def is_eog(self, tok: int) -> bool:
        return self.vocab.is_eog(tok)

    def letter_tokens(self, n_options: int) -> list[int]:
        return self.vocab.letter_tokens(n_options)

    def check_fits(self, n: int) -> None:
        if n >= self.n_ctx:
            raise UserError(f"a prompt of {n} tokens does not fit the context of {self.n_ctx} tokens; "
                            "raise --n-ctx (and the servers' -c) or shorten the input")

    def check_adapter(self, path: Path) -> None:
        key = str(path)
        if key not in self._checked:
            check_adapter(path, self.architecture)
            self._checked.add(key)

    def _served_weights(self, plan):
        """The run's weights plan (nothing made here); where `auto` has not measured this file on this machine,
        what the first server computes with (its own `semievol serve` measured it there)."""
        if plan.kind != "unmeasured":
            return plan
        from .weights import Weights, f32_path

        copy, served = f32_path(self.model_path), self.servers[0].model_file or ""
        if served.endswith("-f32.gguf"):  # a float32 copy (if of another file, _check_same_model says so)
            return Weights(copy, "f32", f"the float32 copy, as {self.servers[0].url} computes", plan.f32_bytes)
        return Weights(self.model_path, "file", f"the file, as {self.servers[0].url} computes", plan.f32_bytes)

    def _check_same_model(self, s: Server) -> None:
        """The server's model must be this GGUF: the same vocabulary, parameter count and bytes of weights
        (a different quantization of the same model differs there), and the same tokens for a probe text."""
        if self._local_meta is None:
            from ..core import gguf_file

            tensors = gguf_file.read(self.model_path).tensors
            n_params = sum(int(t.n_elements) for t in tensors)
            size = self.weights.f32_bytes if self.weights.kind == "f32" else sum(int(t.data.nbytes) for t in tensors)
            self._local_meta = {"n_vocab": self.n_vocab, "n_params": n_params, "size": size}
        for key, mine in self._local_meta.items():
            theirs = s.meta.get(key)
            if theirs is not None and int(theirs) != mine:
                raise UserError(f"{s.url} serves other weights than this run computes with ({key} {theirs} vs "
                                f"{mine}; here: {self.weights.why}); start it with `semievol serve --model "
                                f"{self.model_path}` and the same --weights")
        if self.weights.kind == "f32" and s.model_file and s.model_file != self.weights.path.name:
            # a float32 copy is named by its source file's digest: equal shapes and sizes are not enough here
            raise UserError(f"{s.url} serves {s.model_file}, not the float32 copy of {self.model_path.name} this run "
                            f"computes with ({self.weights.path.name}); start it with `semievol serve --model "
                            f"{self.model_path}` and the same --weights")
        theirs = s.request("POST", "/tokenize", {"content": PROBE, "add_special": False, "parse_special": True})
        mine = self.vocab.raw_tokens(PROBE, special=True)
        if [t if isinstance(t, int) else t["id"] for t in theirs.get("tokens", [])] != mine:
            raise UserError(f"{s.url} tokenizes differently from {self.model_path}: it serves another model; "
                            f"start it with -m {self.model_path}")

    def revive(self) -> None:
        """Servers marked dead that answer again (restarted) take work again."""
        for s in self.servers:
            if not s.alive:
                try:
                    s.request("GET", "/health", timeout=5)
                    s.refresh()
                    s.alive = True
                    log.warning("%s answers again", s.url)
                except (ServerDown, UserError):
                    pass

    # --- one call at a time, on the first live lane -----------------------------------------------
    def _lane(self) -> Lane:
        for attempt in range(2):
            for lane in self.lanes:
                if lane.server.alive:
                    return lane
            self.revive()
        raise UserError("every llama-server stopped answering; start them again and run the same command: "
                        "finished work is kept")

    def _call(self, op: str, *args, **kwargs):
        """One operation on a live lane; where its server stops answering, on the next one."""
        while True:
            lane = self._lane()
            try:
                return getattr(lane, op)(*args, **kwargs)
            except ServerDown as e:
                log.warning("%s stopped answering (%s)", lane.server.url, e)
                lane.server.alive = False

    @property
    def adapter(self):
        return self._lane().adapter

    def set_adapter(self, path, scale=None):
        for lane in self.lanes:
            lane.set_adapter(path, scale)

    def reset(self):
        pass

    def score(self, prompt, n_options):
        return self._call("score", prompt, n_options)

    def sample(self, prompt, seeds, **kw):
        return self._call("sample", prompt, seeds, **kw)

    def logits(self, tokens):
        return self._lane().logits(tokens)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Retrieval vectors from the local copy of the model (as in process): the servers serve completions."""
        return self.vocab.embed(texts)

    @property
    def weights_kind(self) -> str:
        return self.weights.kind

    def reference_logits(self, sequences: list[list[int]], adapter: Path | None) -> list[np.ndarray]:
        """Full logits do not travel over HTTP: llama.cpp in this process, on what the servers compute with (the
        float32 copy made here where they use one), loaded for this call."""
        local = LocalEngine(self.model_path, dataclasses.replace(self.cfg, server=None, weights=self.weights.kind,
                                                                 n_ctx=self.n_ctx))
        try:
            return local.reference_logits(sequences, adapter)
        finally:
            local.close()

    def prefill_rate(self, n_tokens: int, repeats: int = 3, seed: int = 0, past: int = 0) -> None:
        return None  # the servers' rates are not measured from here

    def release(self) -> None:
        """Nothing to free here: the servers hold the weights (this process holds only the vocabulary)."""

    def counts(self) -> None:
        return None  # the servers' decodes are not counted here

    def close(self) -> None:
        self.vocab.close()

    def each(self, work: Iterable, fn: Callable, *, retry_wait: float = 1.0, max_wait: float = 30.0) -> Iterator:
        """(item, fn(lane, item)) for every item, as they finish, over the lanes concurrently. A lane whose
        server stops answering is retired and its item is asked again on another; when every server is gone
        they are probed with growing waits, and a run that cannot reach any within `max_wait` seconds stops
        with one line (what finished is kept by the caller)."""
        items = list(work)
        engine = self
        engine.revive()
        todo: queue.Queue = queue.Queue()
        for item in items:
            todo.put(item)
        results: queue.Queue = queue.Queue()
        stop = threading.Event()

        def worker(lane: Lane):
            while not stop.is_set() and lane.server.alive:
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.put(("ok", item, fn(lane, item)))
                except ServerDown as e:
                    log.warning("%s stopped answering (%s): its questions go to the other servers", lane.server.url, e)
                    lane.server.alive = False
                    todo.put(item)
                    results.put(("down", item, None))
                    return
                except BaseException as e:  # noqa: BLE001  handed to the caller's thread
                    results.put(("error", item, e))
                    return

        def start_workers():
            threads = [threading.Thread(target=worker, args=(ln,), daemon=True) for ln in engine.lanes if ln.server.alive]
            for t in threads:
                t.start()
            return threads

        threads = start_workers()
        left, wait = len(items), retry_wait
        try:
            while left:
                try:
                    kind, item, value = results.get(timeout=0.5)
                except queue.Empty:
                    kind = None
                if kind == "ok":
                    left -= 1
                    wait = retry_wait
                    yield item, value
                elif kind == "error":
                    raise value
                if left and not any(t.is_alive() for t in threads) and results.empty():
                    # every worker left: servers died (or the queue emptied while a retry was pending)
                    deadline = time.monotonic() + max_wait
                    while not any(s.alive for s in engine.servers):
                        if time.monotonic() > deadline:
                            raise UserError("every llama-server stopped answering ("
                                            + ", ".join(s.url for s in engine.servers)
                                            + "); start them again and run the same command: finished work is kept")
                        time.sleep(wait)
                        wait = min(wait * 2, max_wait)
                        engine.revive()
                    threads = start_workers()
        finally:
            stop.set()

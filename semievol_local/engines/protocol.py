"""The inference engine every stage types against, and the one loader that picks its implementation.

Two implementations with the same operations: `llama_engine.Engine` (llama.cpp in this process, the
default) and `server_engine.Fleet` (one or more llama-servers, `--server`). What the pipeline, eval,
predict and bench use of an engine is `InferenceEngine` below. A fleet cannot give full logits (the
parity gate computes its reference with llama.cpp in this process instead) and embeds with a local copy
of the model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from ..core import config
from ..core.config import EngineConfig


class InferenceEngine(Protocol):
    model_path: Path
    n_ctx: int  # the context every prompt must fit (prompts are fitted to it before they are asked)
    n_vocab: int
    architecture: str
    eos_token: int
    adds_bos: bool
    adapter: tuple | None  # (resolved path, scale, stat) of the adapter applied, or None
    cfg: EngineConfig
    weights: object  # weights.Weights: what llama.cpp computes with (the file, or its float32 copy)
    remote: bool  # forward passes run elsewhere (llama-servers) or not at all here (a vocabulary-only engine)

    @property
    def template(self): ...  # prompts.ChatTemplate of the GGUF

    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, tokens: list[int]) -> str: ...
    def letter_tokens(self, n_options: int) -> list[int]: ...
    def set_adapter(self, path: Path | None, scale: float | None = None) -> None: ...
    def reset(self) -> None: ...
    def score(self, prompt: list[int], n_options: int): ...  # -> llama_engine.Score
    def sample(self, prompt: list[int], seeds: list[int], *, temperature: float = 1.0,
               max_tokens: int = 256) -> list: ...  # -> [llama_engine.Sample]
    def embed(self, texts: list[str]) -> np.ndarray: ...
    def logits(self, tokens: list[int]) -> np.ndarray: ...
    def release(self) -> None: ...  # free the weights while MLX trains (the next forward pass loads them)
    def counts(self) -> tuple | None: ...  # (decode calls, tokens by adapter and decode shape); None: remote
    def close(self) -> None: ...


def load(model_path: Path, cfg: EngineConfig | None = None) -> InferenceEngine:
    """The engine for `cfg`: the llama-servers of `--server`, or llama.cpp in this process (loaded once)."""
    cfg = cfg or EngineConfig()
    if cfg.server:
        from . import server_engine

        return server_engine.Fleet(model_path, config.parse_urls(cfg.server), cfg, timeout=cfg.server_timeout)
    from . import llama_engine

    return llama_engine.load(model_path, cfg)


def each(engine: InferenceEngine, work: Iterable, fn: Callable) -> Iterator:
    """(item, fn(engine_or_lane, item)) for every item: in order in process, as they finish over a fleet's
    lanes (a server that stops answering has its items asked again elsewhere)."""
    from . import server_engine

    return server_engine.each(engine, work, fn)

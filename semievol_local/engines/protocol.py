"""The inference engine every stage types against, and what it returns.

Two implementations with the same operations: `llama_engine.Engine` (llama.cpp in this process, the
default) and `server_engine.Fleet` (one or more llama-servers, `--server`). Nothing outside `engines`
imports either: stages, bench and cli load an engine with `engines.load`, type against `InferenceEngine`,
and use `Score`, `Sample`, `Counts` and `decode_shape` from here. A fleet cannot give full logits over HTTP:
its `reference_logits` loads llama.cpp in this process on the weights its servers compute with.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from ..core.prompts import ChatTemplate
from ..core.selection import entropy

N_BATCH = 512  # llama.cpp's batch: a longer prompt is decoded in chunks of this size

AdapterKey = tuple[str, float, str]  # (resolved path, scale, the file's size and mtime) of an applied adapter


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


Shape = tuple[int, int]  # a decode's (cached tokens before it, tokens in it), binned by `decode_shape`


class Counts(NamedTuple):
    """The work llama.cpp did in this process so far."""

    decodes: int  # llama_decode calls
    shapes: dict[str, dict[Shape, int]]  # tokens by adapter path ("": none) and decode shape


def decode_shape(past: int, n: int) -> Shape:
    """A decode's shape, binned: (cached tokens before it, to 128; tokens in it: exact up to 8, to 8 up to 64,
    then to 32). llama.cpp's tokens/s depends on both (attention over the cache, matrix sizes)."""
    size = n if n <= 8 else 8 * round(n / 8) if n <= 64 else 32 * round(n / 32)
    return 128 * round(past / 128), size


class InferenceEngine(Protocol):
    model_path: Path
    n_ctx: int  # the context every prompt must fit (prompts are fitted to it before they are asked)
    n_vocab: int
    architecture: str
    eos_token: int
    adds_bos: bool
    adapter: AdapterKey | None  # the adapter applied, or None
    weights_kind: str  # what llama.cpp computes with: "file" (the GGUF as given) or "f32" (its float32 copy)

    @property
    def template(self) -> ChatTemplate: ...

    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, tokens: list[int]) -> str: ...
    def letter_tokens(self, n_options: int) -> list[int]: ...
    def set_adapter(self, path: Path | None, scale: float | None = None) -> None: ...
    def reset(self) -> None: ...
    def score(self, prompt: list[int], n_options: int) -> Score: ...
    def sample(self, prompt: list[int], seeds: list[int], *, temperature: float = 1.0,
               max_tokens: int = 256) -> list[Sample]: ...
    def embed(self, texts: list[str]) -> np.ndarray: ...  # (N, dim) L2-normalized
    def logits(self, tokens: list[int]) -> np.ndarray: ...  # (T, vocab)

    def reference_logits(self, sequences: list[list[int]], adapter: Path | None) -> list[np.ndarray]:
        """llama.cpp's (T, vocab) logits of each sequence from a clean cache, with `adapter` at scale 1 or none, on
        the weights the forward passes use, computed in this process: the parity gate's reference.
        The adapter applied before is applied again after."""
        ...

    def prefill_rate(self, n_tokens: int, repeats: int = 3, seed: int = 0, past: int = 0) -> float | None:
        """Prompt evaluation, tokens/s (None: forward passes run elsewhere, not measured here)."""
        ...

    def each(self, work: Iterable, fn: Callable) -> Iterator:
        """(item, fn(engine_or_lane, item)) for every item: in order in process, as they finish over a fleet's
        lanes (a server that stops answering has its items asked again elsewhere)."""
        ...

    def release(self) -> None: ...  # free the weights while MLX trains (the next forward pass loads them)
    def counts(self) -> Counts | None: ...  # None: the forward passes are not counted here (llama-servers)
    def close(self) -> None: ...

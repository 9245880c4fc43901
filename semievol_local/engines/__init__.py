"""Inference with llama.cpp: the `InferenceEngine` Protocol every stage types against (`protocol`), and the
one loader that picks its implementation (`load`, below); llama.cpp in this process (`llama_engine`); which weights it computes
with, the file or its float32 copy (`weights`); and a fleet of llama-servers behind the same operations
(`server_engine`), each server reached over HTTP by `server_client` and built or started by `llama_server`.

This package may import `core` and nothing else of semievol_local; `training` and `engines` never import
each other, so the two engines meet only in `method`. What the code relies on about llama.cpp:
docs/engines.md.
"""
from __future__ import annotations

from pathlib import Path

from ..core import config
from ..core.config import EngineConfig
from .protocol import InferenceEngine


def load(model_path: Path, cfg: EngineConfig | None = None, *, shared: bool = True) -> InferenceEngine:
    """The engine for `cfg`: the llama-servers of `--server`, or llama.cpp in this process. `shared`: the
    process's one in-process engine (loaded once, reused; loading another model closes it); otherwise a
    separate engine the caller closes (a second file beside the first, as `export --merged` checks)."""
    cfg = cfg or EngineConfig()
    if cfg.server:
        from . import server_engine

        return server_engine.Fleet(model_path, config.parse_urls(cfg.server), cfg, timeout=cfg.server_timeout)
    from . import llama_engine

    return llama_engine.load(model_path, cfg) if shared else llama_engine.Engine(model_path, cfg)


def unload() -> None:
    """Close the process's in-process engine (its threads and memory; the next `load` loads it again)."""
    from . import llama_engine

    llama_engine.unload()


def vocabulary(model_path: Path):
    """llama.cpp's view of a model without its weights (tokenizer, template, `architecture`; no forward passes)."""
    from . import llama_engine

    return llama_engine.Engine(model_path, vocab_only=True)

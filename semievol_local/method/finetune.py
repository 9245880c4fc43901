"""From items to a trained adapter: token examples for the MLX trainer, then the llama.cpp parity gate.

Both engines use llama.cpp's tokenizer and the GGUF's chat template, so the ids MLX trains on are the ids
llama.cpp later scores. The training prompt is the plain question (no demonstrations) and the target is
just `Answer: X` and the end-of-turn token, as the official SemiEvol code trains.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.config import TrainConfig
from ..core.data import Item
from ..core.errors import UserError
from ..core.files import atomic_write_json
from ..core.prompts import answer_text, question_messages
from ..engines.protocol import InferenceEngine
from ..training.blas import trim_malloc

log = logging.getLogger(__name__)

# Bounds for a merged file against base + adapter (both in llama.cpp: `merge`); the training gate judges an adapter
# against the engines' own floor instead (`training.parity.judge`).
MAX_KL = 0.1
MIN_TOP1 = 0.9
REJECTED_NAME = "adapter.gguf.parity-failed"  # where a failed gate moves adapter.gguf


def family_defaults(cfg: TrainConfig, architecture: str) -> TrainConfig:
    """`cfg` with what it leaves to the model's family filled in (`--lr 0`, the default: the learning rate
    measured to work for the architecture, from the loader's table), so that stage identities and run.json
    carry the value that trains."""
    from ..training.gguf_loader import default_lr

    return cfg if cfg.lr else dataclasses.replace(cfg, lr=default_lr(architecture))


def examples(engine: InferenceEngine, items: Sequence[Item]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per labeled item; the answer ends with the model's end-of-turn token.

    Prompt and answer are tokenized as one text and split where the prompt's own tokens stop matching, so
    the boundary gets the tokens inference sees (scoring tokenizes `<prompt>Answer:` as one text too);
    a SentencePiece or BPE merge across the boundary cannot differ between training and inference."""
    eot = engine.eos_token
    out = []
    for it in items:
        if it.answer is None:
            raise UserError(f"question {it.index + 1}: no answer to train on")
        text = engine.template.prompt(question_messages(it))
        prompt = engine.tokenize(text)
        full = engine.tokenize(text + answer_text(it, it.answer))
        k = 0
        while k < min(len(prompt), len(full) - 1) and prompt[k] == full[k]:
            k += 1
        out.append((full[:k], full[k:] + ([eot] if eot >= 0 else [])))
    return out


def train_adapter(engine: InferenceEngine, items: Sequence[Item], cfg: TrainConfig, out_dir: Path, *,
                  resume: bool = False, check: bool = True, init_adapter: Path | None = None,
                  on_step: Callable[[dict], None] | None = None,
                  on_trunk: Callable[[int, int], None] | None = None, trunk_store: Path | None = None) -> dict:
    """Train LoRA on `items` with MLX into `out_dir` (adapter.gguf among the outputs) and gate on parity."""
    from ..training import batching, distributed, mlx_engine

    exs = examples(engine, items)
    mlx_engine.memory_check(engine.model_path, exs, cfg)  # a run this machine cannot hold stops before anything
    # which rows train and which (with --val-fraction) only choose the checkpoint: written down, by position
    held = batching.validation_positions(len(exs), cfg.val_fraction, cfg.seed)
    held_set = set(held)
    lead = lead_process()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if lead:
        atomic_write_json(Path(out_dir) / "rows.json", {
            "trained": len(exs) - len(held), "validation": len(held),
            "validation_rows": [{"position": i, "index": items[i].index, "question": items[i].question[:80]} for i in held]})
    if cfg.hosts and not lead_process():
        raise UserError("--train-hosts starts its own processes; do not also run this command under mlx.launch")
    trainer = distributed.train if cfg.hosts else mlx_engine.train  # several processes, or this one
    engine.release()  # llama.cpp's weights leave memory while MLX trains (back for parity)
    summary = trainer(engine.model_path, [e for i, e in enumerate(exs) if i not in held_set], cfg, out_dir,
                      valid_examples=[exs[i] for i in held], resume=resume, init_adapter=init_adapter,
                      on_step=on_step, on_trunk=on_trunk, trunk_store=trunk_store)
    if check and lead:
        parity = check_adapter(engine, out_dir, [p + a for p, a in exs[:4]])
        summary = {**summary, "parity": parity}
        # the check's full-vocabulary logits were freed inside the heap training grew, where glibc keeps them
        # (measured: 0.6 GB after a fpb warm-up, carried through every llama.cpp stage): hand them back
        trim_malloc()
    return summary


def lead_process() -> bool:
    """Whether this process writes and reports: always, unless `mlx.launch` started it as rank 1 or later
    of a data-parallel training (MLX sets MLX_RANK; reading it does not start MLX)."""
    import os

    return int(os.environ.get("MLX_RANK", "0") or 0) == 0


def check_adapter(engine: InferenceEngine, adapter_dir: Path, sequences: list[list[int]]) -> dict:
    """MLX vs llama.cpp on the same token sequences, the base alone (the engines' floor) and with the adapter
    (`training.parity.judge`); raise when the adapter adds more than the floor allows, or the base itself differs."""
    from ..training import mlx_engine
    from ..training.parity import judge

    refs = [engine.reference_logits(sequences, None),
            engine.reference_logits(sequences, Path(adapter_dir) / "adapter.gguf")]
    # MLX loads its own copy next: llama.cpp's weights leave first (not both at once: the 8B shape's check held
    # 18.7 GB with both), and the next forward pass loads them again
    engine.release()
    floor, adapted = mlx_engine.parity_against(engine.model_path, adapter_dir, sequences, refs)
    parity = judge(floor, adapted, engine.weights_kind)
    reason = parity.pop("failed")
    if reason is not None:
        # no usable-looking adapter.gguf may stay behind for a script to pick up
        gguf_file = Path(adapter_dir) / "adapter.gguf"
        rejected = gguf_file.with_name(REJECTED_NAME)
        if gguf_file.exists():
            gguf_file.replace(rejected)
        raise UserError(f"{adapter_dir}: adapter parity check failed: {reason}; llama.cpp does not reproduce the "
                        f"MLX adapter, so it was moved to {rejected.name} (not for use)")
    return parity

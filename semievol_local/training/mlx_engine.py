"""MLX engine: train LoRA on a GGUF's own weights (loaded into an mlx-lm model), export for llama.cpp.

One GGUF, two engines: MLX trains directly on the GGUF's tensors (no conversion; `gguf_loader` builds the
mlx-lm model of the file's architecture on the rope convention of its Q/K rows: llama-family files store them permuted for
llama.cpp's interleaved rope, and the model is built for that layout, so nothing is un-permuted), and the
adapter is written twice: in mlx-lm's layout (`adapters.safetensors` + `adapter_config.json`) and as a
llama.cpp GGUF LoRA adapter (`adapter.gguf`) that `Llama(lora_path=...)` loads as-is.

Helpers it leans on: `gguf_loader` (the architecture table and the loader, which swaps in `mlx_fast`'s
CPU-friendly layers where the table allows), `lora` (LoRA layers, checkpointing, the adapter files),
`frozen` (the frozen blocks' outputs computed once), `collectives` (data-parallel sums), `train_flops`
(the FLOPs counted), `batching` (examples -> padded NumPy batches), `checkpoint` (verified resumable
checkpoints), `parity` (llama.cpp's logits, for `adapter_check`). `bench.train` benchmarks `train`.

What it does NOT do: no prompts, chat templates or tokenization (callers pass token ids, tokenized by
llama.cpp so both engines see identical ids); no printing or progress drawing (it logs, and hands a
dict to `on_step` every optimizer step); no llama.cpp inference of its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx.nn import Module as Model  # any mlx-lm model class of gguf_loader's table
from mlx_lm.tuner.utils import load_adapters

from ..core import config
from ..core.config import TrainConfig
from ..core.errors import UserError
from ..core.files import atomic_write_text
from ..core.runfolder import ram_bytes, rss_mb
from . import batching, collectives, frozen, gguf_loader, lora, train_flops
from .blas import tune_malloc, untune_malloc
from .batching import Example
from .checkpoint import Progress, discard_partial, resume_from, save_checkpoint
from .guard import MAX_ROLLBACKS, Guard
from .memory import memory_check, step_peak

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- loading (gguf_loader)

load_model = gguf_loader.load_model  # the GGUF -> mlx-lm model loader, with the architecture table


def logits(model: Model, token_ids: list[int]) -> np.ndarray:
    """Next-token logits at every position, (T, vocab) float32."""
    out = model(mx.array([list(token_ids)], dtype=mx.int32))[0]  # (T, vocab)
    return np.array(out.astype(mx.float32))


_lm_head = gguf_loader.lm_head


def _loss(model: Model, inputs, pos, targets, mask, norm, first: int = 0):
    """Summed answer-token cross-entropy divided by `norm` (the optimizer step's answer-token count, so
    micro-batch gradients add up to the token mean). Like mlx-lm's default_loss, but the vocab projection
    runs only at answer positions: for short answers that skips most of the largest matmul.
    `first` > 0: `inputs` are the cached outputs of block first-1 (B, L, D), not token ids (see `_trunk`)."""
    if first == 0:
        h = model.model(inputs)  # (B, L, D)
    else:
        h = model.model.norm(frozen.blocks(model, inputs, first, len(model.model.layers)))  # (B, L, D)
    h = mx.take_along_axis(h, pos[..., None], axis=1)  # (B, A, D)
    ce = nn.losses.cross_entropy(_lm_head(model, h), targets) * mask  # (B, A)
    return ce.sum() / norm, mask.sum()


def _schedule(cfg: TrainConfig, total_steps: int):
    """Linear warm-up from lr/(w+1) (the first step is not wasted at 0), then cosine decay to 0."""
    w = min(int(cfg.warmup * total_steps), total_steps - 1)
    decay = optim.cosine_decay(cfg.lr, max(total_steps - w, 1))
    if w == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(cfg.lr / (w + 1), cfg.lr, w), decay], [w])


# ----------------------------------------------------------------------------- training

def _releasing(fn):
    """Hand MLX's buffer cache back to the system when `fn` returns: the pipeline trains, then runs
    llama.cpp for a long time, then trains again, and a kept cache (MLX's, and the glibc heap that
    `tune_malloc` keeps) would sit in its resident memory. glibc's own settings come back too, so what
    runs after (the parity check's logits, llama.cpp) does not fill a heap that never shrinks."""
    import functools
    import gc

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            gc.collect()
            mx.clear_cache()
            untune_malloc()

    return run


@_releasing
def _optimizer(cfg: TrainConfig, model, total_steps: int):
    """AdamW on the schedule, times the divergence guard's scale (in the optimizer's state: a compiled input)."""
    schedule = _schedule(cfg, total_steps)
    optimizer = None

    def scaled(step):
        return schedule(step) * (optimizer.state["lr_scale"] if optimizer is not None else 1.0)

    optimizer = optim.AdamW(learning_rate=scaled, weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())  # before compiling: the state tree must not change shape later
    optimizer.state["lr_scale"] = mx.array(1.0)  # halved at each rollback
    return optimizer


def _compiled_step(model, optimizer, cfg: TrainConfig, first: int, g):
    """One compiled step: forward + backward (+ the optimizer's update on the last micro-batch), and the state
    it reads and writes."""
    loss_and_grad = nn.value_and_grad(model, partial(_loss, first=first))
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, pos, targets, mask, norm, prev_grad, do_update):
        (loss, _), grad = loss_and_grad(model, inputs, pos, targets, mask, norm)
        if prev_grad is not None:
            grad = tree_map(mx.add, grad, prev_grad)
        if do_update:
            grad = collectives.all_sum(grad, g)  # data parallel: the whole step's gradient (a no-op in one process)
            if cfg.grad_clip > 0:
                grad, _ = optim.clip_grad_norm(grad, cfg.grad_clip)
            optimizer.update(model, grad)
            grad = None
        return loss, grad

    return step, state


def _frozen_trunk(model, seqs, plan: batching.Plan, lora_blocks: int, batch_size: int, rank: int, world: int,
                  on_trunk, trunk_store: Path | None):
    """The blocks below the first LoRA block run once per sequence, not once per step: their outputs for every
    row this process meets (`frozen.outputs`). (outputs or None, the first block the steps compute, sequences
    whose outputs a store held, seconds)."""
    tic = time.perf_counter()
    first = len(model.layers) - lora_blocks if gguf_loader.spec_of(model).trunk_cache else 0
    if first == 0:
        return None, 0, 0, 0.0
    # every row this process meets in the whole run, also on resume: BLAS rounding depends on which rows share
    # a batch, and the same batches as an uninterrupted run keep a resumed run bit for bit the same
    only = (np.concatenate([collectives.shard(idx, rank, world)[0] for idx in plan.batches])
            if world > 1 and plan.batches else None)
    store = Path(trunk_store) / f"blocks-{first}" if trunk_store is not None and world == 1 else None
    trunk, reused = frozen.outputs(model, seqs, first, batch_size, on_trunk or (lambda done, total: None),
                                   only=only, store=store)
    seconds = time.perf_counter() - tic
    if trunk is None:
        return None, 0, reused, seconds
    log.info("outputs of the %d frozen blocks cached for %d sequences in %.1f s", first, len(seqs), seconds)
    return trunk, first, reused, seconds


def _fit_budget(model, cfg: TrainConfig, lengths: np.ndarray, plan: batching.Plan, first: int, world: int):
    """Recompute activations in the backward pass (block checkpointing) by itself where the step would pass
    the memory budget. (estimated peak bytes, how checkpointing was chosen)."""
    budget = cfg.memory_budget * 1e9 if cfg.memory_budget > 0 else 0.5 * ram_bytes()
    held = rss_mb() * 1e6
    estimate = step_peak(model, held, lengths, plan.pieces, first, world, cfg.grad_checkpoint)
    if cfg.grad_checkpoint or not budget or estimate <= budget:
        return estimate, "on" if cfg.grad_checkpoint else "off"
    lora.checkpoint_blocks(model)
    checkpointed = f"auto: estimated peak {estimate / 1e9:.1f} GB > budget {budget / 1e9:.1f} GB"
    estimate = step_peak(model, held, lengths, plan.pieces, first, world, True)
    log.info("gradient checkpointing on (%s; %.1f GB with it)", checkpointed, estimate / 1e9)
    return estimate, checkpointed


def train(model_path, train_examples: list[Example], cfg: TrainConfig, out_dir, *,
          valid_examples: list[Example] | None = None, resume: bool = False, init_adapter=None,
          on_step: Callable[[dict], None] | None = None,
          on_trunk: Callable[[int, int], None] | None = None, trunk_store: Path | None = None) -> dict:
    """LoRA-train on (prompt_ids, answer_ids) examples with the loss on answer tokens; write the adapter
    (both layouts), `train_log.jsonl` and resumable checkpoints into `out_dir`.

    `on_step(info)` runs after every optimizer step (and after that step's checkpoint, so stopping inside
    it loses nothing) with step, total_steps, epoch, loss, lr, tokens_per_s and, when computed, val_loss.
    With `resume=True` the newest checkpoint is verified and training continues exactly where it stopped.
    `init_adapter` (an adapter directory written by this function) starts from its LoRA weights instead of
    a fresh initialization; the LoRA settings must match it. `on_trunk(done, total)` reports the one
    pass over the frozen blocks (sequences done) before the first step. `trunk_store`: a folder, for this
    model file only, where that pass's outputs are kept by token sequence and reused by the next training.

    Started by `mlx.launch` (N processes on one or more hosts), it trains data-parallel: every process
    computes its share of each micro-batch (every N-th row), gradients are summed with
    `mx.distributed.all_sum` before each optimizer step, so every process holds the same weights and the
    step is the one-process step up to float rounding. Rank 0 alone writes files, validates and reports.
    """
    memory_check(model_path, list(train_examples) + list(valid_examples or []), cfg)  # before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = collectives.group()
    rank, world, lead = g.rank(), g.size(), g.rank() == 0  # lead: the one process that writes and reports
    on_step = on_step if on_step and lead else (lambda info: None)
    config.check(cfg)
    if valid_examples is None:
        train_examples, valid_examples = batching.split_validation(list(train_examples), cfg.val_fraction, cfg.seed)
    seqs = batching.prepare(train_examples, cfg.max_seq_len, "training")
    if not seqs:
        raise UserError("There are no training examples.")
    val_seqs = batching.prepare(valid_examples, cfg.max_seq_len, "validation")

    # ---- model + LoRA
    tune_malloc()
    model = load_model(model_path, base=cfg.frozen_base)
    if not cfg.lr:  # left to the model's family (`--lr 0`, the default): the rate measured to work for it
        cfg = dataclasses.replace(cfg, lr=gguf_loader.default_lr(model.args.model_type))
    adapter_cfg = lora.apply_lora(model, cfg)
    if cfg.grad_checkpoint:
        lora.checkpoint_blocks(model)
    init_sha = lora.load_init_adapter(model, Path(init_adapter)) if init_adapter is not None and lead else None
    adapter_cfg.update(model=str(model_path), semievol_train_config=dataclasses.asdict(cfg))
    arch = model.args.model_type
    lengths = np.array([len(t) for t, _ in seqs])
    plan = batching.plan_batches(lengths, cfg.batch_size, cfg.epochs, cfg.grad_accum, cfg.seed, cfg.max_batch_tokens)
    total_steps = plan.total_steps
    optimizer = _optimizer(cfg, model, total_steps)

    # ---- resume
    identity = {"config": config.identity("train", cfg),  # the options that change the adapter, declared in config
                "data_sha256": batching.fingerprint(seqs), "val_sha256": batching.fingerprint(val_seqs),
                "init_adapter_sha256": init_sha}
    ckpt_root = out_dir / "checkpoints"
    collectives.same_everywhere("the training examples, options or starting adapter",
                                hashlib.sha256(json.dumps({**identity, "init_adapter_sha256": None}, sort_keys=True
                                                          ).encode()).hexdigest(), g)
    if lead:
        discard_partial(ckpt_root)  # leftovers of a killed run: half-written checkpoints and temp files
        for stale in out_dir.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
    run = resume_from(ckpt_root, identity, model, optimizer, total_steps) if resume and lead else Progress()
    start = run.step
    if world > 1:  # every process starts from rank 0's weights, optimizer state and step
        model.update(collectives.from_rank0(model.trainable_parameters(), g))
        optimizer.state.update(collectives.from_rank0(optimizer.state, g))
        start = int(mx.distributed.all_sum(mx.array(start if lead else 0), group=g).item())

    trunk, first, trunk_reused, trunk_seconds = _frozen_trunk(model, seqs, plan, adapter_cfg["num_layers"], cfg.batch_size,
                                                              rank, world, on_trunk if lead else None, trunk_store)
    estimate, checkpointed = _fit_budget(model, cfg, lengths, plan, first, world)
    step, state = _compiled_step(model, optimizer, cfg, first, g)

    def write_log():
        atomic_write_text(out_dir / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in run.records))

    def give_up(weights: dict, message: str):
        """Keep `weights` as the adapter and the log so far, then stop with `message`."""
        if lead:
            lora.write_adapter(out_dir, weights, adapter_cfg, arch, len(model.layers), cfg)
            write_log()
        raise UserError(message)

    def micro_batches(s: int) -> list[tuple]:
        """Step `s`'s micro-batches as this process computes them (its rows; the trunk's cached states)."""
        out = []
        for idx in (q for v in plan.pieces[s * cfg.grad_accum: (s + 1) * cfg.grad_accum] for q in v):
            if world > 1:  # this process's rows of the micro-batch
                idx, idle = collectives.shard(idx, rank, world)
            b = batching.collate(seqs, idx)
            if world > 1 and idle:
                b = (*b[:3], np.zeros_like(b[3]))
            if trunk is not None:  # token ids -> the cached hidden states they lead to
                b = (frozen.padded(trunk, idx, b[0].shape[1]), *b[1:])
            out.append(b)
        return out

    model.train()
    guard = Guard(run.rollbacks)
    t_run = time.perf_counter()
    s = start
    while s < total_steps:
        tic = time.perf_counter()
        guard.start(s, dict(tree_flatten(model.trainable_parameters())), tree_map(lambda x: x, optimizer.state))
        mx.random.seed(cfg.seed * 1_000_003 + s)  # dropout masks: a function of (seed, step), so resuming needs no RNG state
        step_plan = plan.batches[s * cfg.grad_accum: (s + 1) * cfg.grad_accum]
        n_answer = float(sum(batching.collate(seqs, idx)[3].sum() for idx in step_plan))  # the whole step's
        if n_answer == 0:
            raise UserError(f"Training batch {s + 1} has no answer tokens to learn from; check that answers are not empty.")
        n_input = sum(int(len(seqs[i][0]) - 1) for idx in step_plan for i in idx)
        micro = micro_batches(s)
        norm = mx.array(n_answer, dtype=mx.float32)
        loss, grad = mx.array(0.0), None
        for j, batch in enumerate(micro):
            part, grad = step(*map(mx.array, batch), norm, grad, j == len(micro) - 1)
            loss = loss + part
            mx.eval(state, loss, grad)
        if world > 1:
            loss = mx.distributed.all_sum(loss, group=g)
        loss_v = loss.item()
        lr = optimizer.learning_rate.item()  # the rate this step used
        if not math.isfinite(loss_v):  # the weights this step started from gave it: keep the ones before them
            give_up(guard.before_nan(s),
                    f"Training loss became {loss_v} at step {s + 1} of {total_steps} (lr {lr:.2e}); the adapter "
                    f"as it was after step {max(s - 1, 0)} (the last finite loss) is saved in {out_dir}. "
                    f"Lower the learning rate (now {cfg.lr:g}) or set grad_clip.")
        back = guard.jumped(s, loss_v)
        if back is not None:  # from the kept start whose loss was lowest, at half the rate
            # the rate's scale counts the rollbacks so far, on every process alike (resumed, it came from rank 0)
            if optimizer.state["lr_scale"].item() <= 0.5 ** MAX_ROLLBACKS:
                give_up(guard.weights(back),
                        f"Training diverged at step {s + 1} of {total_steps}: loss {loss_v:.3g} against "
                        f"{guard.loss(back):.3g} at step {back + 1}, after {MAX_ROLLBACKS} rollbacks at halved rates "
                        f"(now lr {lr:.2e}); the adapter as it was after step {back} is saved in {out_dir}. Lower the "
                        f"learning rate (now {cfg.lr:g}) or the LoRA scale ({cfg.scale:g}).")
            scale = float(optimizer.state["lr_scale"].item()) / 2
            level = guard.loss(back)
            weights, opt_state = guard.back_to(back, {"step": s + 1, "loss": loss_v, "level": level, "back_to": back,
                                                      "lr_scale": scale})
            log.warning("loss jumped to %.3g at step %d (%.3g at step %d): back to the weights after step %d at %g x "
                        "the rate", loss_v, s + 1, level, back + 1, back, scale)
            model.load_weights(list(weights.items()), strict=False)
            optimizer.state.update(opt_state)
            optimizer.state["lr_scale"] = mx.array(scale)
            mx.eval(model.trainable_parameters(), optimizer.state)
            run.records = [r for r in run.records if r["step"] <= back]  # the steps from `back` on run again
            s = back
            continue
        guard.finished(s, loss_v)
        rec = {"step": s + 1, "total_steps": total_steps, "epoch": (s + 1) * cfg.grad_accum / plan.per_epoch,
               "loss": loss_v, "lr": lr, "tokens": n_input, "tokens_per_s": n_input / (time.perf_counter() - tic)}
        epoch_end = int((s + 1) * cfg.grad_accum / plan.per_epoch) > int(s * cfg.grad_accum / plan.per_epoch)
        if lead and val_seqs and (epoch_end or s + 1 == total_steps):  # the validation slice chooses among epoch ends
            rec["val_loss"] = _val_loss(model, val_seqs, cfg.batch_size)
            if run.best is None or rec["val_loss"] < run.best["val_loss"]:
                run.best = {"step": s + 1, "val_loss": rec["val_loss"]}
                run.best_adapters = dict(tree_flatten(model.trainable_parameters()))
        run.records.append(rec)
        if lead and ((s + 1) % cfg.save_every == 0 or s + 1 == total_steps):
            adapters = dict(tree_flatten(model.trainable_parameters()))
            lora.write_adapter(out_dir, adapters, adapter_cfg, arch, len(model.layers), cfg)
            write_log()
            arrays = {"adapters": adapters, "optimizer": dict(tree_flatten(optimizer.state))}
            if run.best is not None:
                arrays["best"] = run.best_adapters
            save_checkpoint(ckpt_root, s + 1, arrays, {"step": s + 1, "identity": identity, "log": run.records,
                                                      "best": run.best, "rollbacks": guard.rollbacks})
        on_step(dict(rec))
        s += 1
    model.eval()
    best = run.best
    if lead and best is not None and best["step"] != total_steps:  # an earlier epoch validated better: that adapter
        lora.write_adapter(out_dir, run.best_adapters, adapter_cfg, arch, len(model.layers), cfg)

    steps_run = run.records[start:]
    return {"steps": total_steps, "resumed_from": start, "final_loss": run.records[-1]["loss"] if run.records else None,
            "frozen_blocks_cached": first, "trunk_seconds": trunk_seconds if first else 0.0,
            "trunk_sequences_reused": trunk_reused,
            "train_rows": len(seqs), "validation_rows": len(val_seqs),
            "chosen_step": best["step"] if best is not None else total_steps,
            "val_loss": best["val_loss"] if best is not None else None, "train_seconds": time.perf_counter() - t_run,
            "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steps_run])) if steps_run else None,
            "trainable_params": sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
            "processes": world,
            "flops": train_flops.needed(model, seqs, first if trunk is not None else 0, steps_run, trunk_reused),
            "grad_checkpoint": checkpointed, "estimated_peak_gb": round(estimate / 1e9, 2),
            **guard.summary(),  # the divergence guard's rollbacks
            "max_batch_tokens": plan.max_tokens, "batches_split": plan.split,
            "out_dir": str(out_dir), "adapter_gguf": str(out_dir / "adapter.gguf")}


def _val_loss(model: Model, seqs, batch_size: int) -> float:
    """Token-mean answer loss over a validation set, batches of similar length, dropout off."""
    model.eval()
    order = np.argsort([len(t) for t, _ in seqs], kind="stable")
    total, count = 0.0, 0.0
    for i in range(0, len(order), batch_size):
        batch = map(mx.array, batching.collate(seqs, order[i: i + batch_size]))
        ce_sum, n = _loss(model, *batch, mx.array(1.0))
        total, count = total + ce_sum.item(), count + n.item()
    model.train()
    return total / count


# ----------------------------------------------------------------------------- checks and benchmarks

@_releasing
def adapter_check(model_path, adapter_dir, token_sequences: list[list[int]]) -> dict:
    """How closely llama.cpp with `adapter.gguf` reproduces MLX with the mlx-lm adapter, over all positions:
    kl_mean / kl_max of KL(llama.cpp || MLX) on full-vocab softmax, and top-1 agreement."""
    from .parity import compare_logits, llama_logits_many

    mlx_out = adapter_logits(model_path, adapter_dir, token_sequences)
    ref = np.concatenate(llama_logits_many(model_path, Path(adapter_dir) / "adapter.gguf", token_sequences))
    return compare_logits(ref, mlx_out)


@_releasing
def parity_against(model_path, adapter_dir, token_sequences: list[list[int]], refs: list) -> tuple[dict, dict]:
    """`parity.compare_logits` of llama.cpp's logits with MLX's own, the base alone and then with the mlx-lm adapter
    of `adapter_dir` (one load). `refs`: [base, adapted], each llama.cpp's (T, vocab) logits per sequence; they are
    taken out of `refs` and each sequence's freed once compared, and MLX computes one sequence at a time, so
    the check holds llama.cpp's logits and one sequence of MLX's (not four sets: 1.6 GB at 1B for 4 prompts)."""
    from .parity import position_kl, summarize

    model = load_model(model_path)
    out = []
    for adapted in (False, True):
        if adapted:
            load_adapters(model, str(adapter_dir))
        ref, kls, agrees = refs.pop(0), [], []
        for i, seq in enumerate(token_sequences):
            kl, agree = position_kl(ref[i], logits(model, seq))
            ref[i] = None
            kls.append(kl)
            agrees.append(agree)
        out.append(summarize(np.concatenate(kls), np.concatenate(agrees)))
    return out[0], out[1]


@_releasing
def adapter_logits(model_path, adapter_dir, token_sequences: list[list[int]]) -> np.ndarray:
    """MLX's logits (sum T, vocab) with the mlx-lm adapter of `adapter_dir`, loaded by mlx-lm's own loader."""
    model = load_model(model_path)
    load_adapters(model, str(adapter_dir))  # the layout really is mlx-lm's
    return np.concatenate([logits(model, s) for s in token_sequences])

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
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
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
from .checkpoint import discard_partial, load_latest_checkpoint, save_checkpoint

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

    # ---- plan: every micro-batch of the run, a pure function of (data, seed), so resuming needs only a step
    lengths = np.array([len(t) for t, _ in seqs])
    batches_per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    total_steps = max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))
    plan: list[np.ndarray] = []  # micro-batches (index arrays into seqs), epoch after epoch
    while len(plan) < total_steps * cfg.grad_accum:
        plan += batching.epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch=len(plan) // batches_per_epoch)
    max_tokens = batching.typical_max_tokens(plan, lengths) if cfg.max_batch_tokens == 0 else cfg.max_batch_tokens
    pieces = [batching.split_batch(idx, lengths, max_tokens) for idx in plan]  # what each micro-batch computes
    split = sum(len(v) > 1 for v in pieces)
    if split:
        log.info("%d of %d batches split into pieces of at most %d padded tokens", split, len(plan), max_tokens)

    schedule = _schedule(cfg, total_steps)
    optimizer = None  # the schedule reads the divergence guard's scale from the optimizer's state (a compiled input)

    def scaled(step):
        return schedule(step) * (optimizer.state["lr_scale"] if optimizer is not None else 1.0)

    optimizer = optim.AdamW(learning_rate=scaled, weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())  # before compiling: the state tree must not change shape later
    optimizer.state["lr_scale"] = mx.array(1.0)  # halved at each rollback (`diverged`)

    # ---- resume
    identity = {"config": config.identity("train", cfg),  # the options that change the adapter, declared in config
                "data_sha256": batching.fingerprint(seqs), "val_sha256": batching.fingerprint(val_seqs),
                "init_adapter_sha256": init_sha}
    ckpt_root = out_dir / "checkpoints"
    collectives.same_everywhere("the training examples, options or starting adapter",
                     hashlib.sha256(json.dumps({**identity, "init_adapter_sha256": None}, sort_keys=True).encode()
                                    ).hexdigest(), g)
    if lead:
        discard_partial(ckpt_root)  # leftovers of a killed run: half-written checkpoints and temp files
        for stale in out_dir.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
    records: list[dict] = []
    rollbacks: list[dict] = []  # the divergence guard's, in order (`diverged`)
    start = 0
    best, best_adapters = None, None  # the end-of-epoch adapter with the lowest validation loss so far
    if resume and lead:
        found = load_latest_checkpoint(ckpt_root)
        if found is None:
            log.info("no checkpoint in %s: training from step 0", ckpt_root)
        else:
            arrays, state = found
            _check_same_run(state["identity"], identity, ckpt_root)
            model.load_weights(list(arrays["adapters"].items()), strict=False)
            saved = arrays["optimizer"]  # (a checkpoint older than the guard has no lr_scale: 1.0)
            optimizer.state.update(tree_map_with_path(lambda p, v: saved.get(p, v), optimizer.state))  # in place
            records, start, best = state["log"], state["step"], state.get("best")
            rollbacks = state.get("rollbacks", [])
            if best is not None:
                best_adapters = dict(arrays["best"])
            log.info("resuming from step %d of %d", start, total_steps)
    if world > 1:  # every process starts from rank 0's weights, optimizer state and step
        model.update(collectives.from_rank0(model.trainable_parameters(), g))
        optimizer.state.update(collectives.from_rank0(optimizer.state, g))
        start = int(mx.distributed.all_sum(mx.array(start if lead else 0), group=g).item())

    # ---- frozen trunk: the blocks below the first LoRA block run once per sequence, not once per step
    tic = time.perf_counter()
    first = len(model.layers) - adapter_cfg["num_layers"] if gguf_loader.spec_of(model).trunk_cache else 0
    # every row this process meets in the whole run, also on resume: BLAS rounding depends on which rows share
    # a batch, and the same batches as an uninterrupted run keep a resumed run bit for bit the same
    only = np.concatenate([collectives.shard(idx, rank, world)[0] for idx in plan]) if world > 1 and plan else None
    store = Path(trunk_store) / f"blocks-{first}" if trunk_store is not None and world == 1 else None
    trunk, trunk_reused = frozen.outputs(model, seqs, first, cfg.batch_size,
                                 (on_trunk if on_trunk and lead else lambda done, total: None),
                                 only=only, store=store) if first > 0 else (None, 0)
    trunk_seconds = time.perf_counter() - tic
    if trunk is None:
        first = 0
    else:
        log.info("outputs of the %d frozen blocks cached for %d sequences in %.1f s", first, len(seqs), trunk_seconds)

    # ---- memory: recompute activations in the backward pass by itself when the step would pass the budget
    budget = cfg.memory_budget * 1e9 if cfg.memory_budget > 0 else 0.5 * ram_bytes()
    held = rss_mb() * 1e6

    def estimate_with(checkpoint: bool) -> float:  # the largest piece any process computes
        return held + max(lora.activation_bytes(model.args, -(-len(q) // world), batching.padded_length(lengths[q]),
                                           len(model.layers) - first, checkpoint=checkpoint)
                          for v in pieces for q in v)

    estimate = estimate_with(cfg.grad_checkpoint)
    checkpointed = "on" if cfg.grad_checkpoint else "off"
    if not cfg.grad_checkpoint and budget and estimate > budget:
        lora.checkpoint_blocks(model)
        checkpointed = f"auto: estimated peak {estimate / 1e9:.1f} GB > budget {budget / 1e9:.1f} GB"
        estimate = estimate_with(True)
        log.info("gradient checkpointing on (%s; %.1f GB with it)", checkpointed, estimate / 1e9)

    # ---- one compiled step: forward + backward (+ optimizer update on the last micro-batch)
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

    def write_log():
        atomic_write_text(out_dir / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def give_up(weights: dict, message: str):
        """Keep `weights` as the adapter and the log so far, then stop with `message`."""
        if lead:
            lora.write_adapter(out_dir, weights, adapter_cfg, arch, len(model.layers), cfg)
            write_log()
        raise UserError(message)

    model.train()
    # {step: [LoRA weights, optimizer state, the step's loss]} at the start of the last KEPT_STEPS steps: references,
    # not copies (MLX arrays are immutable), for NaN recovery and the divergence guard's rollback; every process
    # holds the same (the loss is summed over processes), so all of them roll back together
    kept: dict[int, list] = {}
    t_run = time.perf_counter()
    s = start
    while s < total_steps:
        tic = time.perf_counter()
        kept[s] = [dict(tree_flatten(model.trainable_parameters())), tree_map(lambda x: x, optimizer.state), None]
        kept = {k: v for k, v in kept.items() if k > s - KEPT_STEPS}
        mx.random.seed(cfg.seed * 1_000_003 + s)  # dropout masks: a function of (seed, step), so resuming needs no RNG state
        step_plan = plan[s * cfg.grad_accum: (s + 1) * cfg.grad_accum]
        n_answer = float(sum(batching.collate(seqs, idx)[3].sum() for idx in step_plan))  # the whole step's
        if n_answer == 0:
            raise UserError(f"Training batch {s + 1} has no answer tokens to learn from; check that answers are not empty.")
        n_input = sum(int(len(seqs[i][0]) - 1) for idx in step_plan for i in idx)
        micro = []
        for idx in (q for v in pieces[s * cfg.grad_accum: (s + 1) * cfg.grad_accum] for q in v):
            if world > 1:  # this process's rows of the micro-batch
                idx, idle = collectives.shard(idx, rank, world)
            b = batching.collate(seqs, idx)
            if world > 1 and idle:
                b = (*b[:3], np.zeros_like(b[3]))
            if trunk is not None:  # token ids -> the cached hidden states they lead to
                b = (frozen.padded(trunk, idx, b[0].shape[1]), *b[1:])
            micro.append(b)
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
            give_up(kept[max(s - 1, min(kept))][0],
                    f"Training loss became {loss_v} at step {s + 1} of {total_steps} (lr {lr:.2e}); the adapter "
                    f"as it was after step {max(s - 1, 0)} (the last finite loss) is saved in {out_dir}. "
                    f"Lower the learning rate (now {cfg.lr:g}) or set grad_clip.")
        # a step's loss measures the weights it started from: the kept steps' losses, this one's beside them
        losses = {k: v[2] for k, v in kept.items() if k < s}
        if losses and diverged(loss_v, list(losses.values())) is not None:
            back = min(losses, key=losses.get)  # the kept start whose loss was lowest: from there at half the rate
            # the rate's scale counts the rollbacks so far, on every process alike (resumed, it came from rank 0)
            if optimizer.state["lr_scale"].item() <= 0.5 ** MAX_ROLLBACKS:
                give_up(kept[back][0],
                        f"Training diverged at step {s + 1} of {total_steps}: loss {loss_v:.3g} against "
                        f"{losses[back]:.3g} at step {back + 1}, after {MAX_ROLLBACKS} rollbacks at halved rates (now "
                        f"lr {lr:.2e}); the adapter as it was after step {back} is saved in {out_dir}. Lower the "
                        f"learning rate (now {cfg.lr:g}) or the LoRA scale ({cfg.scale:g}).")
            rollbacks.append({"step": s + 1, "loss": loss_v, "level": losses[back], "back_to": back,
                              "lr_scale": float(optimizer.state["lr_scale"].item()) / 2})
            log.warning("loss jumped to %.3g at step %d (%.3g at step %d): back to the weights after step %d at %g x "
                        "the rate", loss_v, s + 1, losses[back], back + 1, back, rollbacks[-1]["lr_scale"])
            weights, opt_state, _ = kept[back]
            model.load_weights(list(weights.items()), strict=False)
            optimizer.state.update(opt_state)
            optimizer.state["lr_scale"] = mx.array(rollbacks[-1]["lr_scale"])
            mx.eval(model.trainable_parameters(), optimizer.state)
            records = [r for r in records if r["step"] <= back]  # the steps from `back` on run again
            kept = {k: v for k, v in kept.items() if k < back}
            s = back
            continue
        kept[s][2] = loss_v
        rec = {"step": s + 1, "total_steps": total_steps, "epoch": (s + 1) * cfg.grad_accum / batches_per_epoch,
               "loss": loss_v, "lr": lr, "tokens": n_input, "tokens_per_s": n_input / (time.perf_counter() - tic)}
        epoch_end = int((s + 1) * cfg.grad_accum / batches_per_epoch) > int(s * cfg.grad_accum / batches_per_epoch)
        if lead and val_seqs and (epoch_end or s + 1 == total_steps):  # the validation slice chooses among epoch ends
            rec["val_loss"] = _val_loss(model, val_seqs, cfg.batch_size)
            if best is None or rec["val_loss"] < best["val_loss"]:
                best = {"step": s + 1, "val_loss": rec["val_loss"]}
                best_adapters = dict(tree_flatten(model.trainable_parameters()))
        records.append(rec)
        if lead and ((s + 1) % cfg.save_every == 0 or s + 1 == total_steps):
            adapters = dict(tree_flatten(model.trainable_parameters()))
            lora.write_adapter(out_dir, adapters, adapter_cfg, arch, len(model.layers), cfg)
            write_log()
            arrays = {"adapters": adapters, "optimizer": dict(tree_flatten(optimizer.state))}
            if best is not None:
                arrays["best"] = best_adapters
            save_checkpoint(ckpt_root, s + 1, arrays, {"step": s + 1, "identity": identity, "log": records, "best": best,
                                                      "rollbacks": rollbacks})
        on_step(dict(rec))
        s += 1
    model.eval()
    if lead and best is not None and best["step"] != total_steps:  # an earlier epoch validated better: that is the adapter
        lora.write_adapter(out_dir, best_adapters, adapter_cfg, arch, len(model.layers), cfg)

    steps_run = [r for r in records[start:]]
    return {"steps": total_steps, "resumed_from": start, "final_loss": records[-1]["loss"] if records else None,
            "frozen_blocks_cached": first, "trunk_seconds": trunk_seconds if first else 0.0,
            "trunk_sequences_reused": trunk_reused,
            "train_rows": len(seqs), "validation_rows": len(val_seqs),
            "chosen_step": best["step"] if best is not None else total_steps,
            "val_loss": best["val_loss"] if best is not None else None, "train_seconds": time.perf_counter() - t_run,
            "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steps_run])) if steps_run else None,
            "trainable_params": sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
            "processes": world, "flops": train_flops.needed(model, seqs, first if trunk is not None else 0, steps_run, trunk_reused),
            "grad_checkpoint": checkpointed, "estimated_peak_gb": round(estimate / 1e9, 2),
            # the divergence guard's rollbacks: how many, and each in a phrase (the CLI's table and the report show it)
            "rollbacks": len(rollbacks),
            "rollback_steps": "; ".join(f"step {r['step']}: loss {r['loss']:.3g} against {r['level']:.3g}, then lr "
                                        f"x{r['lr_scale']:g}" for r in rollbacks),
            "max_batch_tokens": max_tokens, "batches_split": split,
            "out_dir": str(out_dir), "adapter_gguf": str(out_dir / "adapter.gguf")}


DIVERGE_RATIO, DIVERGE_MARGIN = 4.0, 2.0  # a loss this many times its running floor, and this many nats above it
KEPT_STEPS = 3  # the steps whose starting weights a rollback can return to
MAX_ROLLBACKS = 3


def diverged(loss: float, before: list[float]) -> float | None:
    """The running floor (the lowest of the recent step losses `before`) where `loss` jumped far above it, else
    None. A real 1.5B model at the default lr went 0.46, 0.2, 0.11, then 13.5 at the first step at the peak
    rate, and ended at 3.5 answering one letter everywhere; SmolLM2 at lr 1e-2 went 2.06, 9.1, 42. A batch's
    mean answer loss more than 2 nats above the floor is the batch mostly wrong with confidence, not noise."""
    if not before:
        return None
    floor = float(min(before))
    return floor if loss > DIVERGE_RATIO * floor and loss > floor + DIVERGE_MARGIN else None


RUNTIME_BYTES = 600e6  # Python, MLX and llama.cpp's libraries, the tokenizer: what a training process holds besides


def memory_check(model_path, examples: list[Example], cfg: TrainConfig, ram: int | None = None) -> dict:
    """Before anything loads or is written: the peak a training of `examples` needs on this machine (the base as
    `cfg.frozen_base` holds it, the LoRA blocks' activations with gradient checkpointing, the frozen trunk's
    cached outputs, one slice of float32 weights in each direction), or a one-line `UserError` naming what would
    fit (fewer LoRA blocks, a shorter --max-seq-len) where this machine's RAM cannot hold it."""
    from types import SimpleNamespace

    from . import quantized

    ram = ram_bytes() if ram is None else ram
    held, fields = gguf_loader.held_bytes(model_path, cfg.frozen_base, gpu=mx.default_device().type == mx.DeviceType.gpu)
    args = SimpleNamespace(**fields)
    n_blocks = args.num_hidden_layers

    def need(num_layers: int, max_len: int) -> float:
        blocks = n_blocks if num_layers == -1 else min(num_layers, n_blocks)
        lengths = sorted(min(len(p) + len(a), max_len) - 1 for p, a in examples)[-cfg.batch_size:] or [0]
        acts = lora.activation_bytes(args, len(lengths), batching.padded_length(np.array(lengths)), blocks,
                                     checkpoint=True)
        trunk = min(frozen.TRUNK_CACHE_BYTES, 4.0 * args.hidden_size * sum(min(len(p) + len(a), max_len)
                                                                          for p, a in examples))
        # LoRA weights and AdamW's two moments, live and at the start of each kept step (the divergence guard's)
        lora_state = (KEPT_STEPS + 1) * 3 * 4.0 * lora.trainable_count(args, blocks, cfg.rank)
        return held + acts + (trunk if blocks < n_blocks else 0) + 2 * quantized.CHUNK_BYTES + RUNTIME_BYTES + lora_state

    want = need(cfg.num_layers, cfg.max_seq_len)
    out = {"estimated_peak_gb": round(want / 1e9, 2), "estimated_peak_bytes": int(want), "base_gb": round(held / 1e9, 2),
           "ram_gb": round(ram / 1e9, 1)}
    if not ram or want <= ram:
        return out
    fits = [n for n in range(min(cfg.num_layers if cfg.num_layers > 0 else n_blocks, n_blocks) - 1, 0, -1)
            if need(n, cfg.max_seq_len) <= ram]
    lens = [m for m in (256, 128, 64) if m < cfg.max_seq_len and need(cfg.num_layers, m) <= ram]
    hint = (f"--num-layers {fits[0]}" if fits else "") + (" or " if fits and lens else "") + \
        (f"--max-seq-len {lens[0]}" if lens else "")
    if cfg.frozen_base == "f32" and not hint:
        kept = memory_check(model_path, examples, dataclasses.replace(cfg, frozen_base="file"), ram=0)
        if kept["estimated_peak_bytes"] <= ram:
            hint = f"--frozen-base file (about {kept['estimated_peak_gb']:.1f} GB)"
    raise UserError(f"{model_path}: training needs about {want / 1e9:.1f} GB (the base {held / 1e9:.1f} GB as "
                    f"{'the file holds it' if cfg.frozen_base == 'file' else 'float32'}), more than this machine's "
                    f"{ram / 1e9:.1f} GB of RAM; " + (f"try {hint}" if hint else "pick a smaller model file"))


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


def _check_same_run(saved: dict, now: dict, root: Path) -> None:
    diffs = [f"{k}: {saved['config'].get(k)!r} -> {v!r}" for k, v in now["config"].items() if saved["config"].get(k) != v]
    if saved["data_sha256"] != now["data_sha256"]:
        diffs.append("the training examples differ")
    if saved["val_sha256"] != now["val_sha256"]:
        diffs.append("the validation examples differ")
    if saved.get("init_adapter_sha256") != now["init_adapter_sha256"]:
        diffs.append("the starting adapter differs")
    if diffs:
        raise UserError(f"Cannot resume from {root}: the checkpoint was made by a different run ({'; '.join(diffs)}). "
                        "Resume with the same settings and data, or use a new output directory.")


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

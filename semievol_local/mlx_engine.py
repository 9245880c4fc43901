"""MLX engine: train LoRA on a GGUF's own weights (loaded into an mlx-lm model), export for llama.cpp.

One GGUF, two engines: MLX trains directly on the GGUF's tensors (no conversion; `gguf_loader` builds the
mlx-lm model of the file's architecture on the rope convention of its Q/K rows: llama-family files store them permuted for
llama.cpp's interleaved rope, and the model is built for that layout, so nothing is un-permuted), and the
adapter is written twice: in mlx-lm's layout (`adapters.safetensors` + `adapter_config.json`) and as a
llama.cpp GGUF LoRA adapter (`adapter.gguf`) that `Llama(lora_path=...)` loads as-is.

Helpers it leans on: `gguf_loader` (the architecture table and the loader, which swaps in `mlx_fast`'s
CPU-friendly layers where the table allows), `batching` (examples -> padded NumPy batches), `checkpoint` (verified resumable checkpoints), `adapter_gguf` (names
and the llama.cpp adapter writer), `parity` (llama.cpp's logits, for `adapter_check`).

What it does NOT do: no prompts, chat templates or tokenization (callers pass token ids, tokenized by
llama.cpp so both engines see identical ids); no printing or progress drawing (it logs, and hands a
dict to `on_step` every optimizer step); no llama.cpp inference of its own.
"""
from __future__ import annotations

from .blas import ensure_fast_blas, gemm_gflops, tune_malloc, untune_malloc

ensure_fast_blas()  # must run before the first `import mlx.core` (blas.py says why)

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_map_with_path  # noqa: E402
from mlx.nn import Module as Model  # noqa: E402  any mlx-lm model class of gguf_loader's table
from mlx_lm.models.base import create_attention_mask  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402

from . import adapter_gguf as ag  # noqa: E402
from . import batching, config, gguf_loader  # noqa: E402
from .files import atomic_target  # noqa: E402
from .batching import Example  # noqa: E402
from .checkpoint import discard_partial, load_latest_checkpoint, save_checkpoint  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .errors import UserError  # noqa: E402
from .files import atomic_write_text, sha256_file  # noqa: E402
from .runfolder import ram_bytes, rss_mb  # noqa: E402

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- loading (gguf_loader)

load_model = gguf_loader.load_model  # the GGUF -> mlx-lm model loader, with the architecture table


def logits(model: Model, token_ids: list[int]) -> np.ndarray:
    """Next-token logits at every position, (T, vocab) float32."""
    out = model(mx.array([list(token_ids)], dtype=mx.int32))[0]  # (T, vocab)
    return np.array(out.astype(mx.float32))


_lm_head = gguf_loader.lm_head


# ----------------------------------------------------------------------------- LoRA

def apply_lora(model: Model, cfg: TrainConfig) -> dict:
    """Freeze the base and put mlx-lm LoRA layers on the chosen projections; return mlx-lm's adapter config."""
    keys = [k.strip() for k in cfg.keys.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ag.LORA_TARGETS]
    if unknown or not keys:
        raise UserError(f"LoRA keys {unknown or cfg.keys!r} are not projections of this model; "
                        f"choose from {','.join(ag.LORA_TARGETS)}.")
    n_blocks = len(model.layers)
    if cfg.num_layers == 0 or cfg.num_layers < -1:
        raise UserError(f"Requested LoRA on {cfg.num_layers} blocks; use a number from 1 (the last block) "
                        f"up, or -1 for all {n_blocks}.")
    num_layers = n_blocks if cfg.num_layers == -1 else min(cfg.num_layers, n_blocks)  # a small model: all
    lora = {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout, "keys": [ag.LORA_TARGETS[k] for k in keys]}
    mx.random.seed(cfg.seed)  # LoRA A init
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora}


_CHECKPOINTED: dict[type, type] = {}


def checkpoint_blocks(model: Model) -> None:
    """Keep only each transformer block's input for the backward pass and recompute the rest (mlx-lm's
    grad_checkpoint, but per model instance: the block's class is swapped, not patched). Activation memory
    drops from every block's intermediates to one block's; a step costs about one more forward pass."""
    for layer in model.layers:
        base = type(layer)
        if base not in _CHECKPOINTED:
            def call(self, x, *args, _base_call=base.__call__, **kwargs):
                def block(params, x):
                    self.update(params)
                    return _base_call(self, x, *args, **kwargs)
                return mx.checkpoint(block)(self.trainable_parameters(), x)

            _CHECKPOINTED[base] = type(f"Checkpointed{base.__name__}", (base,), {"__call__": call})
        layer.__class__ = _CHECKPOINTED[base]


def activation_bytes(args, batch: int, length: int, blocks: int, checkpoint: bool = False) -> float:
    """Estimated bytes a training step keeps for its backward pass: per token and block, float32 copies of
    about 10 hidden-size vectors, 4 MLP-width ones and 3 rows of attention weights (fits 57-59 KB per
    token and block measured for SmolLM2: 30 blocks x 8 x 163 tokens -> 2.3 GB; 16 x 8 x 177 -> 1.3 GB).
    With checkpointing: each block's input, plus one block's worth."""
    d = args.hidden_size
    f = getattr(args, "intermediate_size", 4 * d)
    h = args.num_attention_heads
    per_token_block = 4.0 * (10 * d + 4 * f + 3 * h * length)
    tokens = batch * length
    if checkpoint:
        return tokens * (4.0 * d * blocks + per_token_block)
    return tokens * per_token_block * blocks


def _export(out_dir: Path, flat: dict[str, mx.array], adapter_cfg: dict, arch: str, n_blocks: int,
            cfg: TrainConfig) -> None:
    """Write the adapter in both layouts from flat trainable params ('model.layers.3.self_attn.q_proj.lora_a')."""
    with atomic_target(out_dir / "adapters.safetensors") as tmp:
        mx.save_safetensors(str(tmp), flat)
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(adapter_cfg, indent=2))
    pairs = {}
    for name in flat:
        if name.endswith(".lora_a"):
            mod = name[: -len(".lora_a")]
            pairs[mod] = (np.array(flat[name]), np.array(flat[mod + ".lora_b"]))  # (in, r), (r, out)
    ag.write_lora_gguf(out_dir / "adapter.gguf", arch, n_blocks, pairs, scale=cfg.scale, rank=cfg.rank)


def _blocks(model: Model, h: mx.array, first: int, last: int) -> mx.array:
    """Blocks first..last-1 on hidden states (B, L, D), causal, no KV cache (right padding is never seen)."""
    mask = create_attention_mask(h, None)  # as mlx-lm's LlamaModel: "causal", or None for one position
    for layer in model.model.layers[first:last]:
        h = layer(h, mask, cache=None)
    return h


def _loss(model: Model, inputs, pos, targets, mask, norm, first: int = 0):
    """Summed answer-token cross-entropy divided by `norm` (the optimizer step's answer-token count, so
    micro-batch gradients add up to the token mean). Like mlx-lm's default_loss, but the vocab projection
    runs only at answer positions: for short answers that skips most of the largest matmul.
    `first` > 0: `inputs` are the cached outputs of block first-1 (B, L, D), not token ids (see `_trunk`)."""
    if first == 0:
        h = model.model(inputs)  # (B, L, D)
    else:
        h = model.model.norm(_blocks(model, inputs, first, len(model.model.layers)))  # (B, L, D)
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

TRUNK_CACHE_BYTES = 2 * 1024**3  # the most the frozen blocks' outputs may take; beyond it they are recomputed


def _trunk(model: Model, seqs: list[batching.Seq], first: int, batch_size: int,
           on_progress: Callable[[int, int], None] = lambda done, total: None,
           only: np.ndarray | None = None, store: Path | None = None) -> tuple[list[np.ndarray] | None, int]:
    """The output of blocks 0..first-1 for every sequence's inputs (or the sequences `only`; the others
    get None), (len - 1, D) float32 each, or None when they would take more than TRUNK_CACHE_BYTES; and
    how many were read from `store`.

    Blocks below the first LoRA block are frozen and see no LoRA below them, so their output for a
    sequence never changes during training: computed once here, each step then runs (forward and
    backward) only the blocks that have LoRA. Right padding and causal attention make each row's valid
    positions independent of the batch it is computed in, up to rounding (BLAS sums in an order that
    depends on the shapes: a resumed run groups the same rows as an uninterrupted one).

    `store`: a folder of outputs by token sequence (one .npy each, for this model and `first`); sequences
    found there are read, not computed, and those computed are added (the final fine-tune reuses the
    warm-up's labeled rows)."""
    dim = model.args.hidden_size
    want = np.arange(len(seqs)) if only is None else np.unique(only)
    if sum(len(seqs[i][0]) - 1 for i in want) * dim * 4 > TRUNK_CACHE_BYTES:
        log.info("frozen blocks' outputs exceed %d bytes: recomputed every step", TRUNK_CACHE_BYTES)
        return None, 0
    out: list[np.ndarray | None] = [None] * len(seqs)

    def stored(i: int) -> Path:
        return store / (hashlib.sha256(np.asarray(seqs[i][0][:-1], np.int64).tobytes()).hexdigest()[:32] + ".npy")

    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        for i in want:
            try:
                h = np.load(stored(i))
                if h.shape == (len(seqs[i][0]) - 1, dim) and h.dtype == np.float32:
                    out[i] = h
            except (OSError, ValueError):
                pass  # absent or damaged: computed again
    todo = np.array([i for i in want if out[i] is None], dtype=np.int64)
    reused = len(want) - len(todo)
    order = todo[np.argsort([len(seqs[i][0]) for i in todo], kind="stable")]  # similar lengths together: little padding
    if reused:
        log.info("frozen blocks' outputs of %d sequences read from %s", reused, store)
        on_progress(reused, len(want))
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        inputs = mx.array(batching.collate(seqs, idx)[0])  # (B, L)
        h = _blocks(model, model.model.embed_tokens(inputs), 0, first)  # (B, L, D)
        mx.eval(h)
        h = np.array(h, dtype=np.float32)
        for r, j in enumerate(idx):
            out[j] = h[r, : len(seqs[j][0]) - 1]
            if store is not None:
                with atomic_target(stored(j)) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, out[j])
        on_progress(reused + i + len(idx), len(want))
    return out, reused


# ----------------------------------------------------------------------------- data parallel (mx.distributed)

def group():
    """The MLX distributed group of this process: rank 0 of 1 unless started as one rank of several
    (`--train-hosts`, `mlx.launch`; MLX's `ring` backend, over TCP)."""
    return mx.distributed.init()


def _shard(idx: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, bool]:
    """This process's rows of a micro-batch (every world-th row from its rank), and whether it has none
    (then it computes the first row with its mask zeroed: a zero gradient, but the same collective calls)."""
    mine = idx[rank::world]
    return (mine, False) if len(mine) else (idx[:1], True)


def _all_sum(tree, g):
    """The sum of a tree of arrays over every process, in one collective call (one flat buffer)."""
    flat = tree_flatten(tree)
    if g.size() == 1 or not flat:
        return tree
    buf = mx.distributed.all_sum(mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in flat]), group=g)
    pieces, at = {}, 0
    for k, v in flat:
        pieces[k] = buf[at: at + v.size].reshape(v.shape).astype(v.dtype)
        at += v.size
    return tree_map_with_path(lambda path, _: pieces[path], tree)


def _from_rank0(tree, g):
    """Rank 0's values of a tree of arrays, on every process (a broadcast written as a sum)."""
    if g.size() == 1:
        return tree
    return _all_sum(tree if g.rank() == 0 else tree_map(mx.zeros_like, tree), g)


def _same_everywhere(what: str, value: str, g) -> None:
    """Refuse to train when another process holds different `value` (a digest): every host must train on
    the same examples, settings and starting point, or the averaged gradient means nothing."""
    if g.size() == 1:
        return
    mine = mx.array([int(value[i: i + 6], 16) for i in range(0, 36, 6)], dtype=mx.int32)
    total = mx.distributed.all_sum(mine, group=g)
    if not mx.array_equal(total, mine * g.size()).item():
        raise UserError(f"rank {g.rank()} of {g.size()}: {what} differ between the processes; every host needs "
                        "the same model, data and options (the same files at the same paths)")


def _trunk_batch(trunk: list[np.ndarray], idx, length: int) -> np.ndarray:
    """Cached trunk outputs of the sequences `idx`, right-padded with zeros to `length`: (B, L, D)."""
    h = np.zeros((len(idx), length, trunk[idx[0]].shape[1]), np.float32)
    for r, i in enumerate(idx):
        h[r, : len(trunk[i])] = trunk[i]
    return h


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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = group()
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
    model = load_model(model_path)
    adapter_cfg = apply_lora(model, cfg)
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    init_sha = _load_init_adapter(model, Path(init_adapter)) if init_adapter is not None and lead else None
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

    optimizer = optim.AdamW(learning_rate=_schedule(cfg, total_steps), weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())  # before compiling: the state tree must not change shape later

    # ---- resume
    identity = {"config": config.identity("train", cfg),  # the options that change the adapter, declared in config
                "data_sha256": batching.fingerprint(seqs), "val_sha256": batching.fingerprint(val_seqs),
                "init_adapter_sha256": init_sha}
    ckpt_root = out_dir / "checkpoints"
    _same_everywhere("the training examples, options or starting adapter",
                     hashlib.sha256(json.dumps({**identity, "init_adapter_sha256": None}, sort_keys=True).encode()
                                    ).hexdigest(), g)
    if lead:
        discard_partial(ckpt_root)  # leftovers of a killed run: half-written checkpoints and temp files
        for stale in out_dir.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
    records: list[dict] = []
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
            saved = arrays["optimizer"]
            optimizer.state.update(tree_map_with_path(lambda p, _: saved[p], optimizer.state))  # in place
            records, start, best = state["log"], state["step"], state.get("best")
            if best is not None:
                best_adapters = dict(arrays["best"])
            log.info("resuming from step %d of %d", start, total_steps)
    if world > 1:  # every process starts from rank 0's weights, optimizer state and step
        model.update(_from_rank0(model.trainable_parameters(), g))
        optimizer.state.update(_from_rank0(optimizer.state, g))
        start = int(mx.distributed.all_sum(mx.array(start if lead else 0), group=g).item())

    # ---- frozen trunk: the blocks below the first LoRA block run once per sequence, not once per step
    tic = time.perf_counter()
    first = len(model.layers) - adapter_cfg["num_layers"] if gguf_loader.spec_of(model).trunk_cache else 0
    # every row this process meets in the whole run, also on resume: BLAS rounding depends on which rows share
    # a batch, and the same batches as an uninterrupted run keep a resumed run bit for bit the same
    only = np.concatenate([_shard(idx, rank, world)[0] for idx in plan]) if world > 1 and plan else None
    store = Path(trunk_store) / f"blocks-{first}" if trunk_store is not None and world == 1 else None
    trunk, trunk_reused = _trunk(model, seqs, first, cfg.batch_size,
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
        return held + max(activation_bytes(model.args, -(-len(q) // world), batching.padded_length(lengths[q]),
                                           len(model.layers) - first, checkpoint=checkpoint)
                          for v in pieces for q in v)

    estimate = estimate_with(cfg.grad_checkpoint)
    checkpointed = "on" if cfg.grad_checkpoint else "off"
    if not cfg.grad_checkpoint and budget and estimate > budget:
        checkpoint_blocks(model)
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
            grad = _all_sum(grad, g)  # data parallel: the whole step's gradient (a no-op in one process)
            if cfg.grad_clip > 0:
                grad, _ = optim.clip_grad_norm(grad, cfg.grad_clip)
            optimizer.update(model, grad)
            grad = None
        return loss, grad

    def write_log():
        atomic_write_text(out_dir / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    model.train()
    good = prev_good = dict(tree_flatten(model.trainable_parameters()))
    t_run = time.perf_counter()
    for s in range(start, total_steps):
        tic = time.perf_counter()
        # references, not copies (MLX arrays are immutable): the weights of the last two steps, for NaN recovery
        prev_good, good = good, dict(tree_flatten(model.trainable_parameters()))
        mx.random.seed(cfg.seed * 1_000_003 + s)  # dropout masks: a function of (seed, step), so resuming needs no RNG state
        step_plan = plan[s * cfg.grad_accum: (s + 1) * cfg.grad_accum]
        n_answer = float(sum(batching.collate(seqs, idx)[3].sum() for idx in step_plan))  # the whole step's
        if n_answer == 0:
            raise UserError(f"Training batch {s + 1} has no answer tokens to learn from; check that answers are not empty.")
        n_input = sum(int(len(seqs[i][0]) - 1) for idx in step_plan for i in idx)
        micro = []
        for idx in (q for v in pieces[s * cfg.grad_accum: (s + 1) * cfg.grad_accum] for q in v):
            if world > 1:  # this process's rows of the micro-batch
                idx, idle = _shard(idx, rank, world)
            b = batching.collate(seqs, idx)
            if world > 1 and idle:
                b = (*b[:3], np.zeros_like(b[3]))
            if trunk is not None:  # token ids -> the cached hidden states they lead to
                b = (_trunk_batch(trunk, idx, b[0].shape[1]), *b[1:])
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
        if not math.isfinite(loss_v):
            if lead:
                _export(out_dir, prev_good, adapter_cfg, arch, len(model.layers), cfg)
                write_log()
            raise UserError(f"Training loss became {loss_v} at step {s + 1} of {total_steps} (lr {lr:.2e}); the adapter "
                            f"as it was after step {max(s - 1, 0)} (the last finite loss) is saved in {out_dir}. "
                            f"Lower the learning rate (now {cfg.lr:g}) or set grad_clip.")
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
            _export(out_dir, adapters, adapter_cfg, arch, len(model.layers), cfg)
            write_log()
            arrays = {"adapters": adapters, "optimizer": dict(tree_flatten(optimizer.state))}
            if best is not None:
                arrays["best"] = best_adapters
            save_checkpoint(ckpt_root, s + 1, arrays, {"step": s + 1, "identity": identity, "log": records, "best": best})
        on_step(dict(rec))
    model.eval()
    if lead and best is not None and best["step"] != total_steps:  # an earlier epoch validated better: that is the adapter
        _export(out_dir, best_adapters, adapter_cfg, arch, len(model.layers), cfg)

    steps_run = [r for r in records[start:]]
    return {"steps": total_steps, "resumed_from": start, "final_loss": records[-1]["loss"] if records else None,
            "frozen_blocks_cached": first, "trunk_seconds": trunk_seconds if first else 0.0,
            "trunk_sequences_reused": trunk_reused,
            "train_rows": len(seqs), "validation_rows": len(val_seqs),
            "chosen_step": best["step"] if best is not None else total_steps,
            "val_loss": best["val_loss"] if best is not None else None, "train_seconds": time.perf_counter() - t_run,
            "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steps_run])) if steps_run else None,
            "trainable_params": sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
            "processes": world, "flops": _flops(model, seqs, first if trunk is not None else 0, steps_run, trunk_reused),
            "grad_checkpoint": checkpointed, "estimated_peak_gb": round(estimate / 1e9, 2),
            "max_batch_tokens": max_tokens, "batches_split": split,
            "out_dir": str(out_dir), "adapter_gguf": str(out_dir / "adapter.gguf")}


def _load_init_adapter(model: Model, adapter_dir: Path) -> str:
    """Load LoRA weights written by `train` as the starting point; return the file's sha256 (for resume)."""
    f = adapter_dir / "adapters.safetensors" if adapter_dir.is_dir() else adapter_dir
    if not f.is_file():
        raise UserError(f"{adapter_dir}: no adapters.safetensors to start training from.")
    weights = mx.load(str(f))
    params = dict(tree_flatten(model.trainable_parameters()))
    misfit = sorted(set(params) ^ set(weights)) + [k for k in weights if k in params and weights[k].shape != params[k].shape]
    if misfit:
        raise UserError(f"{f}: this adapter does not fit this run's LoRA settings (rank, keys, num_layers), "
                        f"e.g. {misfit[0]}. Train with the settings it was made with.")
    model.load_weights(list(weights.items()), strict=False)
    return sha256_file(f)


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

def block_weights(layers) -> list[int]:
    """Elements of each block's weight matrices, block by block: what a token's matmuls multiply (2 FLOPs
    each, forward). LoRA's own matrices are left out (rank 8: a few per mille of a block); a matrix kept
    quantized (on a GPU) counts at its logical shape; norms and biases (vectors, no matmul) count nothing."""
    out = []
    for layer in layers:
        n = 0
        for _, m in layer.named_modules():  # a LoRA layer is no Linear: it holds the frozen one as `.linear`
            if isinstance(m, nn.QuantizedLinear):  # packed: 32 / bits weights per uint32
                n += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
            elif isinstance(m, nn.Linear):
                n += m.weight.size
        out.append(int(n))
    return out


def train_flops(per_block: list[int], lora_blocks: int, vocab_weights: int, *, trunk_cached: bool,
                trunk_tokens: float, step_tokens: float, answer_tokens: float) -> float:
    """The matmul FLOPs a LoRA training needs (no I/O): the frozen blocks below the first LoRA block, 2 x
    their weights per token they run forward on (once per sequence, `trunk_tokens`, when their outputs are
    cached; else in every step, `step_tokens`); the LoRA blocks, 4 x their weights per step token (forward,
    and backward to the activations: frozen weights get no gradient); the vocabulary projection, 4 x
    `vocab_weights` (vocab x hidden) per answer token (forward and backward to the activations; it runs only
    where the loss is). The embedding lookup costs nothing; attention, LoRA's own matrices, the optimizer and
    the forward pass that gradient checkpointing repeats are left out (small, or work no training needs)."""
    frozen = sum(per_block[:len(per_block) - lora_blocks])
    trained = sum(per_block[len(per_block) - lora_blocks:])
    return float(2 * frozen * (trunk_tokens if trunk_cached else step_tokens) + 4 * trained * step_tokens
                 + 4 * vocab_weights * answer_tokens)


def _lora_blocks(layers) -> int:
    """How many blocks, counted from the last, carry LoRA (the blocks `apply_lora` converted)."""
    with_lora = [i for i, layer in enumerate(layers) if any("lora" in k for k, _ in tree_flatten(layer.parameters()))]
    return len(layers) - with_lora[0] if with_lora else 0


def _flops(model: Model, seqs, first: int, steps_run: list[dict], reused: int = 0) -> float:
    """The matmul FLOPs this training needed (`train_flops`; the yardstick of `bench run`'s fraction), for the
    steps run and, when `first` > 0 (the frozen blocks' outputs cached), one trunk pass over the sequences not
    read back from a trunk store (`reused` of them were: their share of the tokens is left out, an estimate).
    Answer tokens are the steps' input tokens times the training set's share of answer tokens, exact over
    whole epochs."""
    layers = model.model.layers
    inputs = sum(len(s[0]) - 1 for s in seqs)
    computed = inputs * (len(seqs) - reused) / len(seqs) if seqs else 0
    answers = sum(len(s[0]) - s[1] for s in seqs)
    step_tokens = sum(r.get("tokens", 0) for r in steps_run)
    a = model.args
    return train_flops(block_weights(layers), _lora_blocks(layers), a.vocab_size * a.hidden_size,
                       trunk_cached=first > 0, trunk_tokens=computed, step_tokens=step_tokens,
                       answer_tokens=step_tokens * answers / inputs if inputs else 0)


@_releasing
def adapter_check(model_path, adapter_dir, token_sequences: list[list[int]]) -> dict:
    """How closely llama.cpp with `adapter.gguf` reproduces MLX with the mlx-lm adapter, over all positions:
    kl_mean / kl_max of KL(llama.cpp || MLX) on full-vocab softmax, and top-1 agreement."""
    from .parity import compare_logits, llama_logits_many

    mlx_out = adapter_logits(model_path, adapter_dir, token_sequences)
    ref = np.concatenate(llama_logits_many(model_path, Path(adapter_dir) / "adapter.gguf", token_sequences))
    return compare_logits(ref, mlx_out)


@_releasing
def adapter_logits(model_path, adapter_dir, token_sequences: list[list[int]]) -> np.ndarray:
    """MLX's logits (sum T, vocab) with the mlx-lm adapter of `adapter_dir`, loaded by mlx-lm's own loader."""
    model = load_model(model_path)
    load_adapters(model, str(adapter_dir))  # the layout really is mlx-lm's
    return np.concatenate([logits(model, s) for s in token_sequences])


def bench_train(model_path, steps: int = 8, *, batch_size: int = 4, seq_len: int = 128, rank: int = 8,
                answer_len: int | None = None, skip_steps: int = 2, seed: int = 0, num_layers: int = -1) -> dict:
    """Training speed on random tokens: (batch_size x seq_len) input tokens per step, LoRA on all 7
    projections of the last `num_layers` blocks (-1: all), loss on the last `answer_len` tokens (default:
    all of them), beside float32 GEMM measured just before and just after (averaged).

    `flops_per_token`: what this shape needs per input token (`train_flops`): 4 x the LoRA blocks' weights,
    the vocabulary projection at the answer positions only (4 x vocab x hidden x answer_len / seq_len), and
    the frozen blocks' one forward pass (2 x their weights). With fewer LoRA blocks that pass runs once per
    sequence before the first step (`trunk_seconds`, not timed per step): `tokens_per_s_with_trunk` charges
    it to the steps, and `roofline_fraction` = flops_per_token x tokens_per_s_with_trunk / GEMM FLOPS (the
    trunk's FLOPs over the trunk's time included). `roofline_fraction_steps`: the steps alone, their own
    FLOPs (`flops_per_token_steps`) at `tokens_per_s`. `roofline_tokens_per_s`: tokens/s at GEMM speed.
    Not counted: attention, LoRA's own matrices, the optimizer (small at these lengths and rank).
    `shape` is what a peer benchmark needs to build the same model (`peft_bench`)."""
    gflops_before = gemm_gflops()
    base = load_model(model_path)
    n_params = sum(v.size for _, v in tree_flatten(base.parameters()))
    a = base.args
    shape = {"vocab_size": a.vocab_size, "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
             "num_hidden_layers": a.num_hidden_layers, "num_attention_heads": a.num_attention_heads,
             "num_key_value_heads": a.num_key_value_heads, "rms_norm_eps": a.rms_norm_eps,
             "rope_theta": getattr(a, "rope_theta", 10000.0),
             "tie_word_embeddings": bool(getattr(a, "tie_word_embeddings", True)), "model_type": a.model_type}
    vocab = a.vocab_size
    per_block = block_weights(base.model.layers)
    del base
    answer_len = seq_len if answer_len is None else answer_len
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(batch_size * steps):
        toks = rng.integers(0, vocab, size=seq_len + 1).tolist()  # seq_len inputs, seq_len targets at most
        examples.append((toks[: seq_len + 1 - answer_len], toks[seq_len + 1 - answer_len:]))
    cfg = TrainConfig(rank=rank, num_layers=num_layers, batch_size=batch_size, grad_accum=1, epochs=1.0,
                      max_seq_len=seq_len + 1, warmup=0.0, lr=1e-4, val_fraction=0.0, save_every=10**9, seed=seed)
    speeds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        info = train(model_path, examples, cfg, tmp, valid_examples=[], on_step=lambda r: speeds.append(r["tokens_per_s"]))
    timed = speeds[skip_steps:] or speeds  # the first steps include compilation
    tps = float(np.median(timed))
    gflops_after = gemm_gflops()  # on a shared machine the GEMM speed drifts: measure on both sides, average
    gflops = (gflops_before + gflops_after) / 2
    per_token_trunk = info["trunk_seconds"] / (batch_size * seq_len * steps)
    tps_trunk = tps / (1 + tps * per_token_trunk)  # exactly tps without a trunk pass
    lora_blocks = len(per_block) if num_layers < 0 else min(num_layers, len(per_block))

    def per_token(trunk: float) -> float:  # FLOPs per input token; every sequence passes the trunk once
        return train_flops(per_block, lora_blocks, vocab * shape["hidden_size"],
                           trunk_cached=info["frozen_blocks_cached"] > 0, trunk_tokens=trunk, step_tokens=1.0,
                           answer_tokens=answer_len / seq_len)

    flops_token, flops_steps = per_token(1.0), per_token(0.0)
    return {"tokens_per_s": tps, "tokens_per_s_with_trunk": tps_trunk,
            "gemm_gflops": gflops, "gemm_gflops_before": gflops_before,
            "gemm_gflops_after": gflops_after, "n_params": int(n_params),
            "flops_per_token": flops_token, "flops_per_token_steps": flops_steps,
            "roofline_tokens_per_s": gflops * 1e9 / flops_token,
            "roofline_fraction": tps_trunk * flops_token / (gflops * 1e9),
            "roofline_fraction_steps": tps * flops_steps / (gflops * 1e9),
            "seconds_per_step": batch_size * seq_len / tps,
            "steps_timed": len(timed), "batch_size": batch_size, "seq_len": seq_len, "answer_len": answer_len,
            "lora_blocks": lora_blocks, "frozen_blocks_cached": info["frozen_blocks_cached"],
            "trunk_seconds": info["trunk_seconds"], "keys": cfg.keys.split(","), "rank": rank, "scale": cfg.scale,
            "trainable_params": info["trainable_params"], "first_step_tokens_per_s": speeds[0] if speeds else None,
            "shape": shape}

"""MLX engine on tiny GGUFs written by the suite: loading, parity with llama.cpp, training, export, resume.

Real engines only (no mocks): llama.cpp tokenizes and serves, MLX trains, on 2-block models in milliseconds.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tinymodel import write_tiny_gguf
from toyset import CHAT, tokenizer, toy_cfg, toy_examples

from semievol_local.training import mlx_engine as me  # first: it loads OpenBLAS before mlx.core (blas.py)
from semievol_local.core.config import TrainConfig
from semievol_local.core.errors import UserError
from semievol_local.training import frozen, lora
from semievol_local.training.parity import compare_logits, llama_logits, llama_logits_many

import mlx.core as mx  # noqa: E402, I001  only after mlx_engine, or MLX keeps its reference BLAS for good

@pytest.fixture(scope="module")
def toy(tiny_q4):
    """A memorizable toy set: 8 questions, each with a fixed option letter."""
    return toy_examples(tiny_q4)


@pytest.fixture(scope="module")
def trained(tiny_q4, toy, tmp_path_factory):
    """One training run shared by the export and parity tests: (out_dir, summary, per-step records)."""
    out = tmp_path_factory.mktemp("trained")
    steps: list[dict] = []
    info = me.train(tiny_q4, toy, toy_cfg(), out, valid_examples=toy[:4], on_step=steps.append)
    return out, info, steps


# ---------------------------------------------------------------------------- loading and base parity

@pytest.mark.parametrize("fixture,dequantize", [
    ("tiny_model", None),   # float32 GGUF: exact up to float rounding
    ("tiny_q4", None),      # Q4_1 dequantized to float32 (the CPU default)
    ("tiny_q4", False),     # Q4_1 kept quantized (the GPU default, QLoRA)
])
def test_base_logits_match_llama_cpp(request, fixture, dequantize, toy):
    path = request.getfixturevalue(fixture)
    model = me.load_model(path, dequantize=dequantize)
    ids = toy[0][0] + toy[0][1]
    got = compare_logits(llama_logits(path, None, ids), me.logits(model, ids))
    assert got["kl_mean"] < 0.02 and got["top1_agreement"] >= 0.9, got


def test_load_model_layout(tiny_q4):
    dense = me.load_model(tiny_q4)  # CPU: dequantized
    assert dense.args.rope_traditional and dense.args.tie_word_embeddings
    assert dense.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    quant = me.load_model(tiny_q4, dequantize=False)
    q = quant.layers[0].self_attn.q_proj
    assert q.bits == 4 and q.group_size == 32  # bits derived per layer from the tensor shapes


def bad_model(tmp_path, kind):
    if kind == "arch":
        return write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    if kind == "truncated":
        good = write_tiny_gguf(tmp_path / "good.gguf")
        (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:3000])
        return tmp_path / "cut.gguf"
    return tmp_path / "absent.gguf"


@pytest.mark.parametrize("kind,message", [
    ("arch", "architecture 'gpt2'"),        # a GGUF of another architecture (Q5_0 & co. now load: test_gguf_loader)
    ("truncated", "cut.gguf"),              # a damaged file: the message names the file
    ("missing", "no such model file"),      # a path that does not exist
])
def test_unsupported_models_raise_user_error(tmp_path, kind, message):
    with pytest.raises(UserError, match=message):
        me.load_model(bad_model(tmp_path, kind))


# ---------------------------------------------------------------------------- training and export

def test_training_memorizes_toy_set(trained):
    out, info, steps = trained
    # the tied 0.1-scale embeddings of the tiny model cap how peaked it can get: ~1.8 nats is the floor
    assert np.mean([s["loss"] for s in steps[-3:]]) < 0.5 * steps[0]["loss"]
    assert {"step", "total_steps", "loss", "lr", "tokens_per_s"} <= set(steps[0])
    assert "val_loss" in steps[-1] and info["val_loss"] < 5.0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, info["steps"] + 1))


def test_validation_slice_chooses_the_adapter(tiny_q4, toy, tmp_path):
    """With a validation slice, the loss is measured at every epoch's end and the adapter written is the one
    with the lowest: the slice earns its keep. Here the slice contradicts the training answers, so the
    model overfits past the middle and an earlier epoch is chosen."""
    tok = tokenizer(tiny_q4)
    contra = [(tok(CHAT.format(q=f"Question {i}?")), tok(" " + "ABCD"[(i + 1) % 4] + "<|im_end|>")) for i in range(4)]
    info = me.train(tiny_q4, toy, toy_cfg(), tmp_path, valid_examples=contra)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
    assert sorted(vals) == list(range(2, 17, 2))  # 8 epochs of 2 steps: one measurement per epoch
    best = min(vals, key=vals.get)
    assert info["chosen_step"] == best < info["steps"] and info["val_loss"] == vals[best]
    assert info["train_rows"] == 8 and info["validation_rows"] == 4
    last = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    kept, final = mx.load(str(last / "best.safetensors")), mx.load(str(last / "adapters.safetensors"))
    written = mx.load(str(tmp_path / "adapters.safetensors"))
    assert kept.keys() == written.keys()
    for k in kept:
        np.testing.assert_array_equal(np.array(kept[k]), np.array(written[k]), err_msg=k)
    assert any(not np.array_equal(np.array(final[k]), np.array(written[k])) for k in final)


# ---------------------------------------------------------------------------- failures that stop training

def test_nan_loss_stops_and_keeps_last_good_adapter(tiny_model, toy, tmp_path):
    with pytest.raises(UserError, match="loss became nan"):
        me.train(tiny_model, toy, toy_cfg(lr=1e30, warmup=0.0), tmp_path)
    kept = mx.load(str(tmp_path / "adapters.safetensors"))
    assert all(bool(mx.all(mx.isfinite(v))) for v in kept.values())
    assert (tmp_path / "adapter.gguf").is_file()


def test_examples_without_answers_are_refused(tiny_model, tmp_path):
    with pytest.raises(UserError, match="has answer tokens"):
        me.train(tiny_model, [([5, 6, 7], []), ([8, 9], [])], toy_cfg(), tmp_path)


def test_gradient_checkpointing_gives_the_same_adapter_with_less_memory(tmp_path):
    """--grad-checkpoint recomputes each block in the backward pass: same losses and weights, lower MLX peak.
    A deeper tiny model and long prompts, so that block activations dominate the peak as in a real model.
    A memory budget below the estimated peak turns it on by itself; the default budget (half the RAM) not."""
    deep = write_tiny_gguf(tmp_path / "deep.gguf", n_layer=8, n_ff=512)
    tok = tokenizer(deep)
    data = [(tok(CHAT.format(q="word " * 200 + f"{i}?")), tok(" " + "ABCD"[i % 4] + "<|im_end|>")) for i in range(16)]
    peaks, weights, losses, infos = {}, {}, {}, {}
    variants = {"off": {}, "on": {"grad_checkpoint": True}, "auto": {"memory_budget": 1e-6}}
    for name, over in variants.items():
        mx.clear_cache()
        mx.reset_peak_memory()
        got: list[dict] = []
        infos[name] = me.train(deep, data, toy_cfg(epochs=2, batch_size=16, max_seq_len=256, **over),
                               tmp_path / name, valid_examples=data[:2], on_step=got.append)
        peaks[name] = mx.get_peak_memory()
        weights[name] = mx.load(str(tmp_path / name / "adapters.safetensors"))
        losses[name] = [r["loss"] for r in got]
    assert infos["off"]["grad_checkpoint"] == "off" and infos["on"]["grad_checkpoint"] == "on"
    assert infos["auto"]["grad_checkpoint"].startswith("auto: estimated peak")
    for name in ("on", "auto"):
        assert losses[name] == pytest.approx(losses["off"], rel=1e-5)
        for key, w in weights["off"].items():
            np.testing.assert_allclose(np.array(weights[name][key]), np.array(w), rtol=1e-4, atol=1e-6)
        assert peaks[name] < 0.75 * peaks["off"], peaks  # measured 0.53 here; SmolLM2 on fpb: 0.51
    assert type(me.load_model(deep).layers[0]).__name__ == "TransformerBlock"  # other models untouched


def test_a_rare_long_batch_is_split_into_pieces_that_train_the_same_adapter(tmp_path):
    """Batches over 1.5x the median padded tokens are computed in pieces whose gradients add up to the step's:
    the same losses and weights as whole batches, with the MLX peak of a typical batch."""
    deep = write_tiny_gguf(tmp_path / "deep.gguf", n_layer=8, n_ff=512)
    tok = tokenizer(deep)
    data = [(tok(CHAT.format(q="word " * (150 if i % 8 == 0 else 12) + f"{i}?")), tok(" " + "ABCD"[i % 4] + "<|im_end|>"))
            for i in range(32)]
    peaks, weights, losses, infos = {}, {}, {}, {}
    for name, cap in {"whole": -1, "auto": 0}.items():
        mx.clear_cache()
        mx.reset_peak_memory()
        got: list[dict] = []
        infos[name] = me.train(deep, data, toy_cfg(epochs=1, batch_size=8, max_seq_len=256, max_batch_tokens=cap),
                               tmp_path / name, valid_examples=data[:2], on_step=got.append)
        peaks[name] = mx.get_peak_memory()
        weights[name] = mx.load(str(tmp_path / name / "adapters.safetensors"))
        losses[name] = [r["loss"] for r in got]
    assert infos["whole"]["batches_split"] == 0 and infos["auto"]["batches_split"] >= 1, infos["auto"]
    assert losses["auto"] == pytest.approx(losses["whole"], rel=1e-5)
    for key, w in weights["whole"].items():
        np.testing.assert_allclose(np.array(weights["auto"][key]), np.array(w), rtol=1e-4, atol=1e-6)
    assert peaks["auto"] < 0.8 * peaks["whole"], peaks
    assert infos["auto"]["estimated_peak_gb"] <= infos["whole"]["estimated_peak_gb"]


def test_the_activation_estimate_matches_what_was_measured_on_smollm2():
    """The estimate behind the automatic choice, against MLX peaks measured on SmolLM2-135M on fpb
    (batches of 8; arrays beyond the model and the cached trunk outputs): within 20%."""
    from types import SimpleNamespace

    smol = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_attention_heads=9)
    assert lora.activation_bytes(smol, 8, 163, 30) == pytest.approx(2.3e9, rel=0.2)  # all 30 blocks
    assert lora.activation_bytes(smol, 8, 177, 16) == pytest.approx(1.3e9, rel=0.2)  # the last 16 (default)
    assert lora.activation_bytes(smol, 8, 163, 30, checkpoint=True) < 0.25 * lora.activation_bytes(smol, 8, 163, 30)


def test_frozen_blocks_run_once_and_give_the_same_adapter(tmp_path, monkeypatch):
    """LoRA on the last 3 of 8 blocks: the 5 blocks below are run once per sequence and cached. Same losses
    and weights as recomputing them every step (cache disabled), and llama.cpp applies the partial adapter."""
    deep = write_tiny_gguf(tmp_path / "deep.gguf", n_layer=8, n_ff=256)
    tok = tokenizer(deep)
    # prompts of different lengths, so batches are padded and cached rows must be cut and re-padded
    data = [(tok(CHAT.format(q="word " * (3 + 5 * i) + f"{i}?")), tok(" " + "ABCD"[i % 4] + "<|im_end|>"))
            for i in range(12)]
    weights, losses, infos, trunk = {}, {}, {}, {True: [], False: []}
    for cached in (True, False):
        monkeypatch.setattr(frozen, "TRUNK_CACHE_BYTES", 2**31 if cached else 0)
        got: list[dict] = []
        infos[cached] = me.train(deep, data, toy_cfg(num_layers=3, epochs=3, batch_size=4, max_seq_len=128),
                                 tmp_path / str(cached), valid_examples=data[:2], on_step=got.append,
                                 on_trunk=lambda done, total, c=cached: trunk[c].append((done, total)))
        weights[cached] = mx.load(str(tmp_path / str(cached) / "adapters.safetensors"))
        losses[cached] = [r["loss"] for r in got]
    assert infos[True]["frozen_blocks_cached"] == 5 and infos[False]["frozen_blocks_cached"] == 0
    assert trunk[True] == [(4, 12), (8, 12), (12, 12)] and trunk[False] == []  # progress of the one pass
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[True][-1] < losses[True][0]  # it learns
    assert sorted({k.split(".")[2] for k in weights[True]}) == ["5", "6", "7"]
    for name, w in weights[False].items():
        np.testing.assert_allclose(np.array(weights[True][name]), np.array(w), rtol=1e-3, atol=1e-5)
    seqs = [p + a for p, a in data[:3]]
    parity = compare_logits(np.concatenate(llama_logits_many(deep, tmp_path / "True" / "adapter.gguf", seqs)),
                            me.adapter_logits(deep, tmp_path / "True", seqs))
    assert parity["kl_mean"] < 0.05 and parity["top1_agreement"] >= 0.9, parity
    with pytest.raises(UserError, match="--num-layers 0: give a value >= 1"):
        me.train(deep, data, toy_cfg(num_layers=0), tmp_path / "zero")


def test_a_second_training_reads_the_frozen_blocks_the_first_stored(tmp_path):
    """The final fine-tune's labeled rows are the warm-up's: their frozen-block outputs come from the store
    (not computed again), and the training is the one that computes everything, to float rounding."""
    deep = write_tiny_gguf(tmp_path / "deep.gguf", n_layer=8, n_ff=256)
    tok = tokenizer(deep)
    data = [(tok(CHAT.format(q="word " * (3 + 5 * i) + f"{i}?")), tok(" " + "ABCD"[i % 4] + "<|im_end|>"))
            for i in range(12)]
    cfg = toy_cfg(num_layers=3, epochs=2, batch_size=4, max_seq_len=128)
    store = tmp_path / "store"
    me.train(deep, data[:8], cfg, tmp_path / "warm", valid_examples=[], trunk_store=store)
    assert len(list((store / "blocks-5").glob("*.npy"))) == 8  # one per sequence of the first training
    seen: list[tuple] = []
    stored = me.train(deep, data, cfg, tmp_path / "final", valid_examples=[], trunk_store=store,
                      on_trunk=lambda done, total: seen.append((done, total)))
    assert seen[0] == (8, 12) and seen[-1] == (12, 12) and stored["trunk_sequences_reused"] == 8  # 8 read, 4 computed
    assert len(list((store / "blocks-5").glob("*.npy"))) == 12
    fresh = me.train(deep, data, cfg, tmp_path / "fresh", valid_examples=[])
    assert stored["final_loss"] == pytest.approx(fresh["final_loss"], rel=1e-4)
    a, b = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("final", "fresh"))
    for name, w in b.items():
        np.testing.assert_allclose(np.array(a[name]), np.array(w), rtol=1e-3, atol=1e-5)
    # a damaged file is computed again, not trusted
    victim = sorted((store / "blocks-5").glob("*.npy"))[0]
    victim.write_bytes(b"garbage")
    again = me.train(deep, data, cfg, tmp_path / "again", valid_examples=[], trunk_store=store)
    assert again["final_loss"] == pytest.approx(stored["final_loss"], rel=1e-4)


def test_memory_kept_for_training_goes_back_after_it():
    """tune_malloc keeps freed buffers in glibc's heap (faster steps); untune_malloc, run when training
    returns, must hand them back and put glibc's defaults back, or the llama.cpp stages after a fine-tune
    sit on the training peak and on every large temporary freed after it (the parity check's logits)."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc heap tuning is Linux-only")
    code = """
import numpy as np
from semievol_local.core.runfolder import rss_mb
from semievol_local.training.blas import tune_malloc, untune_malloc
if not tune_malloc():
    print("skip"); raise SystemExit
base = rss_mb()
a = np.ones(400 * 2**20 // 8); del a  # 400 MB through malloc, freed
held = rss_mb() - base
untuned = untune_malloc()
after = rss_mb() - base
b = np.ones(400 * 2**20 // 8); del b  # after training: freed memory goes back by itself
print(held, after, rss_mb() - base, untuned)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out == ["skip"]:
        pytest.skip("not glibc")
    held, after, later, untuned = float(out[0]), float(out[1]), float(out[2]), out[3]
    assert held > 300, f"tune_malloc did not keep the freed 400 MB ({held:.0f} MB held)"
    assert untuned == "True" and after < 50, f"untune_malloc left {after:.0f} MB of the 400 MB"
    assert later < 50, f"after untune_malloc a freed 400 MB array still holds {later:.0f} MB"


# ---------------------------------------------------------------------------- CPU fast paths

def test_training_can_start_from_an_earlier_adapter(trained, tiny_q4, toy, tmp_path):
    out, _, first_run = trained
    steps: list[dict] = []
    me.train(tiny_q4, toy, toy_cfg(epochs=1, lr=1e-6), tmp_path / "more", init_adapter=out, on_step=steps.append)
    assert steps[0]["loss"] < 0.6 * first_run[0]["loss"]  # starts where the earlier run ended, not from scratch
    with pytest.raises(UserError, match="does not fit this run's LoRA settings"):
        me.train(tiny_q4, toy, toy_cfg(rank=4), tmp_path / "other", init_adapter=out)


# ---------------------------------------------------------------------------- the real default model

@pytest.mark.slow
def test_default_model_trains_and_exports_with_parity(default_model, tmp_path):
    """SmolLM2-135M Q4_1: MLX matches llama.cpp on the base model, and after 2 LoRA steps with the adapter."""
    tok = tokenizer(default_model)
    exs = [(tok(CHAT.format(q=f"Is {w} a colour?")), tok(" " + a + "<|im_end|>"))
           for w, a in [("red", "A"), ("table", "B"), ("blue", "A"), ("river", "B")]]
    seqs = [p + a for p, a in exs]
    base = me.load_model(default_model)
    got = compare_logits(llama_logits(default_model, None, seqs[0]), me.logits(base, seqs[0]))
    assert got["kl_mean"] < 0.05 and got["top1_agreement"] >= 0.8, got
    del base
    me.train(default_model, exs, TrainConfig(lr=1e-3, epochs=2, batch_size=4, warmup=0.0, val_fraction=0.0), tmp_path)
    parity = me.adapter_check(default_model, tmp_path, seqs)
    assert parity["kl_mean"] < 0.1 and parity["top1_agreement"] >= 0.9, parity


def test_parity_gate_uses_the_live_engine(tiny_q4, toy, trained, tmp_path):
    """finetune.check_adapter: llama.cpp's side on the process's engine (no second load), MLX's from the
    mlx-lm files; a true export passes, an MLX adapter that differs fails loudly, the engine is restored."""
    import shutil

    from semievol_local.core.config import EngineConfig
    from semievol_local.core.errors import UserError
    from semievol_local.engines import llama_engine
    from semievol_local.method import finetune

    out, _, _ = trained
    engine = llama_engine.Engine(tiny_q4, EngineConfig(n_ctx=256))
    seqs = [p + a for p, a in toy[:3]]
    ok = finetune.check_adapter(engine, out, seqs)
    assert ok["kl_mean"] < 0.1 and ok["top1_agreement"] >= 0.9, ok
    assert engine.adapter is None
    # compared a sequence at a time, the figures of the whole arrays at once
    refs = [engine.reference_logits(seqs, None), engine.reference_logits(seqs, out / "adapter.gguf")]
    whole = [np.concatenate(r) for r in refs]
    floor, adapted = me.parity_against(tiny_q4, out, seqs, refs)
    assert refs == []
    base = me.load_model(tiny_q4)
    assert floor == compare_logits(whole[0], np.concatenate([me.logits(base, s) for s in seqs]))
    assert adapted == compare_logits(whole[1], me.adapter_logits(tiny_q4, out, seqs))
    assert ok["kl_mean"] == adapted["kl_mean"] and ok["floor_kl_mean"] == floor["kl_mean"]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("checkpoints"))
    weights = mx.load(str(bad / "adapters.safetensors"))
    mx.save_safetensors(str(bad / "adapters.safetensors"),
                        {k: (v * -3 if k.endswith("lora_b") else v) for k, v in weights.items()})
    with pytest.raises(UserError, match="parity check failed.*moved to adapter.gguf.parity-failed"):
        finetune.check_adapter(engine, bad, seqs)
    assert engine.adapter is None
    # no usable-looking adapter stays behind for a script to pick up
    assert not (bad / "adapter.gguf").exists() and (bad / finetune.REJECTED_NAME).is_file()


# ---------------------------------------------------------------------------- the divergence guard

def test_divergence_guard_trips_on_a_jump_not_on_noise():
    # a real 1.5B model at the default lr: 0.46, 0.2, 0.11, then 13.5 at the first step at the peak rate
    assert me.diverged(13.5, [0.46, 0.2, 0.11]) == 0.11
    assert me.diverged(9.1, [2.06]) == 2.06  # SmolLM2 at lr 1e-2, its second step
    # a hard batch late in training, a slow start, a loss still falling: not a divergence
    assert me.diverged(1.9, [0.05, 0.08, 0.04]) is None
    assert me.diverged(6.6, [2.06]) is None and me.diverged(0.3, [0.5, 0.4]) is None
    assert me.diverged(50.0, []) is None  # nothing to compare with


@pytest.mark.slow
def test_a_planted_divergence_is_rolled_back(default_model, tmp_path):
    """SmolLM2 on the demo's labeled rows at lr 4e-3 (13x its default): the loss jumps (2.06 -> 6.6 -> 17 measured);
    training returns to the best kept weights at half the rate until it holds, finishes, and says so."""
    from semievol_local.core import data
    from semievol_local.engines import llama_engine
    from semievol_local.method import finetune
    from semievol_local.method.demo_task import demo_folder

    engine = llama_engine.load(default_model)
    items = data.load_split(data.find_split_file(demo_folder(False), "labeled"), "labeled").items
    exs = finetune.examples(engine, items)
    engine.close()
    info = me.train(default_model, exs, TrainConfig(lr=4e-3, epochs=1.0, num_layers=8, val_fraction=0.0,
                                                    save_every=1000), tmp_path)
    assert info["rollbacks"] >= 1 and "then lr x0.5" in info["rollback_steps"]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, info["steps"] + 1))  # the steps redone replace the diverged
    assert math.isfinite(log[-1]["loss"]) and log[-1]["loss"] < 2.0
    assert log[-1]["lr"] < 4e-3 * 0.5  # the rate stays lowered


def test_trainable_count_matches_the_lora_layers(tiny_model):
    from semievol_local.training import lora

    model = me.load_model(tiny_model)
    lora.apply_lora(model, toy_cfg(num_layers=-1))
    from mlx.utils import tree_flatten

    n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert lora.trainable_count(model.args, len(model.layers), toy_cfg().rank) == n

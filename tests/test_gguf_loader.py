"""The GGUF -> MLX loader on tiny GGUFs of every family, written and quantized as users' files are made.

Each family is written by `tinymodel` in the converter's layout and, for K-quant mixes, quantized with
llama.cpp's own quantizer. Per family: MLX reproduces llama.cpp on the base model, trains, exports an
adapter that llama.cpp applies as MLX does, and `models info` agrees with the loader.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from tinymodel import quantize_with_llama_cpp, write_tiny_gguf
from toyset import toy_examples

from semievol_local.training import mlx_engine as me  # first: it loads OpenBLAS before mlx.core (blas.py)
from semievol_local.core.config import TrainConfig
from semievol_local.core.errors import UserError
from semievol_local.method import models
from semievol_local.training import gguf_loader
from semievol_local.training.parity import compare_logits, llama_logits, llama_logits_many

import mlx.core as mx  # noqa: E402, I001  only after mlx_engine

SHAPE = dict(dim=256, n_head=4, n_head_kv=2, n_ff=512, n_layer=2, peaked=True)  # rows of 256: real K-quants

FAMILIES = {
    # name: (tinymodel arguments, llama.cpp quantization or None)
    "llama3": (dict(arch="llama", rope_freqs=True), None),                    # Llama 3.x rope_freqs
    "llama3-q4_k_m": (dict(arch="llama", rope_freqs=True), "Q4_K_M"),         # the file most people mean
    "mistral-q8_0": (dict(arch="llama", tied=False, qtype="Q8_0"), None),    # untied output, exact 8-bit
    "qwen2": (dict(arch="qwen2"), None),                                      # q/k/v biases, neox rope
    "qwen2-q5_k_m": (dict(arch="qwen2"), "Q5_K_M"),                           # Q5_K: MLX cannot read it
    "qwen3-q4_k_m": (dict(arch="qwen3", head_dim=128), "Q4_K_M"),             # q/k norms, head_dim != dim/heads
    "gemma3": (dict(arch="gemma3", head_dim=128), None),                      # sliding window 6, pattern 2
    "gemma3-q5_k_m": (dict(arch="gemma3", head_dim=128), "Q5_K_M"),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    made: dict = {}

    def get(name: str):
        if name not in made:
            kwargs, ftype = FAMILIES[name]
            folder = tmp_path_factory.mktemp(name)
            path = write_tiny_gguf(folder / f"{name}.gguf", **SHAPE, **kwargs)
            if ftype:
                path = quantize_with_llama_cpp(path, folder / f"{name}-{ftype}.gguf", ftype)
            made[name] = path
        return made[name]

    return get


def toy(path):
    return toy_examples(path, "Question number {i} of the toy set?")


def tensor_types(path):
    import gguf

    return {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_fast_reader_agrees_with_gguf_py(family):
    # our header reader (milliseconds on a 262k vocabulary) sees what gguf-py's GGUFReader sees
    import gguf

    from semievol_local.core.gguf_file import Array, GGUFFile

    path = family("qwen3-q4_k_m")
    ours, theirs = GGUFFile(path, max_array=64), gguf.GGUFReader(str(path))
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.fields[key]
        if isinstance(value, Array):  # long arrays are skipped: only their length and type are kept
            assert value.length == len(field.data), key
        else:
            assert value == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and a.n_elements == int(b.n_elements), a.name
        np.testing.assert_array_equal(np.asarray(a.data).reshape(-1).view(np.uint8),
                                      np.asarray(b.data).reshape(-1).view(np.uint8), err_msg=a.name)


# ---------------------------------------------------------------------------- every family, end to end

@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_loads_trains_and_exports_with_parity(family, name, tmp_path):
    path = family(name)
    exs = toy(path)
    seqs = [p + a for p, a in exs]
    assert models.mlx_support(path).startswith("yes"), models.mlx_support(path)

    base = me.load_model(path)
    got = compare_logits(llama_logits(path, None, seqs[0]), me.logits(base, seqs[0]))
    assert got["kl_mean"] < 0.02 and got["top1_agreement"] >= 0.9, (name, got)
    del base

    steps: list[dict] = []
    cfg = TrainConfig(lr=2e-3, epochs=6, batch_size=4, warmup=0.0, val_fraction=0.0, save_every=100, max_seq_len=64)
    me.train(path, exs, cfg, tmp_path, on_step=steps.append)
    assert steps[-1]["loss"] < 0.7 * steps[0]["loss"], (name, steps[0]["loss"], steps[-1]["loss"])
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["num_layers"] == 2

    parity = me.adapter_check(path, tmp_path, seqs)
    assert parity["kl_mean"] < 0.1 and parity["top1_agreement"] >= 0.9, (name, parity)
    with_adapter = np.concatenate(llama_logits_many(path, tmp_path / "adapter.gguf", seqs))
    without = np.concatenate(llama_logits_many(path, None, seqs))
    assert compare_logits(with_adapter, without)["kl_mean"] > 0.1  # the adapter is applied, not ignored


def test_quantized_files_hold_the_types_users_download(family):
    # llama.cpp's own quantizer, as users' files are made: K-quant mixes, and Q5_K that mx.load refuses
    assert {"Q4_K", "Q6_K"} <= tensor_types(family("llama3-q4_k_m"))
    assert "Q5_K" in tensor_types(family("qwen2-q5_k_m"))
    with pytest.raises((RuntimeError, ValueError)):
        mx.load(str(family("qwen2-q5_k_m")))  # why the loader reads through gguf-py


def test_gemma3_resume_is_bit_identical(family, tmp_path):
    # another model class, no frozen-trunk cache: stopping and resuming still gives the same adapter
    path = family("gemma3")
    exs = toy(path)
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=2, grad_accum=2, dropout=0.1, save_every=1, warmup=0.0,
                      val_fraction=0.0, max_seq_len=64)

    class Stop(Exception):
        pass

    def stop(info):
        if info["step"] == 2:
            raise Stop

    me.train(path, exs, cfg, tmp_path / "whole")
    with pytest.raises(Stop):
        me.train(path, exs, cfg, tmp_path / "cut", on_step=stop)
    assert me.train(path, exs, cfg, tmp_path / "cut", resume=True)["resumed_from"] == 2
    assert (tmp_path / "whole" / "adapter.gguf").read_bytes() == (tmp_path / "cut" / "adapter.gguf").read_bytes()


# ---------------------------------------------------------------------------- tensors

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_repacked_blocks_equal_mlx_own_reader(tmp_path, qtype):
    # a GPU keeps these quantized: our NumPy repacking must be exactly what mx.load makes of the same bytes
    from semievol_local.core.gguf_file import open_gguf

    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", qtype=qtype)
    theirs = mx.load(str(path))
    for t in open_gguf(path).tensors:
        if t.tensor_type.name != qtype:
            continue
        w, s, b, bits = gguf_loader.mlx_quantized(t)
        base = t.name[: -len(".weight")]
        np.testing.assert_array_equal(w, np.array(theirs[t.name]), err_msg=t.name)
        np.testing.assert_array_equal(s, np.array(theirs[base + ".scales"]), err_msg=t.name)
        np.testing.assert_array_equal(b, np.array(theirs[base + ".biases"]), err_msg=t.name)
        assert bits == (8 if qtype == "Q8_0" else 4)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "BF16"])
def test_types_beyond_mx_load_are_read_through_gguf_py(tmp_path, qtype):
    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", qtype=qtype, **SHAPE)
    ids = toy(path)[0][0]
    got = compare_logits(llama_logits(path, None, ids), me.logits(me.load_model(path), ids))
    assert got["kl_mean"] < 0.02 and got["top1_agreement"] >= 0.9, got


def test_gpu_layout_keeps_q4_layers_quantized_and_k_quants_dense(family):
    model = me.load_model(family("llama3-q4_k_m"), dequantize=False)
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.float16  # Q4_K: dequantized to float16
    q4 = me.load_model(write_tiny_gguf(family("llama3").parent / "q4_0.gguf", qtype="Q4_0", **SHAPE),
                       dequantize=False)
    assert q4.layers[0].self_attn.q_proj.bits == 4  # Q4_0 stays quantized (QLoRA)


# ---------------------------------------------------------------------------- what is refused, and models info

def unsupported(tmp_path, kind):
    if kind == "arch":
        return write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    if kind == "partial-rope":
        return write_tiny_gguf(tmp_path / "partial.gguf", rope_dims=8)
    raise ValueError(kind)


@pytest.mark.parametrize("kind,message", [
    ("arch", r"architecture 'gpt2'.*supported: llama .*qwen2.*qwen3.*gemma3"),  # names what would work
    ("partial-rope", "partial rotary"),                                        # a llama with partial rope
])
def test_unsupported_files_are_refused_alike_by_train_and_models_info(tmp_path, kind, message):
    path = unsupported(tmp_path, kind)
    with pytest.raises(UserError, match=message):
        me.load_model(path)
    assert models.mlx_support(path).startswith("no:")
    assert models.inspect(path).mlx_trainable.startswith("no:")


def test_models_info_and_loader_agree_on_every_family(family):
    for name in FAMILIES:
        info = models.inspect(family(name))
        assert info.mlx_trainable.startswith("yes"), (name, info.mlx_trainable)
        assert f"mlx_lm.models.{gguf_loader.ARCHITECTURES[info.architecture].mlx_module}" in info.mlx_trainable


@pytest.mark.parametrize("name,arch,lr", [("llama3", "llama", 3e-4), ("gemma3", "gemma3", 1e-4)])
def test_the_family_learning_rate_trains_where_lr_is_left_out(family, tmp_path, name, arch, lr):
    """`--lr` left at 0 (the default) trains at the rate the architecture table measured for the family; a given
    `--lr` wins. The value that trained is recorded, as the run's stage identity uses it."""
    from semievol_local.method.finetune import family_defaults
    from semievol_local.training.gguf_loader import default_lr

    assert TrainConfig().lr == 0 and default_lr(arch) == lr
    assert family_defaults(TrainConfig(), arch).lr == lr and family_defaults(TrainConfig(lr=5e-3), arch).lr == 5e-3
    path = family(name)
    cfg = TrainConfig(epochs=1, batch_size=4, warmup=0.0, val_fraction=0.0, save_every=100, max_seq_len=64)
    me.train(path, toy(path), cfg, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["semievol_train_config"]["lr"] == lr


def test_forget_drops_only_copied_pages_and_keeps_the_data(tiny_q4):
    """`GGUFFile.forget` drops a tensor's pages from this process's memory: the data reads the same after (the
    pages come back from the file), and an array not in the file is left alone."""
    import numpy as np

    from semievol_local.core.gguf_file import read

    f = read(tiny_q4)
    before = {t.name: np.array(t.data) for t in f.tensors}
    for t in f.tensors:
        f.forget(t)
    f.forget(np.zeros(4))
    assert all(np.array_equal(before[t.name], np.asarray(t.data)) for t in f.tensors)

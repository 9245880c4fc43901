"""The parity gate judges the adapter against the engines' own floor: files quantized by llama.cpp (K-quants,
computed with llama.cpp's own kernels) pass with an honest adapter, and planted wrong adapters (mis-signed,
mis-scaled, rows out of order) and a wrong rope layout still fail."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from tinymodel import quantize_with_llama_cpp, write_tiny_gguf
from toyset import toy_examples

from semievol_local.training import mlx_engine as me  # first: it loads OpenBLAS before mlx.core (blas.py)
from semievol_local.core import adapter_gguf as ag
from semievol_local.core.config import EngineConfig, TrainConfig
from semievol_local.core.errors import UserError
from semievol_local.engines import llama_engine
from semievol_local.method import finetune
from semievol_local.training import gguf_loader
from semievol_local.training.parity import judge

import mlx.core as mx  # noqa: E402, I001  only after mlx_engine

SHAPE = dict(dim=256, n_head=4, n_head_kv=2, n_ff=512, n_layer=2, peaked=True)
FILES = {
    "llama3-q4_k_m": (dict(arch="llama", rope_freqs=True), "Q4_K_M"),
    "mistral-q5_k_m": (dict(arch="llama", tied=False), "Q5_K_M"),
    "qwen2-q4_k_m": (dict(arch="qwen2"), "Q4_K_M"),
    "qwen3-q8_0": (dict(arch="qwen3", head_dim=128), "Q8_0"),
    "gemma3-q4_k_m": (dict(arch="gemma3", head_dim=128), "Q4_K_M"),
}
CFG = TrainConfig(lr=2e-3, epochs=6, batch_size=4, warmup=0.0, val_fraction=0.0, save_every=100, max_seq_len=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    made: dict = {}

    def get(name: str):
        if name not in made:
            kwargs, ftype = FILES[name]
            folder = tmp_path_factory.mktemp(name)
            path = quantize_with_llama_cpp(write_tiny_gguf(folder / "f32.gguf", **SHAPE, **kwargs),
                                           folder / f"{ftype}.gguf", ftype)
            exs = toy_examples(path, "Question number {i} of the toy set?")
            me.train(path, exs, CFG, folder / "adapter")
            made[name] = (path, folder / "adapter", [p + a for p, a in exs[:4]])
        return made[name]

    return get


def engine_on_file(path):
    return llama_engine.Engine(path, EngineConfig(n_ctx=256, weights="file"))  # llama.cpp's own kernels


@pytest.mark.parametrize("name", list(FILES))
def test_honest_adapters_on_quantized_files_pass_against_the_floor(trained, name):
    path, adapter, seqs = trained(name)
    got = finetune.check_adapter(engine_on_file(path), adapter, seqs)
    assert got["weights"] == "file" and got["floor_kl_mean"] > 0, got
    assert got["kl_mean"] <= got["kl_bound"] and got["top1_agreement"] >= got["top1_bound"], got


def planted(adapter, tmp_path, *, mlx=None, gguf=None):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad, ignore=shutil.ignore_patterns("checkpoints"))
    if mlx:
        w = mx.load(str(bad / "adapters.safetensors"))
        mx.save_safetensors(str(bad / "adapters.safetensors"), {k: mlx(k, v) for k, v in w.items()})
    if gguf:
        meta, tensors = ag.read_lora_gguf(bad / "adapter.gguf")
        pairs = {n[: -len(ag.SUFFIX_A)]: (tensors[n], tensors[n[: -len(ag.SUFFIX_A)] + ag.SUFFIX_B])
                 for n in tensors if n.endswith(ag.SUFFIX_A)}
        arch = meta["general.architecture"]
        alpha = float(meta[ag.KEY_LORA_ALPHA])
        _write(bad / "adapter.gguf", arch, *gguf(pairs, alpha))
    return bad


def _write(path, arch, pairs, alpha):
    """An adapter.gguf of llama.cpp-layout pairs {base tensor name: (A (r, in), B (out, r))}."""
    import gguf

    path.unlink()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32(ag.KEY_LORA_ALPHA, alpha)
    for name, (a, b) in pairs.items():
        w.add_tensor(name + ag.SUFFIX_A, np.ascontiguousarray(a, np.float32))
        w.add_tensor(name + ag.SUFFIX_B, np.ascontiguousarray(b, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


WRONG = {
    "signed": dict(mlx=lambda k, v: -v if k.endswith("lora_b") else v),
    "scaled": dict(gguf=lambda pairs, alpha: (pairs, 4 * alpha)),
    "rows out of order": dict(gguf=lambda pairs, alpha: ({n: (a, b[::-1]) for n, (a, b) in pairs.items()}, alpha)),
}


@pytest.mark.parametrize("wrong", list(WRONG))
@pytest.mark.parametrize("name", ["llama3-q4_k_m", "qwen2-q4_k_m"])
def test_planted_wrong_adapters_fail(trained, name, wrong, tmp_path):
    path, adapter, seqs = trained(name)
    bad = planted(adapter, tmp_path, **WRONG[wrong])
    with pytest.raises(UserError, match="parity check failed: with the adapter"):
        finetune.check_adapter(engine_on_file(path), bad, seqs)
    assert not (bad / "adapter.gguf").exists() and (bad / finetune.REJECTED_NAME).is_file()


def test_a_wrong_rope_layout_fails_on_the_base_alone(trained, tmp_path, monkeypatch):
    path, adapter, seqs = trained("llama3-q4_k_m")
    spec = gguf_loader.ARCHITECTURES["llama"]
    monkeypatch.setitem(gguf_loader.ARCHITECTURES, "llama", spec.__class__(**{**spec.__dict__, "rope": "neox"}))
    with pytest.raises(UserError, match="the base alone already differs"):
        finetune.check_adapter(engine_on_file(path), planted(adapter, tmp_path), seqs)


def test_judge_bounds_follow_the_weights():
    floor = {"kl_mean": 0.004, "top1_agreement": 0.9}
    assert judge(floor, {"kl_mean": 0.02, "top1_agreement": 0.88}, "file")["failed"] is None
    assert "with the adapter" in judge(floor, {"kl_mean": 0.05, "top1_agreement": 0.9}, "file")["failed"]
    assert "with the adapter" in judge(floor, {"kl_mean": 0.01, "top1_agreement": 0.8}, "file")["failed"]
    # a float32 copy leaves no room for kernel noise: the same floor means the base itself differs
    assert "base alone" in judge({"kl_mean": 0.02, "top1_agreement": 0.97}, floor, "f32")["failed"]

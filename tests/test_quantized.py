"""The frozen base kept as the file's bytes (training.quantized): the weights the trainer multiplies equal
gguf-py's float32 dequantization bit for bit, type by type, on tensors written by llama.cpp's own quantizer;
a model holding them computes and trains as the float32 base does."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from tinymodel import quantize_with_llama_cpp, write_tiny_gguf
from toyset import toy_examples

from semievol_local.training import mlx_engine as me  # first: it loads OpenBLAS before mlx.core (blas.py)
from semievol_local.core import gguf_file
from semievol_local.core.config import TrainConfig
from semievol_local.training import quantized

import mlx.core as mx  # noqa: E402, I001  only after mlx_engine

SHAPE = dict(dim=256, n_head=4, n_head_kv=2, n_ff=512, n_layer=2, peaked=True)  # rows of 256: real K-quants
FTYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized")
    base = write_tiny_gguf(folder / "f32.gguf", **SHAPE, arch="llama", tied=False)
    return {ft: quantize_with_llama_cpp(base, folder / f"{ft}.gguf", ft) for ft in FTYPES}


def test_every_kept_type_equals_gguf_py_bit_for_bit(files):
    seen = set()
    for ftype, path in files.items():
        for t in gguf_file.read(path).tensors:
            kind = t.tensor_type.name
            if len(t.shape) != 2 or not quantized.keeps(kind):
                continue
            ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(t.shape)
            got = np.array(quantized.to_float32(kind, quantized.stored(kind, t.data), t.shape[1]))
            assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), ref.astype(np.float32).view(np.uint32)), \
                (ftype, t.name, kind)
            seen.add(kind)
    # what llama.cpp's quantizer writes in these files: every one of them checked
    assert {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"} <= seen, seen


def test_bf16_and_f16_widen_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    f16 = x.astype(np.float16)
    assert np.array_equal(np.array(quantized.to_float32("F16", quantized.stored("F16", f16), 64)), f16.astype(np.float32))
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # what a BF16 tensor's bytes hold
    ref = gguf.quants.dequantize(bf16.view(np.uint8).reshape(8, -1), gguf.GGMLQuantizationType.BF16).reshape(8, 64)
    assert np.array_equal(np.array(quantized.to_float32("BF16", quantized.stored("BF16", bf16), 64)), ref)


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
def test_kept_base_holds_the_file_and_computes_as_float32(files, ftype):
    path = files[ftype]
    kept, dense = me.load_model(path), me.load_model(path, base="f32")
    mods = [m for _, m in kept.named_modules() if isinstance(m, (quantized.QuantLinear, quantized.QuantEmbedding))]
    assert len(mods) == 2 * 7 + 2  # every block projection, the embedding and the untied output
    file_bytes = sum(t.data.nbytes for t in gguf_file.read(path).tensors if len(t.shape) == 2)
    assert quantized.kept_bytes(kept) == file_bytes  # the file's bytes, not a float copy
    seq = list(range(3, 40))
    assert np.array_equal(me.logits(kept, seq), me.logits(dense, seq))


def test_chunked_matmul_and_its_gradient_equal_the_dense_ones(files, monkeypatch):
    t = next(t for t in gguf_file.read(files["Q4_K_M"]).tensors if t.tensor_type.name == "Q4_K")
    rows, cols = t.shape
    data = quantized.stored("Q4_K", t.data)
    w = mx.array(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(t.shape))
    x = mx.array(np.random.default_rng(1).standard_normal((3, 5, cols)).astype(np.float32))
    monkeypatch.setattr(quantized, "CHUNK_BYTES", 4 * cols * 100)  # slices of 100 rows: several
    quantized._MATMULS.clear()
    try:
        lin = quantized.QuantLinear("Q4_K", data, rows, cols)
        assert len(quantized._slices(rows, cols)) > 1
        np.testing.assert_allclose(np.array(lin(x)), np.array(x @ w.T), rtol=1e-5, atol=1e-5)
        g = mx.grad(lambda x: (lin(x) ** 2).sum())(x)
        ref = mx.grad(lambda x: ((x @ w.T) ** 2).sum())(x)
        np.testing.assert_allclose(np.array(g), np.array(ref), rtol=1e-4, atol=1e-4)
    finally:
        quantized._MATMULS.clear()


def test_training_on_the_kept_base_gives_the_float32_base_adapter(files, tmp_path):
    path = files["Q4_K_M"]
    exs = toy_examples(path, "Question number {i} of the toy set?")
    cfg = TrainConfig(lr=2e-3, epochs=4, batch_size=4, warmup=0.0, val_fraction=0.0, save_every=100, max_seq_len=64)
    got = {}
    for base in ("file", "f32"):
        steps: list[dict] = []
        me.train(path, exs, TrainConfig(**{**cfg.__dict__, "frozen_base": base}), tmp_path / base, on_step=steps.append)
        got[base] = (steps, mx.load(str(tmp_path / base / "adapters.safetensors")))
    (s_file, a_file), (s_f32, a_f32) = got["file"], got["f32"]
    assert s_file[-1]["loss"] < 0.9 * s_file[0]["loss"]  # it learns
    np.testing.assert_allclose([s["loss"] for s in s_file], [s["loss"] for s in s_f32], rtol=1e-4)
    for k in a_f32:
        np.testing.assert_allclose(np.array(a_file[k]), np.array(a_f32[k]), rtol=1e-3, atol=1e-5)


def test_a_run_this_machine_cannot_hold_stops_before_anything_is_written(files, tmp_path, monkeypatch):
    from semievol_local.core.errors import UserError
    from semievol_local.engines import llama_engine
    from semievol_local.core.config import EngineConfig
    from semievol_local.method import finetune
    from semievol_local.core.data import Item

    path = files["Q4_K_M"]
    exs = toy_examples(path, "Question number {i} of the toy set?")
    cfg = TrainConfig(batch_size=4, num_layers=-1)
    fits = me.memory_check(path, exs, cfg)
    kept, dense = fits["base_gb"], me.memory_check(path, exs, TrainConfig(frozen_base="f32"))["base_gb"]
    assert kept < dense / 4  # the file's bytes, not float32
    one = me.memory_check(path, exs, TrainConfig(batch_size=4, num_layers=1))["estimated_peak_bytes"]
    ram = fits["estimated_peak_bytes"] - 1
    hint = "try --num-layers 1" if one <= ram else "pick a smaller model file"  # 1 block: the frozen one's outputs kept
    with pytest.raises(UserError, match=r"training needs about .* GB .* more than this machine's .* RAM; " + hint):
        me.memory_check(path, exs, cfg, ram=ram)
    monkeypatch.setattr(me, "ram_bytes", lambda: 100_000_000)
    engine = llama_engine.Engine(path, EngineConfig(n_ctx=256))
    items = [Item(index=i, question=f"Question {i}?", options=("yes", "no"), answer="A") for i in range(4)]
    out = tmp_path / "out"
    with pytest.raises(UserError, match="more than this machine's 0.1 GB of RAM"):
        finetune.train_adapter(engine, items, cfg, out)
    assert not out.exists() or not any(out.iterdir())

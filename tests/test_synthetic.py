"""Random-weight models of a released shape (`semievol bench model`): what llama.cpp and MLX load of them."""
import numpy as np
import pytest

from semievol_local.bench import synthetic
from semievol_local.bench.synthetic import Shape
from semievol_local.core.config import EngineConfig
from semievol_local.core.errors import UserError

# Llama 3.2 1B's rope and head layout at a width the tests can afford
SMALL = Shape(n_layer=2, dim=256, n_ff=512, n_head=4, n_head_kv=2, rope_base=500000.0,
              rope_scaling=(32.0, 1.0, 4.0, 8192), n_ctx=4096, tied=True)


def test_a_padded_vocabulary_and_an_untied_output_load_in_both_engines(tiny_q4, tmp_path):
    import dataclasses

    from semievol_local.core import gguf_file
    from semievol_local.engines.llama_engine import Engine
    from semievol_local.training import mlx_engine

    src = gguf_file.read(tiny_q4)
    n_tok = next(t.shape[0] for t in src.tensors if t.name == "token_embd.weight")
    shape = dataclasses.replace(SMALL, tied=False, n_vocab=n_tok + 37)  # the 8B shape's layout, small
    out = synthetic.write_random_model(tmp_path / "r.gguf", shape, tiny_q4, "Q4_K_M")
    tensors = {t.name: t for t in gguf_file.read(out).tensors}
    assert tensors["token_embd.weight"].shape[0] == tensors["output.weight"].shape[0] == n_tok + 37
    eng = Engine(out, EngineConfig(n_ctx=64, weights="file"))
    try:
        assert eng.llm.n_vocab() == n_tok + 37
        toks = eng.tokenize("<|im_start|>user\nWhich is red?<|im_end|>\nAnswer:")
        assert mlx_engine.logits(mlx_engine.load_model(out), toks).shape == (len(toks), n_tok + 37)
    finally:
        eng.close()


def test_a_random_model_loads_in_both_engines_alike(tiny_q4, tmp_path):
    import gguf

    from semievol_local.engines.llama_engine import Engine
    from semievol_local.training import mlx_engine
    from semievol_local.training.parity import compare_logits

    out = synthetic.write_random_model(tmp_path / "r.gguf", SMALL, tiny_q4, "Q4_K_M")
    reader = gguf.GGUFReader(str(out))
    assert {t.tensor_type.name for t in reader.tensors} >= {"Q4_K"}  # llama.cpp's own Q4_K_M mix
    assert not list(tmp_path.glob(".*tmp"))  # the f16 intermediate is gone
    eng, src = Engine(out, EngineConfig(n_ctx=256, weights="file")), Engine(tiny_q4, EngineConfig(n_ctx=256))
    try:
        text = "<|im_start|>user\nWhich is red?<|im_end|>\nAnswer:"
        assert eng.tokenize(text) == src.tokenize(text)  # the tokenizer it was given
        assert eng.template.source == src.template.source
        toks = eng.tokenize(text)
        got = compare_logits(eng.logits(toks), mlx_engine.logits(mlx_engine.load_model(out), toks))
        assert got["kl_mean"] < 0.02, got  # the llama3 rope factors read the same way by both
    finally:
        eng.close()
        src.close()


def test_llama3_rope_factors_span_one_to_the_scaling_factor():
    f = synthetic.llama3_rope_factors(synthetic.SHAPES["llama-1b"])
    assert f.shape == (32,) and f[0] == 1.0 and f[-1] == 32.0  # high frequencies kept, low ones scaled by 32
    assert np.all(np.diff(f) >= 0)  # and smoothly in between


@pytest.mark.parametrize("kwargs, message", [
    (dict(shape="llama-70b"), "--shape 'llama-70b': choose one of llama-1b"),  # an unknown shape
    (dict(qtype="Q3_X"), "--type 'Q3_X': choose one of"),                     # an unknown quantization
])
def test_bad_shape_or_type_is_one_line(tiny_q4, tmp_path, kwargs, message):
    args = dict(shape=SMALL, qtype="Q4_K_M") | kwargs
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        synthetic.write_random_model(tmp_path / "r.gguf", args["shape"], tiny_q4, args["qtype"])
    assert not list(tmp_path.iterdir())


def test_an_existing_file_is_never_overwritten(tiny_q4, tmp_path):
    out = tmp_path / "r.gguf"
    out.write_text("mine")
    with pytest.raises(UserError, match="exists"):
        synthetic.write_random_model(out, SMALL, tiny_q4, "Q8_0")
    assert out.read_text() == "mine"

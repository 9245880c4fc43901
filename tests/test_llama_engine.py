"""The llama.cpp engine on tiny GGUF models: scoring, sampling, prefix reuse, adapters, embeddings."""
import numpy as np
import pytest

from semievol_local.core.config import EngineConfig
from semievol_local.core.data import Item
from semievol_local.core.prompts import question_messages
from semievol_local.engines.llama_engine import Engine

ITEM = Item(index=0, question="Which is a colour?", options=("red", "table", "seven"), answer="A")


@pytest.fixture(scope="module")
def engine(tiny_q4):
    return Engine(tiny_q4, EngineConfig(n_ctx=1024))


def prompt(engine, item=ITEM, answer_prefix=True):
    return engine.tokenize(engine.template.prompt(question_messages(item), answer_prefix=answer_prefix))


def test_chat_markers_are_single_special_tokens(engine):
    toks = engine.tokenize("<|im_start|>user\nhi<|im_end|>")
    assert toks[0] == 1 and toks[-1] == 2  # control tokens, not their characters


@pytest.mark.parametrize("template", [
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",  # writes BOS (Llama 3, Gemma)
    None,                                                                                      # no template (a base model)
])
def test_one_bos_whether_or_not_the_template_writes_it(tmp_path, template):
    from tinymodel import write_tiny_gguf

    from semievol_local.method import finetune

    path = write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True, chat_template=template)
    eng = Engine(path, EngineConfig(n_ctx=256))
    try:
        ids = prompt(eng)
        assert ids[0] == eng.llm.token_bos() and ids.count(eng.llm.token_bos()) == 1
        # training's examples: prompt + answer tokenized as one text, split where the prompt's tokens end
        (p, a), = finetune.examples(eng, [ITEM])
        assert p + a[:-1] == eng.tokenize(eng.template.prompt(question_messages(ITEM)) + "Answer: A")
        assert eng.detokenize(a[:-1]).strip() == "Answer: A"
    finally:
        eng.close()


def test_score_is_a_distribution_and_matches_a_fresh_forward_pass(engine, tiny_q4):
    s = engine.score(prompt(engine), 3)
    assert s.probs.shape == (3,) and abs(s.probs.sum() - 1) < 1e-6 and 0 < s.mass <= 1
    assert 0 <= s.entropy <= np.log(3) + 1e-9
    # the same distribution from the full-logits path (a clean cache) ...
    full = engine.logits(prompt(engine))[-1]
    ids = engine.letter_tokens(3)
    p = np.exp(full[ids] - full[ids].max())
    np.testing.assert_allclose(s.probs, p / p.sum(), atol=1e-4)
    # ... and after a different prompt, the prefix-reusing cache gives the same answer again
    other = Item(index=1, question="Which is a number?", options=("seven", "cloud", "red"), answer="A")
    engine.score(prompt(engine, other), 3)
    np.testing.assert_allclose(engine.score(prompt(engine), 3).probs, s.probs, atol=1e-4)


def test_sample_seeds_are_reproducible_and_differ(engine):
    toks = prompt(engine, answer_prefix=False)
    a = engine.sample(toks, seeds=[11, 12, 13], temperature=1.0, max_tokens=12)
    b = engine.sample(toks, seeds=[11, 12, 13], temperature=1.0, max_tokens=12)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert len({tuple(s.tokens) for s in a}) > 1  # random weights: different seeds wander apart
    for s in a:
        assert len(s.tokens) == len(s.logprobs) <= 12 and np.all(s.logprobs <= 0)
        assert s.mean_nll == pytest.approx(-s.logprobs.mean())
    # logprobs are the model's own: re-scoring the sampled tokens in one pass gives the same values
    s = a[0]
    full = engine.logits(toks + s.tokens)
    lp = full - np.log(np.exp(full - full.max(1, keepdims=True)).sum(1, keepdims=True)) - full.max(1, keepdims=True)
    expect = [lp[len(toks) - 1 + i, t] for i, t in enumerate(s.tokens)]
    np.testing.assert_allclose(s.logprobs, expect, atol=2e-3)


def test_greedy_sampling_is_argmax(engine):
    toks = prompt(engine, answer_prefix=False)
    s = engine.sample(toks, seeds=[5], temperature=0.0, max_tokens=1)[0]
    best = int(np.argmax(engine.logits(toks)[-1]))
    assert s.tokens == ([] if engine.is_eog(best) else [best])  # an end-of-generation token ends the answer


def test_embeddings_are_normalized_and_deterministic(engine):
    v = engine.embed(["red green", "a table", "red green"])
    assert v.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(v[0], v[2], atol=1e-6)
    assert not np.allclose(v[0], v[1])


def test_context_overflow_is_a_user_error(engine):
    from semievol_local.core.errors import UserError

    with pytest.raises(UserError, match="does not fit the context"):
        engine.score([5] * 2000, 3)


def test_a_quantized_file_computes_with_its_cached_float32_copy(tiny_q4, weights_cache):
    # --weights f32: llama.cpp computes with the file's weights dequantized to float32 (what MLX trains on),
    # written once into the cache; --weights file computes with the file as given
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from semievol_local.training import mlx_engine

    auto = Engine(tiny_q4, EngineConfig(n_ctx=256, weights="f32"))
    plain = Engine(tiny_q4, EngineConfig(n_ctx=256, weights="file"))
    try:
        assert auto.weights.kind == "f32" and auto.weights.path.parent == weights_cache and auto.weights.path.is_file()
        assert plain.weights.kind == "file" and plain.weights.path == tiny_q4
        src = {t.name: t for t in GGUFReader(tiny_q4).tensors}
        copy = {t.name: t for t in GGUFReader(auto.weights.path).tensors}
        assert set(copy) == set(src) and {t.tensor_type.name for t in copy.values()} == {"F32"}
        for name, t in src.items():  # bit for bit the dequantized weights
            want = dequantize(t.data, t.tensor_type).reshape(-1)
            assert np.array_equal(np.asarray(copy[name].data).reshape(-1), want), name
        stamp = auto.weights.path.stat().st_mtime_ns
        again = Engine(tiny_q4, EngineConfig(n_ctx=256, weights="f32"))
        assert again.weights.path == auto.weights.path and auto.weights.path.stat().st_mtime_ns == stamp  # cached
        again.close()
        # the copy is closer to MLX's float32 forward pass than the quantized kernels are
        toks = prompt(auto)
        ref = mlx_engine.logits(mlx_engine.load_model(tiny_q4), toks)
        err_copy = np.abs(auto.logits(toks) - ref).max()
        err_file = np.abs(plain.logits(toks) - ref).max()
        assert err_copy < err_file / 10, (err_copy, err_file)  # measured 0.0027 vs 0.096
        # and the option distributions agree with the quantized kernels' to what Q8 activations change
        s_auto, s_file = auto.score(toks, 3), plain.score(toks, 3)
        assert np.abs(s_auto.probs - s_file.probs).max() < 0.02
    finally:
        auto.close()
        plain.close()


@pytest.mark.parametrize("rates, kind", [
    ({"file": 130.0, "f32": 84.0}, "file"),   # a 1B Q4_K_M on VNNI cores: the file's own kernels win
    ({"file": 200.0, "f32": 650.0}, "f32"),   # SmolLM2's Q4_1 on the same cores: the float32 copy wins
    ({"file": 105.0, "f32": 100.0}, "f32"),   # a close call goes to the weights MLX trains on
    ({"file": 111.0, "f32": 100.0}, "file"),  # past the margin
    ({"file": 90.0, "f32": 0.0}, "file"),     # no copy could be made
])
def test_auto_chooses_the_file_only_where_it_is_clearly_faster(rates, kind):
    from semievol_local.engines.weights import choose

    assert choose(rates) == kind


def test_auto_measures_once_per_file_machine_and_threads(tiny_q4, tmp_path, monkeypatch):
    import json

    from semievol_local.engines import weights
    from semievol_local.engines.weights import f32_path, plan_weights

    monkeypatch.setenv("SEMIEVOL_WEIGHTS", str(tmp_path))
    assert plan_weights(tiny_q4, EngineConfig(), measure=False).kind == "unmeasured"
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
    w = plan_weights(tiny_q4, EngineConfig())
    saved = json.loads((tmp_path / weights.MEASURED).read_text())
    (key, rates), = saved.items()
    assert rates["file"] > 0 and rates["f32"] > 0 and key.endswith(f"|{weights.default_threads()}")
    assert w.kind == weights.choose(rates) and dict(w.rates) == rates
    assert f32_path(tiny_q4).is_file() == (w.kind == "f32")  # a losing copy gives its disk back
    assert w.path == (f32_path(tiny_q4) if w.kind == "f32" else tiny_q4)

    def no_timing(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(weights, "_prompt_rates", no_timing)
    assert plan_weights(tiny_q4, EngineConfig()) == w  # the cached answer, in this process or the next
    assert plan_weights(tiny_q4, EngineConfig(), measure=False) == w
    with pytest.raises(AssertionError, match="measured again"):  # another thread count is another measurement
        plan_weights(tiny_q4, EngineConfig(n_threads=weights.default_threads() + 1))
    assert plan_weights(tiny_q4, EngineConfig(weights="file")).kind == "file"  # explicit choices measure nothing


def test_the_run_computes_with_the_weights_auto_chose(tiny_q4, tmp_path, monkeypatch):
    # whichever auto picks, the engine loads it, and the stages' identity names it
    import json

    from semievol_local.core.runfolder import file_digest, weights_identity
    from semievol_local.engines import weights

    monkeypatch.setenv("SEMIEVOL_WEIGHTS", str(tmp_path))
    key = weights._measure_key(tiny_q4, EngineConfig())
    for rates, kind in (({"file": 500.0, "f32": 100.0}, "file"), ({"file": 100.0, "f32": 500.0}, "f32")):
        (tmp_path / weights.MEASURED).write_text(json.dumps({key: rates}))  # as a measurement left it
        eng = Engine(tiny_q4, EngineConfig(n_ctx=256))
        try:
            assert eng.weights.kind == kind and eng.llm.model_path == str(eng.weights.path)
            assert weights_identity(eng.model_path, eng.weights_kind) == file_digest(tiny_q4) + ("" if kind == "file" else "+f32")
            assert 0 < eng.score(prompt(eng), 3).mass <= 1
        finally:
            eng.close()


def test_float32_files_and_an_unwritable_cache(tiny_model, tiny_q4, tmp_path, monkeypatch):
    from semievol_local.core.errors import UserError
    from semievol_local.engines.weights import inference_weights, plan_weights

    assert plan_weights(tiny_model, EngineConfig()).path == tiny_model  # already float32: no copy
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")
    monkeypatch.setenv("SEMIEVOL_WEIGHTS", str(blocked))
    w = inference_weights(tiny_q4, EngineConfig())  # auto: the file as given, with a warning
    assert w.kind == "file" and w.path == tiny_q4
    with pytest.raises(UserError, match="SEMIEVOL_WEIGHTS"):
        inference_weights(tiny_q4, EngineConfig(weights="f32"))
    assert not list(tmp_path.glob("**/*.tmp"))


def test_switching_adapters_computes_what_each_adapter_computes_alone(tiny_q4, tmp_path):
    # switching back and forth on one engine gives what a fresh engine with that adapter gives
    from semievol_local.core import adapter_gguf

    paths = {"none": None}
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        pairs = {f"model.layers.{b}.self_attn.{p}": (rng.normal(0, 0.5, (64, 4)).astype(np.float32),
                                                     rng.normal(0, 0.5, (4, 64)).astype(np.float32))
                 for b in range(2) for p in ("q_proj", "o_proj")}
        paths[f"a{seed}"] = tmp_path / f"a{seed}.gguf"
        adapter_gguf.write_lora_gguf(paths[f"a{seed}"], "llama", 2, pairs, scale=2.0, rank=4)
    ref = {}
    for name, path in paths.items():
        fresh = Engine(tiny_q4, EngineConfig(n_ctx=256))
        fresh.set_adapter(path)
        ref[name] = fresh.score(prompt(fresh), 3).probs
        fresh.close()
    assert all(np.abs(ref[f"a{i}"] - ref["none"]).max() > 1e-3 for i in (1, 2, 3))  # each adapter does something
    eng = Engine(tiny_q4, EngineConfig(n_ctx=256))
    try:
        for name in ["a1", "none", "a2", "a1", "a3", "none", "a2", "a1"]:
            eng.set_adapter(paths[name])
            np.testing.assert_allclose(eng.score(prompt(eng), 3).probs, ref[name], rtol=0, atol=1e-6)
    finally:
        eng.close()


def test_released_weights_come_back_for_the_next_forward_pass(tiny_q4):
    eng = Engine(tiny_q4, EngineConfig(n_ctx=256))
    try:
        toks = prompt(eng)
        before = eng.score(toks, 3).probs
        eng.release()
        assert eng.released and eng.tokenize("Answer:") == eng.llm.tokenize(b"Answer:", add_bos=False, special=True)
        np.testing.assert_array_equal(eng.score(toks, 3).probs, before)
        assert not eng.released
    finally:
        eng.close()


def test_tokens_are_counted_by_decode_shape_and_the_yardstick_counts_as_no_work(engine):
    from semievol_local.engines.llama_engine import decode_shape

    assert decode_shape(0, 5) == (0, 5) and decode_shape(70, 37) == (128, 40) and decode_shape(300, 150) == (256, 160)
    engine.reset()
    p = prompt(engine)
    shapes0 = {a: dict(d) for a, d in engine.decode_shapes.items()}
    engine.score(p, 3)  # from an empty cache: (0, len(p))
    engine.score(p[:-1] + [p[-2]], 3)  # the same prompt but its last token: one token after len(p) - 1 cached
    got = {k: n - shapes0.get("", {}).get(k, 0) for k, n in engine.decode_shapes[""].items()
           if n - shapes0.get("", {}).get(k, 0)}
    assert got == {decode_shape(0, len(p)): len(p), decode_shape(len(p) - 1, 1): 1}
    before = (engine.decodes, engine.tokens_by_adapter, {a: dict(d) for a, d in engine.decode_shapes.items()})
    assert engine.prefill_rate(16, repeats=1) > 0 and engine.prefill_rate(8, repeats=1, past=40) > 0
    assert (engine.decodes, engine.tokens_by_adapter, engine.decode_shapes) == before

"""The llama.cpp engine on tiny GGUF models: scoring, sampling, prefix reuse, adapters, embeddings."""
import numpy as np
import pytest

from semievol_local.config import EngineConfig
from semievol_local.data import Item
from semievol_local.llama_engine import Engine
from semievol_local.prompts import question_messages

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

    from semievol_local import training

    path = write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True, chat_template=template)
    eng = Engine(path, EngineConfig(n_ctx=256))
    try:
        ids = prompt(eng)
        assert ids[0] == eng.llm.token_bos() and ids.count(eng.llm.token_bos()) == 1
        # training's examples: prompt + answer tokenized as one text, split where the prompt's tokens end
        (p, a), = training.examples(eng, [ITEM])
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
    if s.tokens:
        assert s.tokens[0] == int(np.argmax(engine.logits(toks)[-1]))


def test_embeddings_are_normalized_and_deterministic(engine):
    v = engine.embed(["red green", "a table", "red green"])
    assert v.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(v[0], v[2], atol=1e-6)
    assert not np.allclose(v[0], v[1])


def test_context_overflow_is_a_user_error(engine):
    from semievol_local.errors import UserError

    with pytest.raises(UserError, match="does not fit the context"):
        engine.score([5] * 2000, 3)

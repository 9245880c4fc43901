"""Prompt formats, chat-template rendering, fitting into the context, and answer extraction."""
import pytest
from tinymodel import CHATML

from semievol_local.core.data import Item
from semievol_local.core.errors import UserError
from semievol_local.core.prompts import (ChatTemplate, answers_match, extract_letter, extract_open, fit_prompt,
                                    justify_messages, question_messages)

ITEM = Item(index=0, question="Which is a colour?", options=("red", "table", "seven"), answer="A",
            meta={"gt": "SECRET-LABEL-WORD"})
DEMOS = [Item(index=i, question=f"Demo {i}?", options=("x", "y"), answer="B") for i in range(3)]


def test_question_prompt_has_lettered_options_and_no_metadata():
    msgs = question_messages(ITEM, DEMOS)
    assert msgs[0]["role"] == "system" and "Example 1:" in msgs[0]["content"] and "Example 3:" in msgs[0]["content"]
    assert "Answer: B" in msgs[0]["content"]
    user = msgs[1]["content"]
    assert "A. red\nB. table\nC. seven" in user and '"Answer: X"' in user
    assert all("SECRET" not in m["content"] for m in msgs)


def test_justify_prompt_lists_every_candidate():
    msgs = justify_messages(ITEM, ["I think red. Answer: A", "Answer: B"])
    c = msgs[0]["content"]
    assert "Multiple Answers" in c and "Answer 1:\nI think red. Answer: A" in c and "Answer 2:\nAnswer: B" in c


def test_chatml_render_and_answer_prefix():
    t = ChatTemplate(CHATML)
    text = t.prompt(question_messages(ITEM), answer_prefix=True)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\nAnswer:")


def test_template_without_system_role_folds_system_into_user():
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
              "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    text = ChatTemplate(strict).render(question_messages(ITEM, DEMOS))
    assert text.startswith("<user>You are a helpful assistant") and "Which is a colour?" in text


def test_missing_template_falls_back_to_plain_paragraphs():
    # a base model (gemma-3-270m has no template) continues plain text: no role labels, "Answer:" on its own line
    text = ChatTemplate(None).prompt(question_messages(ITEM, DEMOS), answer_prefix=True)
    assert text.startswith("You are a helpful assistant") and text.endswith("\n\nAnswer:")
    assert "User:" not in text and "Assistant:" not in text


@pytest.mark.parametrize("text,n,expected", [
    ("Answer: B", 3, "B"),                       # the asked-for form
    ("answer is (c)", 3, "C"),                   # lower case, parenthesized
    ("Answer: A ... no wait, Answer: C", 3, "C"),  # the last commitment wins
    ("B. neutral", 3, "B"),                      # a bare leading letter
    ("Answer: E", 3, None),                      # a letter outside the options
    ("I am not sure", 3, None),                  # nothing to extract
    ("the answer is a good one", 3, None),       # the article "a" is not option A
    ("Answer: Although B is tempting", 3, None),  # a word starting with a capital is not a letter
    ("A good product overall", 3, None),         # nor is a sentence's opening "A"
    ("A (negative)", 3, "A"),                    # a lone letter with its option
    ("ANSWER: **B**", 3, "B"),                   # any case of the keyword, markdown emphasis
])
def test_extract_letter(text, n, expected):
    assert extract_letter(text, n) == expected


@pytest.mark.parametrize("pred,gold,ok", [
    ("42", "42", True),
    ("41.7", "42", True),          # within 1e-2 relative
    ("40", "42", False),
    ("1,000", "1000", True),       # thousands separators
    ("The Eiffel Tower", "eiffel tower", True),   # normalized text
    ("Eifel tower", "Eiffel Tower", True),        # fuzzy
    ("Big Ben", "Eiffel Tower", False),
    (None, "3", False),
])
def test_open_answers_match(pred, gold, ok):
    assert answers_match(pred, gold, closed=False) is ok


def test_extract_open_takes_text_after_answer():
    assert extract_open("Let me think. 6*7 = 42.\nAnswer: 42.") == "42"


def test_fit_drops_demos_then_truncates_question_from_the_left():
    t = ChatTemplate(CHATML)
    count = len  # one token per character, like the tiny byte-level tokenizer
    full = fit_prompt(ITEM, DEMOS, t, count, 10_000, answer_prefix=True)
    assert full.demos_dropped == 0 and not full.question_truncated
    no_demo_len = len(t.prompt(question_messages(ITEM), answer_prefix=True))
    fit = fit_prompt(ITEM, DEMOS, t, count, no_demo_len, answer_prefix=True)
    assert fit.demos_dropped == 3 and not fit.question_truncated
    long_item = Item(index=4, question="padding " * 50 + "THE END?", options=ITEM.options, answer="A")
    fit = fit_prompt(long_item, [], t, count, no_demo_len + 20, answer_prefix=True)
    assert fit.question_truncated and "THE END?" in fit.text and len(fit.text) <= no_demo_len + 20
    with pytest.raises(UserError, match="question 5"):
        fit_prompt(long_item, [], t, count, 50, answer_prefix=True)

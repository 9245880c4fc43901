"""The paper's prompt formats, chat-template rendering, and answer extraction.

Prompts are built from `question` and `options` only (plus labeled demonstrations): metadata columns
never reach a prompt. Rendering goes through the GGUF's own chat template (jinja2), so the model sees
the format it was tuned on. This module knows nothing about tokens or engines.
"""
from __future__ import annotations

import difflib
import functools
import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2
import jinja2.sandbox

from .data import LETTERS, Item

ANSWER_PREFIX = "Answer:"
CLOSED_INSTRUCTION = 'Answer with the letter of the correct option, in the form "Answer: X".'
OPEN_INSTRUCTION = 'Give the final answer in the form "Answer: <answer>".'
DEMO_HEADER = "You are a helpful assistant. Here are some examples of questions and their answers:"
JUSTIFY_INSTRUCTION = (
    "Several answers were given to this question and they disagree. Weigh them, "
    "then give the final correct answer in the same form.")
# Used only when a GGUF has no chat template (base models such as gemma-3-270m): the messages as plain
# paragraphs, so that a prompt reads "<examples>\n\n<question>\n\n<instruction>\n\nAnswer:" and the
# model continues plain text, with no role labels it was never tuned on.
FALLBACK_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}"


def format_question(item: Item) -> str:
    """Question text with lettered options: the body of every prompt about `item`."""
    if not item.closed:
        return item.question.strip()
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(item.options))
    return f"{item.question.strip()}\nOptions:\n{opts}"


def instruction(item: Item) -> str:
    return CLOSED_INSTRUCTION if item.closed else OPEN_INSTRUCTION


def demo_block(demos: Sequence[Item]) -> str:
    """Labeled demonstrations as `Example i:` blocks for the system message."""
    blocks = [DEMO_HEADER]
    for i, d in enumerate(demos, 1):
        blocks.append(f"Example {i}:\n{format_question(d)}\n{ANSWER_PREFIX} {d.answer}")
    return "\n\n".join(blocks)


def question_messages(item: Item, demos: Sequence[Item] = ()) -> list[dict]:
    """Chat messages asking `item`, with optional demonstrations in the system message."""
    messages = []
    if demos:
        messages.append({"role": "system", "content": demo_block(demos)})
    messages.append({"role": "user", "content": f"{format_question(item)}\n\n{instruction(item)}"})
    return messages


def justify_messages(item: Item, candidates: Sequence[str]) -> list[dict]:
    """The self-justification prompt: the question, all candidate answers (with their reasoning), and the ask."""
    listed = "\n\n".join(f"Answer {i}:\n{c.strip()}" for i, c in enumerate(candidates, 1))
    content = (f"{format_question(item)}\n\nMultiple Answers:\n{listed}\n\n"
               f"{JUSTIFY_INSTRUCTION} {instruction(item)}")
    return [{"role": "user", "content": content}]


def answer_text(item: Item, answer: str) -> str:
    """The training target for an answer: just `Answer: X`, as the official code trains."""
    return f"{ANSWER_PREFIX} {answer}"


# --- chat templates ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    """A chat template compiled once (SmolLM2's: 5.3 ms to compile, 0.05 ms to render; several renders a question)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    """A GGUF's chat template with its special tokens, rendered in a jinja2 sandbox."""

    source: str | None
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict], *, generation_prompt: bool = True) -> str:
        tmpl = _compiled(self.source or FALLBACK_TEMPLATE)
        kw = dict(add_generation_prompt=generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            return tmpl.render(messages=messages, **kw)
        except jinja2.TemplateError:
            # Some templates (gemma's, for one) refuse a system role: fold it into the first user turn.
            if messages and messages[0]["role"] == "system":
                merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]},
                          *messages[2:]]
                return tmpl.render(messages=merged, **kw)
            raise

    def prompt(self, messages: list[dict], answer_prefix: bool = False) -> str:
        """The text a model continues: rendered messages + the assistant turn's opening (+ `Answer:`)."""
        text = self.render(messages, generation_prompt=True)
        return text + ANSWER_PREFIX if answer_prefix else text


# --- answer extraction ------------------------------------------------------------------------

_NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+"


def extract_letter(text: str, n_options: int) -> str | None:
    """The option letter a response commits to: the last `Answer: X`, else a lone leading letter.

    The keyword matches in any case, the letter only as a capital or in parentheses ("(c)"): "the answer
    is a good one" commits to nothing, and neither does "A good product" (a leading capital and a word)."""
    letters = LETTERS[:n_options]
    hits = re.findall(r"(?i:answer)\s*(?:(?i:is)\s*)?[:：]?\s*\**\s*(?:\(([A-Za-z])\)|\(?([A-Z])\b(?![.'’-]?[A-Za-z]))",
                      text)
    hits = [(a or b).upper() for a, b in hits]  # a letter in parentheses may be lower case: "(c)"
    hits = [h for h in hits if h in letters]
    if hits:
        return hits[-1]
    m = re.match(r"\s*\(?([A-Z])(?:[).:]|\s*$|\s*\n|\s+\()", text)
    if m and m.group(1) in letters:
        return m.group(1)
    return None


def _to_number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def extract_open(text: str) -> str | None:
    """The answer of an open response: what follows the last `Answer:`, else the last line."""
    parts = re.split(r"answer\s*[:：]", text, flags=re.IGNORECASE)
    tail = parts[-1] if len(parts) > 1 else text
    lines = [ln.strip() for ln in tail.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    return (lines[0] if len(parts) > 1 else lines[-1]).strip().rstrip(".")


def normalize_text(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in string.punctuation)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def answers_match(predicted: str | None, gold: str, *, closed: bool) -> bool:
    """Letters match exactly; numbers within relative tolerance 1e-2; short text by normalized fuzzy match."""
    if predicted is None:
        return False
    if closed:
        return predicted.strip().upper() == gold.strip().upper()
    g_nums = re.findall(_NUMBER, gold)
    if g_nums and len(g_nums) == 1 and re.fullmatch(r"\s*(" + _NUMBER + r")\s*\S{0,3}\s*", gold):
        g = _to_number(g_nums[0])
        p_nums = re.findall(_NUMBER, predicted)
        p = _to_number(p_nums[-1]) if p_nums else None
        return p is not None and g is not None and math.isclose(p, g, rel_tol=1e-2, abs_tol=1e-9)
    a, b = normalize_text(predicted), normalize_text(gold)
    return a == b or (len(b) > 3 and difflib.SequenceMatcher(None, a, b).ratio() >= 0.85)


def extract_answer(text: str, item: Item) -> str | None:
    return extract_letter(text, len(item.options)) if item.closed else extract_open(text)


# --- fitting a prompt into the context ---------------------------------------------------------

@dataclass
class Fit:
    text: str
    demos_dropped: int = 0
    question_truncated: bool = False


def fit_prompt(item: Item, demos: Sequence[Item], template: ChatTemplate, count_tokens, budget: int,
               *, answer_prefix: bool) -> Fit:
    """Render `item` so that it takes at most `budget` tokens.

    Demonstrations go first (the farthest, i.e. the last, first), then the question is cut from the
    left. A prompt that cannot fit even with an empty question raises `UserError`.
    """
    from .errors import UserError

    demos = list(demos)
    dropped = 0
    while True:
        text = template.prompt(question_messages(item, demos), answer_prefix=answer_prefix)
        if count_tokens(text) <= budget:
            return Fit(text, dropped, False)
        if not demos:
            break
        demos.pop()
        dropped += 1

    def render(keep: int) -> str:
        cut = item.question[len(item.question) - keep:] if keep else ""
        short = Item(index=item.index, question="…" + cut, options=item.options, answer=item.answer)
        return template.prompt(question_messages(short), answer_prefix=answer_prefix)

    if count_tokens(render(0)) > budget:
        raise UserError(f"question {item.index + 1}: the prompt does not fit in {budget} tokens even without "
                        "its question text and demonstrations; raise --n-ctx")
    lo, hi = 0, len(item.question)  # binary search on how many trailing characters fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(render(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return Fit(render(lo), dropped, True)

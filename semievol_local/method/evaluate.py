"""Accuracy of a model (optionally with a LoRA adapter) on a split, with the majority-class baseline.

`predict` asks every item through the engine (llama.cpp in process, or llama-servers), in score mode (exact option distribution from
one forward pass) or sample mode (greedy generation, answer extracted from the text). Pure bookkeeping
otherwise: no printing; progress goes to a callback.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..core.data import LETTERS, Item, Split
from ..core.errors import UserError
from ..core.prompts import answers_match, extract_answer, fit_prompt, justify_messages
from ..core.selection import entropy
from ..engines.protocol import InferenceEngine

MODES = ("score", "sample")


@dataclass
class Prediction:
    index: int
    predicted: str | None
    gold: str | None = None
    correct: bool | None = None
    probs: list[float] | None = None  # score mode: over the options
    entropy: float | None = None  # score mode: exact entropy (nats); sample mode: mean NLL of the response
    text: str | None = None  # sample mode: the response
    category: str | None = None


@dataclass
class EvalResult:
    accuracy: float
    n: int
    majority_label: str  # the majority class of `majority_from`: the labeled split where there is one
    majority_accuracy: float  # its accuracy on these items
    mode: str
    seconds: float
    items_per_s: float
    truncated_prompts: int = 0
    majority_from: str = "labeled split"  # or "this split" (an oracle: it reads the answers it is scored on)
    oracle_label: str | None = None  # the majority class of the evaluated items themselves
    oracle_accuracy: float | None = None
    per_category: dict[str, dict] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["predictions"] = [asdict(p) for p in self.predictions]
        return d


def resolve_mode(mode: str | None, items: Sequence[Item]) -> str:
    """`score` where every item has options, else `sample`; an explicit choice is checked."""
    closed = all(it.closed for it in items)
    if mode is None or mode == "auto":
        return "score" if closed else "sample"
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "score" and not closed:
        raise UserError("--mode score needs options on every row; this split has open-answer rows, use --mode sample")
    return mode


def ask(engine: InferenceEngine, item: Item, demos: Sequence[Item] = (), *, mode: str = "score",
        max_tokens: int = 256, temperature: float = 0.0, seed: int = 1, justify: list[str] | None = None) -> dict:
    """The model's answer to one question, with `demos` before it (or, with `justify`, the self-justification
    prompt that lists those candidate answers), as a record of what it was asked and what it said. Evaluation,
    prediction and every learner of the pipeline ask through here.

    Score mode: `answer` (the likeliest option letter), `probs` over the options and `letter_mass` (the
    probability the model put on the option letters before renormalising). Sample mode: `answer` (extracted
    from the generated `text`), `nll` (its mean negative log-likelihood) and `n_tokens`; seeded, at
    `temperature` (a justification is greedy). A justification prompt that does not fit the context falls
    back to the plain question (`justify_fallback`); a prompt that had to drop demonstrations or cut its
    question says so (`demos_dropped`, `question_truncated`)."""
    reserve = 1 if mode == "score" else max_tokens
    tokens, info = None, {}
    if justify is not None:
        tokens = engine.tokenize(engine.template.prompt(justify_messages(item, justify), answer_prefix=(mode == "score")))
        if len(tokens) > engine.n_ctx - reserve:  # too long with every candidate: the question alone
            tokens, info["justify_fallback"] = None, True
    if tokens is None:
        fit = fit_prompt(item, demos, engine.template, lambda t: len(engine.tokenize(t)), engine.n_ctx - reserve,
                         answer_prefix=(mode == "score"))
        tokens = engine.tokenize(fit.text)
        if fit.demos_dropped:
            info["demos_dropped"] = fit.demos_dropped
        if fit.question_truncated:
            info["question_truncated"] = True
    if mode == "score":
        s = engine.score(tokens, len(item.options))
        return {"answer": LETTERS[int(np.argmax(s.probs))], "probs": [float(p) for p in s.probs],
                "letter_mass": float(s.mass), **info}
    temp = 0.0 if justify is not None else temperature  # the justifier is greedy, fallback or not
    smp = engine.sample(tokens, [seed], temperature=temp, max_tokens=max_tokens)[0]
    return {"answer": extract_answer(smp.text, item), "text": smp.text, "nll": smp.mean_nll,
            "n_tokens": len(smp.tokens), **info}


def predict_item(engine: InferenceEngine, item: Item, demos: Sequence[Item] = (), *, mode: str = "score",
                 max_tokens: int = 256) -> tuple[Prediction, bool]:
    """One prediction (greedy in sample mode); also whether the prompt had to be shortened to fit the context."""
    r = ask(engine, item, demos, mode=mode, max_tokens=max_tokens)
    if mode == "score":
        pred = Prediction(index=item.index, predicted=r["answer"], probs=r["probs"],
                          entropy=entropy(np.array(r["probs"])))
    else:
        pred = Prediction(index=item.index, predicted=r["answer"], text=r["text"], entropy=r["nll"])
    return pred, bool(r.get("demos_dropped") or r.get("question_truncated"))


def majority(answers: Sequence[str]) -> tuple[str, float]:
    """The most common answer (ties: the first in sorted order) and its share."""
    counts = Counter(answers)
    label = min(counts, key=lambda a: (-counts[a], a))
    return label, counts[label] / len(answers)


def majority_baseline(prior: Sequence[str] | None, items: Sequence[Item]) -> dict:
    """The majority-class baseline: the class a user knows from the labeled split (`prior`), scored on `items`;
    and, apart, the oracle: the majority class of `items` themselves (it reads the answers it is scored on)."""
    gold = [it.answer for it in items]
    oracle_label, oracle_acc = majority(gold)
    if prior:
        label = majority(list(prior))[0]
        acc = float(np.mean([answers_match(label, g, closed=it.closed) for g, it in zip(gold, items)]))
        return {"majority_label": label, "majority_accuracy": acc, "majority_from": "labeled split",
                "oracle_label": oracle_label, "oracle_accuracy": oracle_acc}
    return {"majority_label": oracle_label, "majority_accuracy": oracle_acc, "majority_from": "this split",
            "oracle_label": oracle_label, "oracle_accuracy": oracle_acc}


def evaluate(engine: InferenceEngine, split: Split, *, mode: str | None = None, limit: int | None = None,
             category_column: str | None = None, max_tokens: int = 256, prior: Sequence[str] | None = None,
             on_item: Callable[[Prediction], None] | None = None) -> EvalResult:
    """Accuracy on `split`; `prior`: the labeled split's answers, for the majority-class baseline (without it,
    the baseline is this split's own majority class, marked as such)."""
    items = split.items[:limit] if limit else split.items
    mode = resolve_mode(mode, items)
    if category_column and category_column not in items[0].meta:
        cols = ", ".join(items[0].meta) or "none"
        raise UserError(f"{split.path}: no column {category_column!r} (metadata columns: {cols})")
    engine.reset()  # results depend on this split alone, not on what the engine ran before
    t0 = time.perf_counter()
    by_pos, truncated = {}, 0
    asked = engine.each(range(len(items)),
                         lambda eng, i: predict_item(eng, items[i], mode=mode, max_tokens=max_tokens))
    for i, (pred, cut) in asked:  # over a fleet of llama-servers they finish out of order
        item = items[i]
        truncated += cut
        pred.gold = item.answer
        pred.correct = answers_match(pred.predicted, item.answer, closed=item.closed)
        if category_column:
            pred.category = str(item.meta.get(category_column))
        by_pos[i] = pred
        if on_item:
            on_item(pred)
    preds = [by_pos[i] for i in range(len(items))]
    seconds = time.perf_counter() - t0
    per_cat: dict[str, list[bool]] = defaultdict(list)
    for p in preds:
        if p.category is not None:
            per_cat[p.category].append(bool(p.correct))
    return EvalResult(
        accuracy=float(np.mean([p.correct for p in preds])), n=len(preds), **majority_baseline(prior, items), mode=mode, seconds=seconds, items_per_s=len(preds) / max(seconds, 1e-9),
        truncated_prompts=truncated,
        per_category={c: {"n": len(v), "accuracy": float(np.mean(v))} for c, v in sorted(per_cat.items())},
        predictions=preds)

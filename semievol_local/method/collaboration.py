"""Collaborative learning, one question at a time: the learners (base or warm model, 0-3 demonstrations),
their answers, the self-justification where they disagree (or a majority vote: self-consistency), and the
uncertainty of the answer that became the pseudo-label. What a stage does with many questions is in
`stages`; nothing here reads or writes files, and nothing here sees the unlabeled split's answers."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core import selection
from ..core.config import RunConfig
from ..core.data import LETTERS, Item
from ..core.prompts import normalize_text
from ..engines.protocol import InferenceEngine
from .evaluate import ask


@dataclass(frozen=True)
class Learner:
    warm: bool  # uses the warm adapter (else the base model)
    n_demos: int

    def label(self) -> str:
        return f"{'warm' if self.warm else 'base'}+{self.n_demos}demo"


def learner_configs(cfg: RunConfig) -> list[Learner]:
    """n learners drawn from {base, warm} x {0..3 demonstrations} (App. B.1), distinct while they last.

    A single learner (n = 1, or --no-cl) is M_warm with k demonstrations, as far as --no-iwp / --no-icp
    allow: without collaboration the method keeps its other propagations, so the ablation removes only
    the collaboration (a drawn single learner was the base model with no demonstrations on fpb: its
    selected pseudo-labels were 0.34 accurate against the full method's 0.98)."""
    warm = [True, False] if cfg.iwp else [False]
    demos = list(range(min(cfg.k, 3) + 1)) if cfg.icp else [0]
    n = cfg.learners if cfg.cl else 1
    if n == 1:
        return [Learner(warm[0], demos[-1])]
    pool = [Learner(w, d) for w in warm for d in demos]
    rng = random.Random(cfg.seed)
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def item_seed(seed: int, index: int, learner: int) -> int:
    """A non-zero sampling seed per (run seed, question, learner): llama.cpp treats 0 as 'default'."""
    return 1 + (seed * 1_000_003 + index * 1009 + learner * 7919) % (2**31 - 2)


def ask_learner(engine: InferenceEngine, item: Item, demos: list[Item], mode: str, cfg: RunConfig, seed: int,
         adapter: Path | None, justify: list[str] | None = None) -> dict:
    """One learner (or, with `justify`, the self-justifier) on one question, with its adapter: `evaluate.ask`."""
    engine.set_adapter(adapter)
    return ask(engine, item, demos, mode=mode, max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=seed,
               justify=justify)


def collaborate_one(engine: InferenceEngine, item: Item, demos_all: list[Item], learners: list[Learner], mode: str,
                    cfg: RunConfig, warm: Path | None) -> dict:
    """n learners answer; agreement is the label, else the warm model justifies among the candidates
    (the base model where `warm` is None: without in-weight propagation no adapter takes part).

    The cache starts empty for every question, so a question's result cannot depend on the questions
    before it (a resumed run computes exactly what an uninterrupted one did). Within the question,
    learners run grouped by adapter and by number of demonstrations, so that a learner's prompt reuses
    the cached prefix (the shared demonstrations) of the one before it.
    """
    engine.reset()
    answers: list[dict] = [{}] * len(learners)
    for m in sorted(range(len(learners)), key=lambda m: (not learners[m].warm, learners[m].n_demos, m)):
        ln = learners[m]
        a = ask_learner(engine, item, demos_all[:ln.n_demos], mode, cfg, item_seed(cfg.seed, item.index, m),
                 warm if ln.warm else None)
        answers[m] = {"learner": ln.label(), **a}
    letters = [a["answer"] for a in answers]
    consistent = bool(selection.agree([letters])[0])
    rec = {"index": item.index, "learners": answers, "consistent": consistent}
    if mode == "score":
        avg = np.mean([a["probs"] for a in answers], axis=0)
        rec["entropy"] = float(selection.entropy_rows(avg[None])[0])
        rec["letter_mass"] = float(np.mean([a["letter_mass"] for a in answers]))
    else:
        rec["entropy"] = float(np.mean([a["nll"] for a in answers]))
    if consistent or len(learners) == 1:
        rec["pseudo_label"] = letters[0]
        rec["justified"] = False
        return rec
    if mode == "score":
        cands = [f"Answer: {a['answer']} ({item.options[LETTERS.index(a['answer'])]})" for a in answers]
    else:
        cands = [a["text"] for a in answers]
    # the justifier is M_warm (Eq. 5); without in-weight propagation (`warm` is None) the base model
    j = ask_learner(engine, item, [], mode, cfg, item_seed(cfg.seed, item.index, 999), warm, justify=cands)
    j["adapter"] = "warm" if warm is not None else "base"
    rec.update(pseudo_label=j["answer"], justified=True, justification=j)
    return rec


def self_consistency_one(engine: InferenceEngine, item: Item, demos_all: list[Item], mode: str, cfg: RunConfig,
                         warm: Path | None) -> dict:
    """The LMSI-style baseline (`--labeler self-consistency`): one learner, M_warm with k demonstrations (the
    base model without in-weight propagation, none without in-context propagation), answers n times at
    --temperature; the majority vote is the pseudo-label, and nothing is justified. In score mode the n
    answers are n letters drawn from the learner's option distribution (what n one-letter samples give)."""
    engine.reset()
    ln = learner_configs(dataclasses.replace(cfg, cl=False))[0]
    adapter, demos, n = (warm if ln.warm else None), demos_all[:ln.n_demos], cfg.learners
    rec: dict = {"index": item.index}
    if mode == "score":
        a = ask_learner(engine, item, demos, "score", cfg, 0, adapter)
        p = np.asarray(a["probs"], dtype=np.float64)
        if cfg.temperature <= 0:
            draws = [int(np.argmax(p))] * n
        else:
            q = np.exp(np.log(np.clip(p, 1e-300, 1)) / cfg.temperature)
            draws = np.random.default_rng(item_seed(cfg.seed, item.index, 0)).choice(len(p), size=n, p=q / q.sum())
        cut = {k: a[k] for k in ("demos_dropped", "question_truncated") if k in a}  # what the one prompt lost
        answers = [{"learner": ln.label(), "answer": LETTERS[int(d)], **cut} for d in draws]
        rec.update(distribution=a, entropy=float(selection.entropy_rows(p[None])[0]), letter_mass=a["letter_mass"])
    else:
        answers = [{"learner": ln.label(), **ask_learner(engine, item, demos, "sample", cfg,
                                                  item_seed(cfg.seed, item.index, m), adapter)} for m in range(n)]
        rec["entropy"] = float(np.mean([a["nll"] for a in answers]))
    letters = [a["answer"] for a in answers]
    label = selection.majority_vote(letters, key=(lambda x: x) if item.closed else normalize_text)
    rec.update(learners=answers, consistent=bool(selection.agree([letters])[0]), pseudo_label=label, justified=False)
    return rec


def label_entropy(rec: dict) -> float:
    """The uncertainty of the answer that became the pseudo-label (Eq. 6 is taken on the final response),
    derived by selection from a collaboration record (whose own `entropy` is always the learners').

    Where the learners disagreed, that answer is the justifier's: the entropy of its option distribution
    (score mode) or the mean NLL of its response (sample mode). Where they agreed, the learners': the
    entropy of their averaged distribution, or their mean NLL. (On fpb the averaged distribution of
    disagreeing learners ranked the labels backwards: the low-entropy half was less accurate than the rest.)
    """
    j = rec.get("justification")
    if rec.get("justified") and j:
        if j.get("probs") is not None:
            return float(selection.entropy_rows(np.asarray(j["probs"], dtype=np.float64)[None])[0])
        if j.get("nll") is not None:
            return float(j["nll"])
    return float(rec["entropy"])


def label_mass(rec: dict) -> float | None:
    """Score mode: the probability mass on the option letters behind the pseudo-label (the justifier's where
    it decided, else the learners' mean); None in sample mode."""
    j = rec.get("justification")
    if rec.get("justified") and j and j.get("letter_mass") is not None:
        return float(j["letter_mass"])
    return rec.get("letter_mass")

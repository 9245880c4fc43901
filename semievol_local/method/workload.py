"""What a run will compute, before it starts: the tokens each stage will evaluate or train.

`count` walks the run's own prompt and batch builders (`evaluate.predict_item`, `collaboration.collaborate_one`,
`finetune.examples`) with an engine that tokenizes but computes nothing (`Tally`), so the tokens it counts
are the tokens the stages will evaluate: every prompt after the prefix the engine reuses, binned into
decode shapes as the engines bin them (`protocol.decode_shape`), and every training example. Collaboration is counted on a
sample of the unlabeled questions (COUNT_SAMPLE) and scaled. What cannot be known before the run is
assumed, and the plan says so: the share of questions whose learners disagree and ask for a justification
(JUSTIFIED), how many pseudo-labels selection keeps (theta percent), and sampled answers' length
(--max-tokens, an upper bound). `estimate` turns this work into time and memory.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..core.config import RunConfig, TrainConfig
from ..core.data import limited
from ..engines.protocol import N_BATCH, Sample, Score, decode_shape

COUNT_SAMPLE = 200  # unlabeled questions whose collaboration prompts are counted (evenly spaced), then scaled
JUSTIFIED = 0.5  # assumed share of questions whose learners disagree (fpb, SmolLM2: 0.46-0.52)


class Tally:
    """The inference engine interface for counting: the real engine's tokenizer and template, no forward pass.

    It keeps the tokens its cache would hold, as llama.cpp's engine does (prefix reuse, a cleared cache on
    an adapter switch), and counts every decode by shape. `score` answers 'A' with a uniform distribution (so
    learners agree: justifications are counted apart); `sample` counts --max-tokens generated tokens."""

    def __init__(self, engine):
        self.engine = engine
        self.n_ctx, self.template, self.eos_token = engine.n_ctx, engine.template, engine.eos_token
        self.adapter = None
        self.shapes: Counter = Counter()  # (cached, size) -> tokens
        self.decodes = 0
        self._kv: list[int] = []

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def detokenize(self, tokens: list[int]) -> str:
        return self.engine.detokenize(tokens)

    def letter_tokens(self, n_options: int) -> list[int]:
        return self.engine.letter_tokens(n_options)

    def set_adapter(self, path, scale=None) -> None:
        if path != self.adapter:
            self.adapter = path
            self.reset()

    def reset(self) -> None:
        self._kv = []

    def each(self, work, fn):
        for item in work:
            yield item, fn(self, item)

    def _decode(self, tokens: list[int]) -> None:
        for i in range(0, len(tokens), N_BATCH):
            chunk = tokens[i:i + N_BATCH]
            self.shapes[decode_shape(len(self._kv), len(chunk))] += len(chunk)
            self.decodes += 1
            self._kv.extend(chunk)

    def _prefill(self, tokens: list[int]) -> None:
        keep, limit = 0, min(len(self._kv), len(tokens) - 1)
        while keep < limit and self._kv[keep] == tokens[keep]:
            keep += 1
        del self._kv[keep:]
        self._decode(tokens[keep:])

    def score(self, prompt: list[int], n_options: int):
        self._prefill(prompt)
        return Score(probs=np.full(n_options, 1.0 / n_options), entropy=math.log(n_options), mass=1.0)

    def sample(self, prompt: list[int], seeds: list[int], *, temperature: float = 1.0, max_tokens: int = 256):
        self._prefill(prompt)
        n = max(0, min(max_tokens, self.n_ctx - len(prompt) - 1))
        for _ in seeds:
            del self._kv[len(prompt):]
            for _ in range(n):
                self._decode([0])
        return [Sample(text="", tokens=[], logprobs=np.zeros(1)) for _ in seeds]


@dataclass
class Work:
    """A stage's work: llama.cpp decodes by (cached, size) shape, or MLX training tokens."""

    shapes: Counter = field(default_factory=Counter)
    decodes: float = 0.0
    train_tokens: float = 0.0  # input tokens over every optimizer step
    trunk_tokens: float = 0.0  # the frozen blocks' one pass

    def plus(self, other: "Work", times: float = 1.0) -> "Work":
        shapes = Counter(self.shapes)
        for k, v in other.shapes.items():
            shapes[k] += v * times
        return Work(shapes, self.decodes + other.decodes * times, self.train_tokens + other.train_tokens * times,
                    self.trunk_tokens + other.trunk_tokens * times)

    @property
    def tokens(self) -> float:
        return sum(self.shapes.values()) or self.train_tokens


@dataclass
class Stage:
    """`fixed` work, plus `each` per unlabeled question times `scale(n)` (how many questions' worth)."""

    name: str
    kind: str  # "llama", "train" or "cpu"
    fixed: Work
    each: Work = field(default_factory=Work)
    scale: object = None  # n -> questions' worth of `each` (None: n)
    seconds_cpu: float = 0.0  # "cpu" stages: measured while counting
    lora: bool = False  # "llama" stages: llama.cpp computes with a LoRA adapter (its products cost time too)


def _tally(engine, fn) -> Work:
    t = Tally(engine)
    fn(t)
    return Work(t.shapes, t.decodes)


def _eval_work(engine, test, mode: str, adapter) -> Work:
    from .evaluate import predict_item

    def ask(t):
        t.set_adapter(adapter)
        for it in test:
            predict_item(t, it, mode=mode)

    return _tally(engine, ask)


def _train_work(engine, items, tcfg: TrainConfig, n_blocks: int, trunk_ok: bool) -> tuple[Work, list]:
    from ..training import batching
    from . import finetune

    exs = finetune.examples(engine, items)
    seqs = batching.prepare(exs, tcfg.max_seq_len, "training") if exs else []
    inputs = sum(len(t) - 1 for t, _ in seqs) * (1 - tcfg.val_fraction)
    trunk = inputs if trunk_ok and 0 < tcfg.num_layers < n_blocks else 0.0
    return Work(train_tokens=inputs * tcfg.epochs, trunk_tokens=trunk), exs


def sample_positions(n: int, k: int = COUNT_SAMPLE) -> list[int]:
    """`k` evenly spaced positions of `n` (all of them when n <= k)."""
    return list(range(n)) if n <= k else sorted({int(i) for i in np.linspace(0, n - 1, k)})


def count(engine, task, cfg: RunConfig, tcfg: TrainConfig, mode: str, n_blocks: int, trunk_ok: bool) -> list[Stage]:
    """Every stage of round 1 (and the later rounds' evaluations and fine-tunes) as work, counted with the
    run's own builders; collaboration and the final fine-tune per unlabeled question."""
    from ..core import retrieval
    from . import collaboration

    labeled, unlabeled, test = limited(task, cfg)
    ftcfg = dataclasses.replace(tcfg, lr=cfg.final_lr or tcfg.lr, epochs=cfg.final_epochs or tcfg.epochs)
    warm, exs = _train_work(engine, labeled, tcfg, n_blocks, trunk_ok)
    evals = {a: _eval_work(engine, test, mode, a) for a in (None, "warm")}
    stages = [Stage("warmup", "train", warm), Stage("eval/vanilla", "llama", evals[None]),
              Stage("eval/sft", "llama", evals["warm"], lora=True)]
    if cfg.iwp and unlabeled and all(it.closed for it in labeled + unlabeled):  # the collapse check (stages.probe)
        from .stages import probe_positions

        probed = [unlabeled[i] for i in probe_positions(len(unlabeled))]
        stages.append(Stage("probe", "llama", _eval_work(engine, probed, "score", "warm"), lora=True))
    # retrieval: TF-IDF is timed on the real texts here (seconds); model embeddings are counted (labeled texts
    # once, unlabeled ones per question), their neighbours drawn at random (only their lengths matter here)
    sample = [unlabeled[i] for i in sample_positions(len(unlabeled))]
    per_q = 1.0 / max(1, len(sample))
    k = min(cfg.k, 3) if cfg.icp else 0
    if k and cfg.embedding == "tfidf":
        tic = time.perf_counter()
        lab = [q.question for q in labeled]
        ids, _ = retrieval.knn(retrieval.tfidf_embed(lab, lab), retrieval.tfidf_embed(lab, [q.question for q in sample]), k)
        took = (time.perf_counter() - tic) * (len(labeled) + len(unlabeled)) / (len(labeled) + len(sample))
        stages.append(Stage("round1/retrieval", "cpu", Work(), seconds_cpu=took))
    else:
        ids = np.random.default_rng(0).integers(0, len(labeled), size=(len(sample), k))
        if k:
            per = _embed_work(engine, sample)
            stages.append(Stage("round1/retrieval", "llama", _embed_work(engine, labeled), Work().plus(per, per_q)))
        else:
            stages.append(Stage("round1/retrieval", "cpu", Work()))
    # collaboration: the learners as the pipeline asks them; justifications apart, times JUSTIFIED
    learners = collaboration.learner_configs(cfg)

    def collaborate(t):
        for row, it in enumerate(sample):
            demos = [labeled[i] for i in ids[row]]
            if cfg.labeler == "self-consistency":
                collaboration.self_consistency_one(t, it, demos, mode, cfg, "warm" if cfg.iwp else None)
            else:
                collaboration.collaborate_one(t, it, demos, learners, mode, cfg, "warm" if cfg.iwp else None)

    def justify(t):
        for it in sample:
            letters = "AB" * len(learners)
            cands = ([f"Answer: {c} ({it.options[ord(c) - 65] if it.closed else ''})" for c in letters[:len(learners)]]
                     if mode == "score" else ["x " * cfg.max_tokens] * len(learners))
            t.reset()
            collaboration.ask_learner(t, it, [], mode, cfg, 1, "warm" if cfg.iwp else None, justify=cands)

    collab = Work().plus(_tally(engine, collaborate), per_q)
    if len(learners) > 1 and cfg.labeler != "self-consistency":
        collab = collab.plus(_tally(engine, justify), per_q * JUSTIFIED)
    stages.append(Stage("round1/collaboration", "llama", Work(), collab, lora=cfg.iwp))
    stages.append(Stage("round1/selection", "cpu", Work()))
    # the final fine-tune: labeled (or nothing, continuing M_warm) + the kept share of pseudo-labeled questions
    keep = cfg.theta / 100 if cfg.adaptive_selection and cfg.selection == "percentile" else (
        1.0 if not cfg.adaptive_selection else 0.5)
    pseudo = [dataclasses.replace(it, answer="A" if it.closed else (it.options[0] if it.options else "yes"))
              for it in sample]
    fin_l, _ = _train_work(engine, labeled, ftcfg, n_blocks, trunk_ok)
    fin_p, _ = _train_work(engine, pseudo, ftcfg, n_blocks, trunk_ok)
    fin_l.trunk_tokens = 0.0  # the warm-up's frozen-block outputs of the labeled rows are read back
    fixed = Work() if cfg.final_from_warm else fin_l
    pseudo_each = Work().plus(fin_p, per_q)  # one pseudo-labeled question's training

    def trained(r: int):  # pseudo-labels the round-r fine-tune trains on, for n unlabeled questions
        if cfg.final_from_warm:  # this round's selection only
            return lambda n: n * keep * (1 - keep) ** (r - 1)
        return lambda n: n * (1 - (1 - keep) ** r)  # every round's so far

    stages.append(Stage("round1/final", "train", fixed, pseudo_each, scale=trained(1)))
    stages.append(Stage("round1/eval", "llama", evals["warm"], lora=True))
    for r in range(2, cfg.rounds + 1):  # later rounds: the questions left after each round kept its share
        stages += [Stage(f"round{r}/collaboration", "llama", Work(), collab,
                         scale=lambda n, r=r: n * (1 - keep) ** (r - 1), lora=True),
                   Stage(f"round{r}/final", "train", fixed, pseudo_each, scale=trained(r)),
                   Stage(f"round{r}/eval", "llama", evals["warm"], lora=True)]
    return stages


def _embed_work(engine, items) -> Work:
    """Embedding each question: one decode of its tokens from an empty cache (no logits read)."""
    w = Work()
    for q in items:
        n_tok = len(engine.tokenize(q.question))
        w.shapes[decode_shape(0, n_tok)] += n_tok
    return w

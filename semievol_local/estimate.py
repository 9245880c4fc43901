"""What a run will compute, and how long it will take on this machine, before it starts.

`count` walks the run's own prompt and batch builders (`evaluate.predict_item`, `pipeline.collaborate_one`,
`training.examples`) with an engine that tokenizes but computes nothing (`Tally`), so the tokens it counts
are the tokens the stages will evaluate: every prompt after the prefix the engine reuses, binned into
decode shapes as `llama_engine` bins them, and every training example. Collaboration is counted on a
sample of the unlabeled questions (COUNT_SAMPLE) and scaled. What cannot be known before the run is
assumed, and the plan says so: the share of questions whose learners disagree and ask for a justification
(JUSTIFIED), how many pseudo-labels selection keeps (theta percent), and sampled answers' length
(--max-tokens, an upper bound).

`calibrate` measures, for about CALIBRATION_SECONDS, llama.cpp's prompt rate for the decode shapes that
hold most of the tokens and MLX's training rate on a few of the warm-up's own examples, with the run's
weights, threads and options. `Plan.at(n)` gives seconds and peak memory per stage for n unlabeled
questions; `fit_budget` the largest n that fits a time budget. Nothing here writes into a run folder.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import EngineConfig, RunConfig, TrainConfig
from .errors import UserError

log = logging.getLogger(__name__)

COUNT_SAMPLE = 200  # unlabeled questions whose collaboration prompts are counted (evenly spaced), then scaled
JUSTIFIED = 0.5  # assumed share of questions whose learners disagree (fpb, SmolLM2: 0.46-0.52)
CALIBRATION_SECONDS = 30.0  # llama.cpp shapes get about 40% of it, MLX's training steps the rest
N_BATCH = 512  # llama.cpp's batch: a longer prompt is decoded in chunks of this size (`llama_engine`)


# --- counting -----------------------------------------------------------------------------------

class Tally:
    """The inference engine interface for counting: the real engine's tokenizer and template, no forward pass.

    It keeps the tokens its cache would hold, as `llama_engine.Engine` does (prefix reuse, a cleared cache on
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

    def _decode(self, tokens: list[int]) -> None:
        from .llama_engine import decode_shape

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
        from .llama_engine import Score

        self._prefill(prompt)
        return Score(probs=np.full(n_options, 1.0 / n_options), entropy=math.log(n_options), mass=1.0)

    def sample(self, prompt: list[int], seeds: list[int], *, temperature: float = 1.0, max_tokens: int = 256):
        from .llama_engine import Sample

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
    from . import batching, training

    exs = training.examples(engine, items)
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
    from . import pipeline, retrieval

    labeled, unlabeled, test = task["labeled"].items, task["unlabeled"].items, task["test"].items
    if cfg.limit_test:
        test = test[:cfg.limit_test]
    if cfg.limit_unlabeled:
        unlabeled = unlabeled[:cfg.limit_unlabeled]
    ftcfg = dataclasses.replace(tcfg, lr=cfg.final_lr or tcfg.lr, epochs=cfg.final_epochs or tcfg.epochs)
    warm, exs = _train_work(engine, labeled, tcfg, n_blocks, trunk_ok)
    evals = {a: _eval_work(engine, test, mode, a) for a in (None, "warm")}
    stages = [Stage("warmup", "train", warm), Stage("eval/vanilla", "llama", evals[None]),
              Stage("eval/sft", "llama", evals["warm"], lora=True)]
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
    learners = pipeline.learner_configs(cfg)

    def collaborate(t):
        for row, it in enumerate(sample):
            demos = [labeled[i] for i in ids[row]]
            if cfg.labeler == "self-consistency":
                pipeline.self_consistency_one(t, it, demos, mode, cfg, "warm" if cfg.iwp else None)
            else:
                pipeline.collaborate_one(t, it, demos, learners, mode, cfg, "warm" if cfg.iwp else None)

    def justify(t):
        for it in sample:
            letters = "AB" * len(learners)
            cands = ([f"Answer: {c} ({it.options[ord(c) - 65] if it.closed else ''})" for c in letters[:len(learners)]]
                     if mode == "score" else ["x " * cfg.max_tokens] * len(learners))
            t.reset()
            pipeline._ask(t, it, [], mode, cfg, 1, "warm" if cfg.iwp else None, justify=cands)

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
    from .llama_engine import decode_shape

    w = Work()
    for q in items:
        n_tok = len(engine.tokenize(q.question))
        w.shapes[decode_shape(0, n_tok)] += n_tok
    return w


# --- calibration --------------------------------------------------------------------------------

@dataclass
class Rates:
    llama: dict = field(default_factory=dict)  # (lora, (cached, size)) -> tokens/s, as measured
    llama_peak_mb: float = 0.0
    train: float | None = None  # input tokens/s of a step
    trunk: float | None = None  # tokens/s of the frozen blocks' pass
    per_decode: float = 0.0  # seconds each llama.cpp call costs beyond its tokens (prompt building, logits)
    train_overhead: float = 0.0  # seconds a fine-tune spends on anything but tokens (model load, compilation)
    train_peak_mb: float = 0.0
    seconds: float = 0.0  # the calibration's own time

    def llama_rate(self, shape: tuple[int, int], lora: bool = False) -> float | None:
        """The rate measured at the nearest shape, with an adapter where `lora` (where measured: else without)."""
        same = [k for k in self.llama if k[0] == lora] or list(self.llama)
        if not same:
            return None
        near = min(same, key=lambda k: abs(k[1][0] - shape[0]) / 128 + abs(k[1][1] - shape[1]) / 8)
        return self.llama[near]


def calibrate(engine, model_path: Path, stages: list[Stage], exs: list, tcfg: TrainConfig, n: int,
              budget: float = CALIBRATION_SECONDS, questions=()) -> Rates:
    """llama.cpp's prompt rate for the decode shapes holding most tokens (random tokens; for the stages that
    compute with a trained adapter, with a random one of the same shape: its products cost time too), and
    what each call costs beyond its tokens (a few of `questions` answered for real, against their count at
    those rates), then a few MLX training steps on the warm-up's own examples of about median length: within
    about `budget` seconds (a model that takes longer per step gets one step)."""
    import tempfile

    from .adapter_gguf import random_adapter
    from .runfolder import PeakMemory

    rates, tic = Rates(), time.perf_counter()
    if not engine.remote:  # in process; llama-servers (`--server`) are not measured here
        total = Counter()  # (lora, shape) -> tokens
        for s in stages:
            if s.kind == "llama":
                total.update({(s.lora, k): v for k, v in s.fixed.shapes.items()})
                total.update({(s.lora, k): v * n for k, v in s.each.shapes.items()})
        with PeakMemory() as peak, tempfile.TemporaryDirectory(prefix="semievol-plan-") as tmp:
            lora = random_adapter(Path(tmp) / "adapter.gguf", model_path, tcfg.keys, tcfg.num_layers, tcfg.rank,
                                  tcfg.scale) if any(k[0] for k in total) else None
            engine.set_adapter(None)
            engine.prefill_rate(16, repeats=1)  # warm-up: threads, buffers
            for key, _ in total.most_common():
                if time.perf_counter() - tic > 0.4 * budget:
                    break
                engine.set_adapter(lora if key[0] else None)
                shape = key[1]
                rates.llama[key] = engine.prefill_rate(shape[1], repeats=1, past=min(shape[0], engine.n_ctx - 64))
            engine.set_adapter(None)
            if rates.llama and questions:
                rates.per_decode = _per_decode(engine, rates, questions, tic + 0.55 * budget)
        rates.llama_peak_mb = peak.peak_mb
    if exs:
        rates.train, rates.trunk, rates.train_overhead, rates.train_peak_mb = _train_rate(
            engine, model_path, exs, tcfg, budget - (time.perf_counter() - tic))
    rates.seconds = time.perf_counter() - tic
    return rates


def _per_decode(engine, rates: Rates, questions, until: float, most: int = 8) -> float:
    """Seconds per llama.cpp call beyond its tokens: some of `questions` scored for real (each one at least,
    up to `most` or the clock `until`), less what their decodes take at the measured rates, per decode."""
    from .evaluate import predict_item

    tally = Tally(engine)
    engine.reset()
    spent = 0.0
    for i, it in enumerate(questions[:most]):
        if i and time.perf_counter() > until:
            break
        predict_item(tally, it)
        tic = time.perf_counter()
        predict_item(engine, it)
        spent += time.perf_counter() - tic
    engine.reset()
    tokens_s = sum(v / rates.llama_rate(k) for k, v in tally.shapes.items())
    return max(0.0, spent - tokens_s) / max(1, tally.decodes)


class _Enough(Exception):
    pass


def _train_rate(engine, model_path: Path, exs: list, tcfg: TrainConfig, budget: float):
    """(step tokens/s, trunk tokens/s or None, peak MB) of up to 3 steps (the first compiles, so it is not
    used unless it is the only one) on batches of the warm-up's examples nearest the median length; the
    frozen blocks' pass timed between its first and last batch."""
    import gc
    import tempfile

    from . import mlx_engine
    from .blas import trim_malloc
    from .runfolder import PeakMemory

    from .batching import PAD_SEQ

    # examples of one padded length (the median's bucket, and its nearest neighbours where it holds too few):
    # every step then has one shape, compiled once, as a real run's repeated shapes are
    lengths = np.array([len(p) + len(a) for p, a in exs])
    bucket = -(-(lengths - 1) // PAD_SEQ)
    rows = min(len(exs), 3 * tcfg.batch_size)
    order = np.lexsort((np.abs(lengths - np.median(lengths)), np.abs(bucket - np.median(bucket))))
    pick = [exs[i] for i in order[:rows]]
    mean_inputs = float(np.mean([len(p) + len(a) - 1 for p, a in pick]))
    cfg = dataclasses.replace(tcfg, epochs=1.0, val_fraction=0.0, save_every=10**9, warmup=0.0, grad_accum=1,
                              hosts="")
    steps: list[dict] = []
    ticks: list[tuple[float, int]] = []  # (time, sequences through the frozen blocks)
    tic = time.perf_counter()

    def on_step(info):
        steps.append({**info, "at": time.perf_counter()})
        if info["step"] < info["total_steps"] and time.perf_counter() - tic > budget:
            raise _Enough

    engine.release()  # as the pipeline does while MLX trains
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as peak:
        try:
            mlx_engine.train(model_path, pick, cfg, tmp, valid_examples=[], on_step=on_step,
                             on_trunk=lambda done, total: ticks.append((time.perf_counter(), done)))
        except _Enough:
            pass
    gc.collect()
    mlx_engine.mx.clear_cache()
    trim_malloc()
    if not steps:
        return None, None, 0.0, peak.peak_mb
    timed = steps[1:] or steps
    rate = sum(s["tokens"] for s in timed) / sum(s["tokens"] / s["tokens_per_s"] for s in timed)
    trunk = None
    if len(ticks) >= 2 and ticks[-1][0] > ticks[0][0]:
        trunk = (ticks[-1][1] - ticks[0][1]) * mean_inputs / (ticks[-1][0] - ticks[0][0])
    # what a fine-tune pays besides its tokens: loading the model, compiling the step (the first step's excess)
    trunk_s = len(pick) * mean_inputs / trunk if trunk else 0.0
    overhead = max(0.0, steps[0]["at"] - tic - trunk_s - steps[0]["tokens"] / rate)
    return rate, trunk, overhead, peak.peak_mb


# --- the plan -------------------------------------------------------------------------------------

@dataclass
class Row:
    stage: str
    tokens: float
    rate: float | None  # tokens/s
    seconds: float | None
    peak_mb: float | None


@dataclass
class Plan:
    stages: list[Stage]
    rates: Rates
    n_unlabeled: int  # the questions the run would pseudo-label
    trunk_first: bool  # frozen blocks computed once (their pass is timed apart)
    assumptions: str

    def at(self, n: int | None = None) -> list[Row]:
        n = self.n_unlabeled if n is None else n
        rows = []
        for s in self.stages:
            w = s.fixed.plus(s.each, s.scale(n) if s.scale else n)
            if s.kind == "cpu":
                rows.append(Row(s.name, 0, None, s.seconds_cpu * (n / max(1, self.n_unlabeled)), None))
            elif s.kind == "llama":
                secs = None
                if self.rates.llama:
                    secs = (sum(v / self.rates.llama_rate(k, s.lora) for k, v in w.shapes.items())
                            + w.decodes * self.rates.per_decode)
                tok = sum(w.shapes.values())
                rows.append(Row(s.name, tok, tok / secs if secs else None, secs, self.rates.llama_peak_mb or None))
            else:
                secs = None
                if self.rates.train:
                    secs = w.train_tokens / self.rates.train + (self.rates.train_overhead if w.train_tokens else 0)
                    if w.trunk_tokens:  # unmeasured (one batch of the frozen pass): at the step rate, high
                        secs += w.trunk_tokens / (self.rates.trunk or self.rates.train)
                rows.append(Row(s.name, w.train_tokens, w.train_tokens / secs if secs else None, secs,
                                self.rates.train_peak_mb or None))
        return rows

    def seconds(self, n: int | None = None) -> float | None:
        rows = self.at(n)
        return None if any(r.seconds is None for r in rows) else sum(r.seconds for r in rows)


def plan(model_path: Path, data: Path, cfg: RunConfig, tcfg: TrainConfig, ecfg: EngineConfig) -> Plan:
    """The run's estimate: its work counted with the pipeline's own prompt and batch builders, the rates
    calibrated on this machine with the engine the run will use. Nothing is written into a run folder."""
    from . import config
    from .data import load_task
    from .engines import load
    from .evaluate import resolve_mode

    for c in (cfg, tcfg, ecfg):
        config.check(c)
    task = load_task(data)
    items = task["labeled"].items + task["unlabeled"].items + task["test"].items
    mode = resolve_mode(None if cfg.mode == "auto" else cfg.mode, items)
    return plan_run(load(model_path, ecfg), model_path, task, cfg, tcfg, mode)


def plan_run(engine, model_path: Path, task, cfg: RunConfig, tcfg: TrainConfig, mode: str) -> Plan:
    """Count the run's work and calibrate the rates on this machine (about CALIBRATION_SECONDS)."""
    from . import gguf_loader, training
    from .models import read_gguf

    reader = read_gguf(Path(model_path))
    arch = reader.fields.get("general.architecture")
    n_blocks = int(reader.fields.get(f"{arch}.block_count") or 0)
    spec = gguf_loader.ARCHITECTURES.get(arch)
    trunk_ok = bool(spec and spec.trunk_cache)
    stages = count(engine, task, cfg, tcfg, mode, n_blocks, trunk_ok)
    n = len(task["unlabeled"].items)
    n = min(n, cfg.limit_unlabeled) if cfg.limit_unlabeled else n
    exs = training.examples(engine, task["labeled"].items)
    questions = [it for it in task["labeled"].items if it.options] if mode == "score" else []
    rates = calibrate(engine, model_path, stages, exs, tcfg, n, questions=questions)
    keep = f"{cfg.theta:g}%" if cfg.adaptive_selection and cfg.selection == "percentile" else "an assumed share"
    text = (f"assumed: learners disagree on {JUSTIFIED:.0%} of questions (each then asks a justification), "
            f"selection keeps {keep} of the pseudo-labels")
    if mode == "sample":
        text += f", every sampled answer is --max-tokens {cfg.max_tokens} long (an upper bound)"
    if not rates.llama:
        text += "; llama.cpp rates not measured (--server)"
    elif questions:
        text += f"; each llama.cpp call costs {rates.per_decode * 1e3:.0f} ms beyond its tokens"
    return Plan(stages, rates, n, trunk_ok, text + f"; calibrated in {rates.seconds:.0f} s")


def fit_budget(plan: Plan, budget: float, text: str) -> int:
    """The largest unlabeled count (up to the plan's) whose estimated run fits `budget` seconds."""
    if plan.seconds(plan.n_unlabeled) is None:
        raise UserError("--time-budget needs the rates measured in this process; leave out --server")
    floor = plan.seconds(1)
    if floor > budget:
        raise UserError(f"--time-budget {text}: too small; the warm-up and evaluations alone take about "
                        f"{clock(plan.seconds(0))} here, before any unlabeled question (give at least "
                        f"{clock(floor * 1.1)})")
    lo, hi = 1, plan.n_unlabeled  # seconds(n) grows with n: the largest n within the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan.seconds(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"

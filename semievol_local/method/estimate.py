"""How long a run will take on this machine, before it starts: its work (`workload.count`) at rates
measured here.

`calibrate` measures, for about CALIBRATION_SECONDS, llama.cpp's prompt rate for the decode shapes that
hold most of the tokens (with a random adapter of the run's LoRA shape for the stages that compute with
one) and MLX's training rate on a few of the warm-up's own examples, with the run's weights, threads and
options. `Plan.at(n)` gives seconds and peak memory per stage for n unlabeled questions; `fit_budget` the
largest n that fits a time budget. Nothing here writes into a run folder.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import EngineConfig, RunConfig, TrainConfig
from ..core.data import limited
from ..core.errors import UserError
from .workload import JUSTIFIED, Stage, Tally, count

log = logging.getLogger(__name__)

CALIBRATION_SECONDS = 30.0  # llama.cpp shapes get about 40% of it, MLX's training steps the rest


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

    from ..core.adapter_gguf import random_adapter
    from ..core.runfolder import PeakMemory

    if exs:  # a training this machine cannot hold is refused before minutes of measuring (and a 30 GB load)
        from ..training.mlx_engine import memory_check

        memory_check(model_path, exs, tcfg)
    rates, tic = Rates(), time.perf_counter()
    if engine.prefill_rate(16, repeats=1) is not None:  # a warm-up (threads, buffers); None: llama-servers
        total = Counter()  # (lora, shape) -> tokens
        for s in stages:
            if s.kind == "llama":
                total.update({(s.lora, k): v for k, v in s.fixed.shapes.items()})
                total.update({(s.lora, k): v * n for k, v in s.each.shapes.items()})
        with PeakMemory() as peak, tempfile.TemporaryDirectory(prefix="semievol-plan-") as tmp:
            lora = random_adapter(Path(tmp) / "adapter.gguf", model_path, tcfg.keys, tcfg.num_layers, tcfg.rank,
                                  tcfg.scale) if any(k[0] for k in total) else None
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

    from ..core.runfolder import PeakMemory
    from ..training import mlx_engine
    from ..training.blas import trim_malloc

    from ..training.batching import PAD_SEQ

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
    from ..core import config
    from ..core.data import load_task
    from ..engines import load
    from .evaluate import resolve_mode

    for c in (cfg, tcfg, ecfg):
        config.check(c)
    task = load_task(data)
    items = task["labeled"].items + task["unlabeled"].items + task["test"].items
    mode = resolve_mode(None if cfg.mode == "auto" else cfg.mode, items)
    return plan_run(load(model_path, ecfg), model_path, task, cfg, tcfg, mode)


def plan_run(engine, model_path: Path, task, cfg: RunConfig, tcfg: TrainConfig, mode: str) -> Plan:
    """Count the run's work and calibrate the rates on this machine (about CALIBRATION_SECONDS)."""
    from ..core import gguf_file
    from ..training import gguf_loader
    from . import finetune

    reader = gguf_file.read(Path(model_path))
    arch = reader.fields.get("general.architecture")
    n_blocks = int(reader.fields.get(f"{arch}.block_count") or 0)
    spec = gguf_loader.ARCHITECTURES.get(arch)
    trunk_ok = bool(spec and spec.trunk_cache)
    stages = count(engine, task, cfg, tcfg, mode, n_blocks, trunk_ok)
    labeled, unlabeled, _ = limited(task, cfg)
    n = len(unlabeled)
    exs = finetune.examples(engine, labeled)
    questions = [it for it in labeled if it.options] if mode == "score" else []
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

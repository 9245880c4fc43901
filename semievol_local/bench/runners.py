"""The benchmark runners that run the pipeline: the paper's tables at laptop scale (`quality`), the sizes users
bring (`sizes`), training against PyTorch + PEFT (`train_vs_peft`), and pseudo-labeling speed (`pseudo_label`).

`quality` runs the pipeline once per variant (main table per task; ablations, sensitivity and rounds on
the first task). Variants of one task are sibling run folders that share every stage whose inputs are
identical, so an ablation re-runs only what its flag changes. `pseudo_label` times the paper's generative
recipe against score mode on the same questions, demonstrations, learners and warm adapter. Both read
the unlabeled split's held-back answers, for reporting pseudo-label accuracy only. Their JSON becomes
text in `results`; nothing published is typed in by hand.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from ..core.config import EngineConfig, RunConfig, TrainConfig
from ..core.data import find_split_file, load_heldout, load_task
from ..core.errors import UserError
from ..core.files import atomic_write_text
from ..core.prompts import answers_match
from ..core.runfolder import RunFolder
from ..engines import load
from ..method import collaboration, estimate, pipeline
from ..method.report import build_report, error_reduction, paired, paired_pooled, stage_label, stage_seconds
from .results import machine
from .whole_run import last_eval, last_pseudo

SUITES = ("main", "ablation", "sensitivity", "rounds", "baselines", "headline")
ABLATIONS = [("full", {}), ("w/o IWP", {"iwp": False}), ("w/o ICP", {"icp": False}),
             ("w/o CL", {"cl": False}), ("w/o AS", {"adaptive_selection": False})]
# What a reviewer would compare SemiEvol with, each one flag away from it (and a row of its own).
BASELINES = [("SemiEvol", {}),
             ("self-consistency (LMSI-style vote)", {"labeler": "self-consistency", "selection": "vote"}),
             ("fixed entropy threshold", {"selection": "fixed"}),
             ("labeled + all pseudo-labels", {"adaptive_selection": False})]
# The table `--seeds` is for: SemiEvol against the strongest baseline and its one ablation that won alone.
HEADLINE = [BASELINES[0], BASELINES[1], ABLATIONS[2]]
LEARNERS = (1, 2, 4)  # paper Fig. 3
THETAS = (30.0, 50.0, 80.0, 100.0)
ROUNDS = 2  # paper Fig. 7: rounds 0 (SFT) to 2


# --- quality ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    table: str
    row: str
    data: Path
    overrides: tuple  # ((field, value), ...) that differ from the base RunConfig

    @property
    def folder(self) -> str:
        return "full" if not self.overrides else "_".join(f"{k}-{v}" for k, v in self.overrides)


def quality_plan(datas: list[Path], suites: list[str], cfg: RunConfig) -> list[Variant]:
    """Every (table, row) with its task and options; rows with the same options share one run."""
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise UserError(f"--suite {bad[0]!r}: choose from {', '.join(SUITES)}")
    if not datas:
        raise UserError("give at least one --data task folder")

    def v(table, row, data, **over):
        return Variant(table, row, Path(data), tuple(sorted((k, val) for k, val in over.items() if getattr(cfg, k) != val)))

    first, plan = datas[0], []
    if "main" in suites:
        plan += [v("main", Path(d).name, d) for d in datas]
    if "ablation" in suites:
        plan += [v("ablation", name, first, **over) for name, over in ABLATIONS]
    if "sensitivity" in suites:
        plan += [v("sensitivity", f"n={n}", first, learners=n) for n in LEARNERS]
        plan += [v("sensitivity", f"theta={t:g}%", first, theta=t) for t in THETAS]
    if "baselines" in suites:
        plan += [v("baselines", name, first, **over) for name, over in BASELINES]
    if "headline" in suites:
        plan += [v("headline", name, first, **over) for name, over in HEADLINE]
    if "rounds" in suites:
        plan += [v("rounds", "rounds", first, rounds=max(ROUNDS, cfg.rounds))]
    return plan


def quality(model_path: Path, datas: list[Path], out: Path, suites: list[str], cfg: RunConfig, tcfg: TrainConfig,
            ecfg: EngineConfig, reporter=None, share_extra: tuple[Path, ...] = (), on_run=lambda folder: None,
            command: str = "", seeds: int = 1) -> dict:
    """Run every variant of the plan (shared stages reused) and gather the paper-style tables; with `seeds` > 1,
    the whole plan again with each further training seed (warm-up and final fine-tune: --train-seed + s, under
    OUT/seed<s>/), and a table of every method's mean and spread over the seeds with a pooled paired test."""
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: give at least 1")
    plan = quality_plan([Path(d) for d in datas], suites, cfg)
    for d in datas:  # every task is checked before hours go into the first one
        load_task(Path(d))
    roots = [Path(out) if s == 0 else Path(out) / f"seed{s}" for s in range(seeds)]
    # a further seed reuses the first seed's stages that no training seed reaches (the vanilla evaluation)
    every = [_quality_runs(model_path, plan, root, cfg, dataclasses.replace(tcfg, seed=tcfg.seed + s), ecfg, reporter,
                           share_extra + (_run_folders(roots[0], plan) if s else ()), on_run)
             for s, root in enumerate(roots)]
    runs = every[0]
    tables = _quality_tables(plan, runs, Path(out))
    if seeds > 1:
        tables["seeds"] = seed_table(plan, every, roots, tcfg.seed)
        tables["probe"] = probe_table(plan, every, tcfg.seed)
    # the whole run is the full method's (the first task's), whichever suites were asked for
    first = next((var for var in plan if var.data == plan[0].data and not var.overrides), plan[0])
    whole = runs[(first.data, first.folder)][1]["stages"]
    tables["whole_run"] = [{"stage": stage_label(n, s), "seconds": stage_seconds(s), "peak_rss_mb": round(s["peak_rss_mb"])}
                           for n, s in whole.items()]
    return {"benchmark": "quality", "machine": machine(), "command": command, "model": str(model_path),
            "tasks": [str(d) for d in datas], "suites": list(suites), "seeds": seeds,
            "run": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
            "whole_run": {"task": first.data.name, "seconds": round(sum(s["seconds"] for s in whole.values()), 1),
                          "peak_rss_mb": max((s["peak_rss_mb"] for s in whole.values()), default=None),
                          "untimed_attempts": any(s.get("untimed_attempts") for s in whole.values())},
            "tables": tables}


def _run_folders(root: Path, plan: list[Variant]) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(root / var.data.name / var.folder for var in plan))


def _quality_runs(model_path, plan, out: Path, cfg, tcfg, ecfg, reporter, share_extra, on_run) -> dict:
    """(task, variant folder name) -> (folder, report), one run per distinct variant, siblings sharing stages."""
    runs: dict[tuple[Path, str], tuple[Path, dict]] = {}
    for var in plan:
        key = (var.data, var.folder)
        if key in runs:
            continue
        task_dir = out / var.data.name
        folder = task_dir / var.folder
        siblings = tuple(p for p in task_dir.glob("*") if p.is_dir() and p != folder) if task_dir.exists() else ()
        siblings += tuple(Path(p) for p in share_extra)
        on_run(folder)
        pipeline.run_semievol(model_path, var.data, folder, dataclasses.replace(cfg, **dict(var.overrides)), tcfg,
                              ecfg, reporter, share=siblings)
        runs[key] = folder, build_report(folder)
    return runs


def seed_table(plan: list[Variant], every: list[dict], roots: list[Path], seed0: int) -> list[dict]:
    """Per method of the first task (SFT, then each variant), its test accuracy over the seeds: mean, standard
    deviation, range, the exact McNemar p against the full method for each seed, and one sign test pooled over
    the seeds with the test questions as units (`report.paired_pooled`)."""
    first = plan[0].data
    variants = list(dict.fromkeys((v.folder, v.row if v.table != "main" else "SemiEvol") for v in plan
                                  if v.data == first))
    full = [runs[(first, "full")][0] if (first, "full") in runs else None for runs in every]
    if any(f is None for f in full):
        return []

    def sft(folder: Path) -> dict:
        return json.loads((folder / "eval" / "sft" / "eval.json").read_text())

    methods = [("SFT (no pseudo-labels)", [sft(f) for f in full])]
    methods += [(row, [last_eval(runs[(first, folder)][0]) for runs in every]) for folder, row in variants]
    rows = []
    for name, evals in methods:
        acc = np.array([e["accuracy"] for e in evals])
        pairs = [(e, last_eval(f)) for e, f in zip(evals, full)]
        same = all(e is last for e, last in pairs) or name == "SemiEvol"
        per = [None if same else (paired(a, b) or {}).get("p_value") for a, b in pairs]
        pooled = None if same else (paired_pooled(pairs) or {}).get("p_value")
        rows.append({"method": name, "seeds": ", ".join(str(seed0 + s) for s in range(len(evals))),
                     "mean": float(acc.mean()), "sd": float(acc.std(ddof=1)) if len(acc) > 1 else None,
                     "min": float(acc.min()), "max": float(acc.max()),
                     "p_vs_full_per_seed": ", ".join("-" if p is None else f"{p:.3g}" for p in per),
                     "p_vs_full_pooled": pooled})
    return rows


def probe_table(plan: list[Variant], every: list[dict], seed0: int) -> list[dict]:
    """Per seed, what the collapse check saw of the first task's warm-up (a seed whose warm-up collapsed ran on
    only with --force)."""
    first, rows = plan[0].data, []
    for s, runs in enumerate(every):
        folder = runs.get((first, "full"), (None,))[0]
        probe = folder / "probe" / "probe.json" if folder else None
        if probe and probe.exists():
            found = json.loads(probe.read_text())
            rows.append({"seed": seed0 + s, "warm-up's top answer": found["top"], "its share": found["top_share"],
                         "labeled share of that class": found["labeled"].get(found["top"]),
                         "labeled largest class": found["labeled_top_share"], "collapsed": found["collapsed"]})
    return rows


def _quality_tables(plan: list[Variant], runs: dict, out: Path) -> dict[str, list[dict]]:
    tables: dict[str, list[dict]] = {}
    for var in plan:
        folder, rep = runs[(var.data, var.folder)]
        a = rep["accuracy"]
        if var.table == "main":
            row = {"task": var.row, "majority": a["majority"], "vanilla": a["vanilla"], "sft": a["sft"],
                   "semievol": a["semievol"], "err_red_vs_vanilla": error_reduction(a["vanilla"], a["semievol"]),
                   "err_red_vs_sft": error_reduction(a["sft"], a["semievol"]),
                   "p_vs_sft": (rep.get("semievol_vs_sft_paired") or {}).get("p_value")}
            tables.setdefault("main", []).append(row)
            st = last_pseudo(rep)  # against the held-back answers: reporting only
            tables.setdefault("pseudo_labels", []).append(
                {"task": var.row, "questions": st.get("n"), "consistency_rate": st.get("consistency_rate"),
                 **{f"accuracy_{k}": st.get(f"accuracy_{k}") for k in ("all", "consistent", "justified", "selected")},
                 "selected": st.get("selected")})
        elif var.table in ("ablation", "sensitivity", "baselines", "headline"):
            st = last_pseudo(rep)
            full = Path(out) / var.data.name / "full"
            has_full = (full / "run.json").exists()
            pv = paired(last_eval(folder), last_eval(full)) if folder != full and has_full else None
            if var.table not in tables:  # the reference: M_warm alone (no pseudo-labels) on the same test questions
                ps = paired(json.loads((folder / "eval" / "sft" / "eval.json").read_text()), last_eval(full)) \
                    if has_full else None
                tables[var.table] = [{"variant": "SFT (no pseudo-labels)", "accuracy": a["sft"],
                                      "p_vs_full": ps["p_value"] if ps else None, "selected": None,
                                      "pseudo_label_accuracy_selected": None}]
            row = {"variant": var.row, "accuracy": a["semievol"], "p_vs_full": pv["p_value"] if pv else None,
                   "selected": st.get("selected"), "pseudo_label_accuracy_selected": st.get("accuracy_selected")}
            tables[var.table].append(row)
        elif var.table == "rounds":
            rows = [{"round": 0, "accuracy": a["sft"], "selected": None, "pseudo_label_accuracy_selected": None}]
            for r, acc in rep["accuracy_by_round"].items():
                st = rep["pseudo_labels"].get(f"round{r}") or {}
                rows.append({"round": int(r), "accuracy": acc, "selected": st.get("selected"),
                             "pseudo_label_accuracy_selected": st.get("accuracy_selected")})
            tables["rounds"] = rows
    return tables


# --- the sizes users bring ------------------------------------------------------------------------

SIZES_SHAPE = dict(batch_size=4, seq_len=128, answer_len=4)  # bench train's shape: short answers, as SFT has


def size_row(model_path: Path, data: Path, cfg: RunConfig, tcfg: TrainConfig, ecfg: EngineConfig,
             steps: int = 6) -> dict:
    """One model's row of the sizes table, measured in this process (run it in a fresh one: peaks are absolute):
    the prompt rates `--weights auto` measured for the file and its float32 copy and its choice; training
    tokens/s and the honest roofline fraction (`train.bench_train`, the run's LoRA depth, SIZES_SHAPE) with
    its peak RSS; and the estimate `semievol run --plan` prints for `data` (time and peak)."""
    from ..core import gguf_file
    from ..core.runfolder import PeakMemory
    from ..engines import unload
    from ..engines.weights import plan_weights
    from ..method.estimate import clock
    from . import train

    w = plan_weights(model_path, ecfg)  # measured here the first time, then cached
    rates = dict(w.rates)
    with PeakMemory() as peak:
        t = train.bench_train(model_path, steps, num_layers=tcfg.num_layers, **SIZES_SHAPE)
    train_peak = peak.peak_mb
    plan = estimate.plan(model_path, data, cfg, tcfg, ecfg)
    rows = plan.at()
    run_s = plan.seconds()
    unload()
    n_params = sum(int(x.n_elements) for x in gguf_file.read(Path(model_path)).tensors)
    return {"model": Path(model_path).name, "weights_b": round(n_params / 1e9, 3),
            "file_mb": round(Path(model_path).stat().st_size / 1e6),
            "train_tokens_per_s": round(t["tokens_per_s"]), "train_fraction": round(t["roofline_fraction"], 3),
            "train_peak_mb": round(train_peak),
            "prompt_file": round(rates["file"]) if rates.get("file") else None,
            "prompt_f32": round(rates["f32"]) if rates.get("f32") else None,
            "auto": w.kind, "run_peak_mb": round(max((r.peak_mb for r in rows if r.peak_mb), default=0)) or None,
            "plan_time": clock(run_s) if run_s is not None else None}


def sizes(model_paths: list[Path], data: Path, cfg: RunConfig, tcfg: TrainConfig, ecfg: EngineConfig,
          command: str = "", on_model=lambda path: None) -> dict:
    """`size_row` for every model, each in a fresh process (one model's memory is not the next one's)."""
    import multiprocessing

    refuse_force(cfg)
    if ecfg.server:
        raise UserError("bench sizes measures llama.cpp in this process; leave out --server")
    load_task(Path(data))  # a bad task folder fails before any model is measured
    rows = []
    for path in model_paths:
        on_model(path)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            rows.append(pool.apply(size_row, (path, data, cfg, tcfg, ecfg)))
    return {"benchmark": "sizes", "machine": machine(), "command": command, "task": str(data),
            "model": ", ".join(Path(p).name for p in model_paths), "train": dataclasses.asdict(tcfg),
            "train_shape": SIZES_SHAPE, "tables": {"sizes": rows}}


# --- training speed against the peer --------------------------------------------------------------

def train_vs_peft(model_path: Path, peft_python: str, *, steps: int, batch_size: int, seq_len: int,
                  num_layers: int = -1, answer_len: int | None = None, threads: int | None = None) -> dict:
    """`train.bench_train`, then PyTorch + PEFT on the same shape (`peft.py`, run by `peft_python`:
    a separate environment with torch, transformers and peft), back to back: MLX's tokens/s over the peer's."""
    import shutil

    from . import peft, train

    exe = shutil.which(peft_python) or (peft_python if Path(peft_python).is_file() else None)
    if exe is None:
        raise UserError(f"--peft-python {peft_python}: no such Python interpreter; give the python of an "
                        "environment with torch, transformers and peft (python3 -m venv ENV && ENV/bin/pip install "
                        "torch transformers peft)")
    probe = subprocess.run([exe, "-c", "import torch, transformers, peft"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["it did not start"])[-1]
        raise UserError(f"--peft-python {peft_python}: cannot import torch, transformers and peft ({last}); "
                        f"install them there: {exe} -m pip install torch transformers peft")
    from ..method.models import inspect

    arch = inspect(Path(model_path)).architecture
    if arch != "llama":
        raise UserError(f"{model_path}: the PyTorch + PEFT benchmark builds a Llama model; this one is {arch} "
                        "(leave out --peft-python, or give a llama GGUF)")
    ours = train.bench_train(model_path, steps, batch_size=batch_size, seq_len=seq_len, num_layers=num_layers,
                                  answer_len=answer_len)
    spec = {"model": ours["shape"], "batch_size": batch_size, "seq_len": seq_len, "answer_len": ours["answer_len"],
            "steps": steps, "skip_steps": 2, "rank": ours["rank"], "scale": ours["scale"], "keys": ours["keys"],
            "num_layers": num_layers, "threads": threads or max(1, (os.cpu_count() or 2)), "seed": 0}
    done = subprocess.run([exe, peft.__file__, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"--peft-python {peft_python}: the PyTorch + PEFT benchmark failed: {last}")
    peer = json.loads(done.stdout.strip().splitlines()[-1])
    return {**{k: v for k, v in ours.items() if k != "shape"},
            "peft_tokens_per_s": peer["tokens_per_s"], "peft_trainable_params": peer["trainable_params"],
            "peft_versions": f"torch {peer['torch']}, transformers {peer['transformers']}, peft {peer['peft']}",
            "peft_threads": peer["threads"],
            "vs_peft": ours["tokens_per_s"] / peer["tokens_per_s"],
            "vs_peft_with_trunk": ours["tokens_per_s_with_trunk"] / peer["tokens_per_s"]}


# --- pseudo-labeling speed --------------------------------------------------------------------------

def refuse_force(cfg: RunConfig) -> None:
    """`--force` goes past the collapse check of a run; the benchmarks that run no pipeline have none."""
    if cfg.force:
        raise UserError("--force: this benchmark runs no collapse check to go past; leave it out")


def score_mode_questions(data: Path, n_items: int, adapter: Path | None, why: str) -> tuple[list, list]:
    """The labeled items and the first `n_items` unlabeled ones of a task that score mode can ask (options on
    every row), for the benchmarks that time pseudo-labeling on them; `adapter`, if given, must exist."""
    if n_items < 1:
        raise UserError(f"--n-items {n_items}: give at least 1")
    task = load_task(data)
    labeled, unlabeled = task["labeled"].items, task["unlabeled"].items[:n_items]
    if not all(it.closed for it in labeled + unlabeled):
        raise UserError(f"{data}: score mode needs options on every row; {why}")
    if adapter is not None and not Path(adapter).is_file():
        raise UserError(f"--adapter {adapter}: no such file; give a warm-up adapter.gguf or leave it out to train one")
    return labeled, unlabeled


def pseudo_label(model_path: Path, data: Path, n_items: int, out: Path, cfg: RunConfig, tcfg: TrainConfig,
                 ecfg: EngineConfig, reporter=None, adapter: Path | None = None, sample_tokens: int = 1024,
                 command: str = "") -> dict:
    """The paper's recipe (n samples at temperature 1, self-justification, mean NLL) vs score mode, on the
    same N unlabeled questions, demonstrations, learners and warm adapter."""
    refuse_force(cfg)
    reporter = reporter or pipeline.Quiet()
    labeled, unlabeled = score_mode_questions(data, n_items, adapter, "this benchmark compares it with sampling")
    held = load_heldout(find_split_file(Path(data), "unlabeled"))  # reporting only
    # room for the learners' long responses and a justification prompt that lists them all
    need = (cfg.learners + 1) * sample_tokens + 1024
    engine = load(model_path, dataclasses.replace(ecfg, n_ctx=max(ecfg.n_ctx, need)))
    run = RunFolder(out)
    if adapter is None:
        warm_path = pipeline.stage_train(run, "warmup", engine, labeled, tcfg, reporter).path("adapter.gguf")
    else:
        warm_path = Path(adapter)
    ret = pipeline.stage_retrieval(run, "retrieval", engine, labeled, unlabeled, cfg, reporter)
    neighbours = np.load(ret.path("neighbours.npy"))
    learners = collaboration.learner_configs(cfg)
    result = {"benchmark": "pseudo-label", "machine": machine(), "command": command, "model": str(model_path),
              "task": str(data), "n_items": len(unlabeled), "learners": [ln.label() for ln in learners],
              "adapter": str(warm_path), "sample_max_tokens": sample_tokens, "temperature": cfg.temperature}
    mcfg = dataclasses.replace(cfg, max_tokens=sample_tokens)
    for mode in ("score", "sample"):
        recs = []
        t0 = time.perf_counter()
        with reporter.progress(len(unlabeled), f"{mode} mode", "questions") as advance:
            for pos, item in enumerate(unlabeled):
                demos = [labeled[i] for i in neighbours[pos]]
                recs.append(collaboration.collaborate_one(engine, item, demos, learners, mode, mcfg, warm_path))
                advance()
        seconds = time.perf_counter() - t0
        ok = [answers_match(r["pseudo_label"], held[r["index"]].answer, closed=True) for r in recs]
        figures = {"questions_per_s": len(recs) / seconds, "seconds": seconds, "accuracy": float(np.mean(ok)),
                   "consistency_rate": float(np.mean([r["consistent"] for r in recs])),
                   "justified_rate": float(np.mean([r["justified"] for r in recs]))}
        if mode == "sample":
            toks = [a["n_tokens"] for r in recs for a in r["learners"]]
            figures["mean_response_tokens"] = float(np.mean(toks))
            figures["no_answer_rate"] = float(np.mean([r["pseudo_label"] is None for r in recs]))
        result[mode] = figures
        atomic_write_text(Path(out) / f"{mode}.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    result["ratio"] = result["score"]["questions_per_s"] / result["sample"]["questions_per_s"]
    result["goal"] = {"ratio_at_least_10": result["ratio"] >= 10,
                      "score_accuracy_at_least_sample": result["score"]["accuracy"] >= result["sample"]["accuracy"]}
    return result

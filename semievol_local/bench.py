"""Benchmarks that print figures: the paper's tables at laptop scale, and pseudo-labeling speed.

`quality` runs the pipeline once per variant (main table per task; ablations, sensitivity and rounds on
the first task). Variants of one task are sibling run folders that share every stage whose inputs are
identical, so an ablation re-runs only what its flag changes. `pseudo_label` times the paper's generative
recipe against score mode on the same questions, demonstrations, learners and warm adapter. Both read
the unlabeled split's held-back answers, for reporting pseudo-label accuracy only. `markdown` renders
measured results for the README and docs/performance.md; nothing there is typed in by hand.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from . import pipeline
from .config import EngineConfig, RunConfig, TrainConfig
from .data import find_split_file, load_heldout, load_task
from .errors import UserError
from .files import atomic_write_text
from .llama_engine import load
from .prompts import answers_match
from .report import build_report, error_reduction, paired, stage_label, stage_seconds
from .runfolder import RunFolder

SUITES = ("main", "ablation", "sensitivity", "rounds", "baselines")
ABLATIONS = [("full", {}), ("w/o IWP", {"iwp": False}), ("w/o ICP", {"icp": False}),
             ("w/o CL", {"cl": False}), ("w/o AS", {"adaptive_selection": False})]
# What a reviewer would compare SemiEvol with, each one flag away from it (and a row of its own).
BASELINES = [("SemiEvol", {}),
             ("self-consistency (LMSI-style vote)", {"labeler": "self-consistency", "selection": "vote"}),
             ("fixed entropy threshold", {"selection": "fixed"}),
             ("labeled + all pseudo-labels", {"adaptive_selection": False})]
LEARNERS = (1, 2, 4)  # paper Fig. 3
THETAS = (30.0, 50.0, 80.0, 100.0)
ROUNDS = 2  # paper Fig. 7: rounds 0 (SFT) to 2


# --- where and what ---------------------------------------------------------------------------------

def machine() -> dict:
    """The facts a reader needs to compare figures: date, cores, CPU, OS, versions, commit."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("semievol-local", "llama_cpp_python", "mlx", "mlx-lm"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "cpu": cpu,
            "os": platform.platform(terse=True), "python": platform.python_version(), "versions": versions,
            "commit": _commit()}


def _commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+changes" if dirty else "")) if sha else None


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
    if "rounds" in suites:
        plan += [v("rounds", "rounds", first, rounds=max(ROUNDS, cfg.rounds))]
    return plan


def quality(model_path: Path, datas: list[Path], out: Path, suites: list[str], cfg: RunConfig, tcfg: TrainConfig,
            ecfg: EngineConfig, reporter=None, share_extra: tuple[Path, ...] = (), on_run=lambda folder: None,
            command: str = "") -> dict:
    """Run every variant of the plan (shared stages reused) and gather the paper-style tables."""
    plan = quality_plan([Path(d) for d in datas], suites, cfg)
    for d in datas:  # every task is checked before hours go into the first one
        load_task(Path(d))
    runs: dict[tuple[Path, str], tuple[Path, dict]] = {}  # (task, variant folder name) -> (folder, report)
    for var in plan:
        key = (var.data, var.folder)
        if key in runs:
            continue
        task_dir = Path(out) / var.data.name
        folder = task_dir / var.folder
        siblings = tuple(p for p in task_dir.glob("*") if p.is_dir() and p != folder) if task_dir.exists() else ()
        siblings += tuple(Path(p) for p in share_extra)
        on_run(folder)
        pipeline.run_semievol(model_path, var.data, folder, dataclasses.replace(cfg, **dict(var.overrides)), tcfg,
                              ecfg, reporter, share=siblings)
        runs[key] = folder, build_report(folder)
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
            st = _last_pseudo(rep)  # against the held-back answers: reporting only
            tables.setdefault("pseudo_labels", []).append(
                {"task": var.row, "questions": st.get("n"), "consistency_rate": st.get("consistency_rate"),
                 **{f"accuracy_{k}": st.get(f"accuracy_{k}") for k in ("all", "consistent", "justified", "selected")},
                 "selected": st.get("selected")})
        elif var.table in ("ablation", "sensitivity", "baselines"):
            st = _last_pseudo(rep)
            full = Path(out) / var.data.name / "full"
            has_full = (full / "run.json").exists()
            pv = paired(_last_eval(folder), _last_eval(full)) if folder != full and has_full else None
            if var.table not in tables:  # the reference: M_warm alone (no pseudo-labels) on the same test questions
                ps = paired(json.loads((folder / "eval" / "sft" / "eval.json").read_text()), _last_eval(full)) \
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
    # the whole run is the full method's (the first task's), whichever suites were asked for
    first = next((var for var in plan if var.data == plan[0].data and not var.overrides), plan[0])
    whole = runs[(first.data, first.folder)][1]["stages"]
    tables["whole_run"] = [{"stage": stage_label(n, s), "seconds": stage_seconds(s), "peak_rss_mb": round(s["peak_rss_mb"])}
                           for n, s in whole.items()]
    return {"benchmark": "quality", "machine": machine(), "command": command, "model": str(model_path),
            "tasks": [str(d) for d in datas], "suites": list(suites),
            "run": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
            "whole_run": {"task": first.data.name, "seconds": round(sum(s["seconds"] for s in whole.values()), 1),
                          "peak_rss_mb": max((s["peak_rss_mb"] for s in whole.values()), default=None),
                          "untimed_attempts": any(s.get("untimed_attempts") for s in whole.values())},
            "tables": tables}


REFERENCE_DECODE = 128  # tokens: llama.cpp's raw prompt rate (no adapter), measured once after `bench run`'s run
# why a stage's fraction of float32 GEMM passed 1 (a table cell: short)
ABOVE_1 = "above 1: quantized kernels do less float32 work than the count"
ABOVE_1_FLOAT = "above 1: the machine ran faster within the stage than at its two ends"


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What a forward pass's FLOPs depend on (read from a GGUF by `model_shape`)."""

    n_layer: int
    block_weights: int  # elements of every blk.* weight matrix, all blocks
    n_head: float  # query heads per block (the mean where a file gives one count per block)
    key_length: int  # per head
    value_length: int
    n_vocab: int
    n_embd: int


def model_shape(path: Path) -> ModelShape:
    """A GGUF's `ModelShape`, from its header and tensor table (the data is not read)."""
    from .models import read_gguf

    reader = read_gguf(Path(path))
    f = reader.fields
    arch = f.get("general.architecture")
    n_layer, n_embd, heads = (f.get(f"{arch}.{k}") for k in ("block_count", "embedding_length",
                                                             "attention.head_count"))
    if not (n_layer and n_embd and heads):
        raise UserError(f"{path}: no block count, embedding length or head count for architecture {arch!r}; "
                        "the FLOPs of its forward pass cannot be counted")
    heads = float(np.mean(heads)) if isinstance(heads, list) else float(heads)
    key = int(f.get(f"{arch}.attention.key_length") or n_embd // heads)
    tensors = {t.name: t for t in reader.tensors}
    head = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if head is None:
        raise UserError(f"{path}: no output or token_embd tensor; the vocabulary projection cannot be counted")
    # matrices only: a norm or bias multiplies or adds once per element, no matmul
    blocks = sum(t.n_elements for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) >= 2)
    return ModelShape(int(n_layer), int(blocks), heads, key, int(f.get(f"{arch}.attention.value_length") or key),
                      int(head.shape[0]), int(n_embd))


def llama_flops(m: ModelShape, decode_shapes: dict[str, dict[str, int]], logits_rows: int) -> float:
    """The FLOPs of llama.cpp's forward passes (no I/O): for every evaluated token, 2 x the block weights and,
    in each layer, attention over the positions it sees (QK^T and AV: 2 x n_head x (key + value length) per
    position); and 2 x n_vocab x n_embd for each row of logits read (one per decode; embeddings read none).

    `decode_shapes`: {adapter: {"cached:size": tokens}}, a stage's figures: a decode of `size` tokens after
    `cached` ones attends to cached+1 ... cached+size positions, cached + (size+1)/2 per token on average.
    The figures' shapes are binned (`llama_engine.decode_shape`: cached to 128, size to 8 or 32), so the
    attention term is an estimate; the weights terms are exact. Not counted: LoRA adapters (rank 8, a few
    per mille of a block's weights), norms, activations, softmax; sliding-window layers (gemma3) are counted
    as attending to the whole cache, an overcount past the window. On quantized weights the count is the
    same: it is the work a float32 forward pass needs, which quantized kernels do partly in integers."""
    per_position = 2 * m.n_layer * m.n_head * (m.key_length + m.value_length)
    total = 0.0
    for shapes in decode_shapes.values():  # every adapter's tokens: the base weights' work
        for key, tokens in shapes.items():
            cached, size = (int(v) for v in key.split(":"))
            total += tokens * (2 * m.block_weights + per_position * (cached + (size + 1) / 2))
    return total + 2 * m.n_vocab * m.n_embd * logits_rows


def gemm_fractions(seconds: dict[str, float], flops: dict[str, float], gflops: dict[str, float]
                   ) -> tuple[dict[str, float | None], float | None]:
    """Each stage's fraction of float32 GEMM, FLOPs / (seconds x its GFLOPS x 1e9) (None for a stage with no
    FLOPs counted), and the whole run's: every stage's FLOPs over the sum of every stage's seconds x its
    GFLOPS. Stages without FLOPs (retrieval by TF-IDF, selection) are in that sum: the run spent their
    time too, and a faster pipeline would spend less. No I/O."""
    each = {n: flops[n] / (s * gflops[n] * 1e9) if flops.get(n) and s > 0 else None for n, s in seconds.items()}
    budget = sum(s * gflops[n] * 1e9 for n, s in seconds.items())
    return each, (sum(flops.get(n, 0.0) for n in seconds) / budget if budget > 0 else None)


def above_1(fractions: dict[str, float | None], llama_stages: set[str], quantized: bool) -> dict[str, str]:
    """The note for each stage whose fraction of float32 GEMM passed 1: llama.cpp on quantized weights does
    part of the counted work in integers; anywhere else the machine ran faster within the stage than at its
    two ends. No I/O."""
    return {n: ABOVE_1 if quantized and n in llama_stages else ABOVE_1_FLOAT
            for n, x in fractions.items() if x is not None and x > 1}


def _gemm() -> float:
    """float32 GEMM GFLOPS now (MLX), its buffers handed back: the next stage's peak memory is its own."""
    from .blas import gemm_gflops

    g = gemm_gflops()
    import mlx.core as mx

    mx.clear_cache()
    return g


class _Yardstick:
    """A reporter that measures float32 GEMM just before each stage that runs (the stage hook is called
    before the stage's clock starts: `RunFolder.stage`), and passes everything on to the reporter it wraps."""

    def __init__(self, reporter, measure=_gemm):
        self.reporter, self.measure, self.before = reporter, measure, {}

    def stage(self, name: str, reused: bool) -> None:
        if not reused:
            self.before[name] = self.measure()
        self.reporter.stage(name, reused)

    def __getattr__(self, attr):
        return getattr(self.reporter, attr)


def _sig(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def whole_run(model_path: Path, data: Path, out: Path, cfg: RunConfig, tcfg: TrainConfig, ecfg: EngineConfig,
              reporter=None, command: str = "") -> dict:
    """One `semievol run`, then each stage beside one yardstick: this machine's float32 GEMM (MLX), measured
    in the same process just before every stage (outside its clock) and once after the run; each stage is
    rated at the mean of its own two ends (the cores drift, by a third within an hour on a shared machine).

    A stage's FLOPs are counted from the work it did: llama.cpp stages by `llama_flops` on the tokens,
    decode shapes and decodes it recorded; fine-tunes by `mlx_engine.train_flops` (recorded as `flops`).
    Its fraction = FLOPs / (seconds x GFLOPS x 1e9); the whole run's = all FLOPs / the sum of every stage's
    seconds x its GFLOPS, stages without FLOPs (retrieval by TF-IDF, selection) included (`gemm_fractions`).
    A fraction above 1 gets a note saying why (`above_1`): llama.cpp on a quantized file can pass 1.
    Informative, not a yardstick: llama.cpp's raw prompt rate (REFERENCE_DECODE random tokens, no adapter)
    after the run, as tokens/s and as a fraction of GEMM by the same count: the best llama.cpp's kernels do."""
    if ecfg.server:
        raise UserError("bench run measures llama.cpp in this process; leave out --server")
    if (Path(out) / "run.json").exists():
        raise UserError(f"--out {out}: already holds a run, whose finished stages would be reused and not timed; "
                        "give a new folder")
    where = machine()  # the commit that runs, not the one checked out when it ends
    engine = load(model_path, ecfg)  # the run's own engine (one per process): the float32 copy is made here
    shape = model_shape(model_path)
    planned = {r.stage: r.seconds for r in pipeline.plan(model_path, data, cfg, tcfg, ecfg).at()}  # `run --plan`'s
    stick = _Yardstick(reporter or pipeline.Quiet())
    pipeline.run_semievol(model_path, data, out, cfg, tcfg, ecfg, stick)
    after = _gemm()
    engine.set_adapter(None)
    ref_rate = engine.prefill_rate(REFERENCE_DECODE, repeats=3)
    names = list(stick.before)  # in the order they ran; each stage's GFLOPS: the mean of its two ends
    around = {n: (stick.before[n] + (stick.before[names[i + 1]] if i + 1 < len(names) else after)) / 2
              for i, n in enumerate(names)}
    rep = build_report(out)
    gflops = {n: around.get(n, after) for n in rep["stages"]}
    seconds = {n: st["seconds"] for n, st in rep["stages"].items()}
    flops, tokens = {}, {}
    for name, st in rep["stages"].items():
        f = st["figures"]
        if f.get("decode_shapes"):
            # embeddings (model retrieval) read hidden states, no logits; every other decode reads one row
            read = 0 if name.split("/")[-1] == "retrieval" else f.get("decodes", 0)
            flops[name], tokens[name] = llama_flops(shape, f["decode_shapes"], read), f["tokens_computed"]
        elif f.get("flops"):
            flops[name] = float(f["flops"])
            tokens[name] = sum(r.get("tokens", 0) for r in _train_log(Path(out) / name)) or None
    fraction, whole = gemm_fractions(seconds, flops, gflops)
    quantized = engine.weights.kind != "f32" and not _float_file(model_path)
    rows = []
    for name, st in rep["stages"].items():
        sec, n = st["seconds"], tokens.get(name)
        rows.append({"stage": stage_label(name, st), "seconds": round(sec, 1), "tokens": n,
                     "tokens_per_s": round(n / sec, 1) if n and sec else None,
                     "tflop": _sig(flops[name] / 1e12) if name in flops else None,
                     "limit": f"GEMM {gflops[name]:.0f} GFLOPS", "fraction": _sig(fraction[name]),
                     "peak_rss_mb": round(st["peak_rss_mb"]),
                     "predicted_s": round(planned[name], 1) if planned.get(name) is not None else None})
    notes = above_1(fraction, {n for n, st in rep["stages"].items() if "decode_shapes" in st["figures"]}, quantized)
    if notes:  # a column of its own only where some fraction needs one
        for r, name in zip(rows, rep["stages"]):
            r["note"] = notes.get(name)
    total = sum(seconds.values())
    peak = max((st["peak_rss_mb"] for st in rep["stages"].values()), default=None)
    st = _last_pseudo(rep)
    ref_flops = llama_flops(shape, {"": {f"0:{REFERENCE_DECODE}": REFERENCE_DECODE}}, 1) / REFERENCE_DECODE
    every = [*stick.before.values(), after]
    return {"benchmark": "run", "machine": where, "command": command, "model": str(model_path), "task": str(data),
            "weights": engine.weights.kind, "run": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
            "gemm_gflops": sum(every) / len(every),  # the run's mean, for a reader; no stage is rated at it
            "yardstick": {"what": "float32 GEMM GFLOPS (MLX, (512 x 2048) @ (2048 x 2048), best of 5)",
                          "before_stage": stick.before, "after": after},
            "llama_reference": {"tokens": REFERENCE_DECODE, "tokens_per_s": ref_rate,
                                "fraction": ref_rate * ref_flops / (after * 1e9)},
            "tables": {"main": [{"task": Path(data).name, **rep["accuracy"],
                                 "p_vs_sft": (rep.get("semievol_vs_sft_paired") or {}).get("p_value"),
                                 "pseudo_label_accuracy_selected": st.get("accuracy_selected"),
                                 "selected": st.get("selected")}],
                       "stages": rows},
            "whole_run": {"task": Path(data).name, "seconds": round(total, 1), "peak_rss_mb": peak,
                          "untimed_attempts": any(s.get("untimed_attempts") for s in rep["stages"].values()),
                          "tflop": _sig(sum(flops.values()) / 1e12), "fraction": _sig(whole),
                          "predicted_seconds": (round(sum(planned.values()), 1)
                                                if all(v is not None for v in planned.values()) else None),
                          "goal": {"minutes_at_most_30": total <= 1800, "peak_at_most_3_gb": bool(peak and peak <= 3000)}}}


def _float_file(path: Path) -> bool:
    """Whether a GGUF's block weights are all float (F32, F16, BF16): llama.cpp then computes in float."""
    from .models import read_gguf

    kinds = {t.tensor_type.name for t in read_gguf(Path(path)).tensors if t.name.startswith("blk.")}
    return kinds <= {"F32", "F16", "BF16"}


def _train_log(stage: Path) -> list[dict]:
    path = stage / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _last_pseudo(rep: dict) -> dict:
    stats = rep.get("pseudo_labels") or {}
    return stats[max(stats, key=lambda name: int(name[5:]))] if stats else {}


def _last_eval(run: Path) -> dict:
    """The test evaluation of a run's last round (every prediction, for a question-by-question comparison)."""
    last = max(int(p.parent.parent.name[5:]) for p in Path(run).glob("round*/eval/eval.json"))
    return json.loads((Path(run) / f"round{last}" / "eval" / "eval.json").read_text())


# --- the sizes users bring ------------------------------------------------------------------------

SIZES_SHAPE = dict(batch_size=4, seq_len=128, answer_len=4)  # bench train's shape: short answers, as SFT has


def size_row(model_path: Path, data: Path, cfg: RunConfig, tcfg: TrainConfig, ecfg: EngineConfig,
             steps: int = 6) -> dict:
    """One model's row of the sizes table, measured in this process (run it in a fresh one: peaks are absolute):
    the prompt rates `--weights auto` measured for the file and its float32 copy and its choice; training
    tokens/s and the honest roofline fraction (`mlx_engine.bench_train`, the run's LoRA depth, SIZES_SHAPE) with
    its peak RSS; and the estimate `semievol run --plan` prints for `data` (time and peak)."""
    from . import mlx_engine
    from .estimate import clock
    from .llama_engine import plan_weights, unload
    from .models import read_gguf
    from .runfolder import PeakMemory

    w = plan_weights(model_path, ecfg)  # measured here the first time, then cached
    rates = dict(w.rates)
    with PeakMemory() as peak:
        t = mlx_engine.bench_train(model_path, steps, num_layers=tcfg.num_layers, **SIZES_SHAPE)
    train_peak = peak.peak_mb
    plan = pipeline.plan(model_path, data, cfg, tcfg, ecfg)
    rows = plan.at()
    run_s = plan.seconds()
    unload()
    n_params = sum(int(x.n_elements) for x in read_gguf(Path(model_path)).tensors)
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
    """`mlx_engine.bench_train`, then PyTorch + PEFT on the same shape (`peft_bench.py`, run by `peft_python`:
    a separate environment with torch, transformers and peft), back to back: MLX's tokens/s over the peer's."""
    import shutil

    from . import mlx_engine, peft_bench

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
    from .models import inspect

    arch = inspect(Path(model_path)).architecture
    if arch != "llama":
        raise UserError(f"{model_path}: the PyTorch + PEFT benchmark builds a Llama model; this one is {arch} "
                        "(leave out --peft-python, or give a llama GGUF)")
    ours = mlx_engine.bench_train(model_path, steps, batch_size=batch_size, seq_len=seq_len, num_layers=num_layers,
                                  answer_len=answer_len)
    spec = {"model": ours["shape"], "batch_size": batch_size, "seq_len": seq_len, "answer_len": ours["answer_len"],
            "steps": steps, "skip_steps": 2, "rank": ours["rank"], "scale": ours["scale"], "keys": ours["keys"],
            "num_layers": num_layers, "threads": threads or max(1, (os.cpu_count() or 2)), "seed": 0}
    done = subprocess.run([exe, peft_bench.__file__, json.dumps(spec)], capture_output=True, text=True)
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

def pseudo_label(model_path: Path, data: Path, n_items: int, out: Path, cfg: RunConfig, tcfg: TrainConfig,
                 ecfg: EngineConfig, reporter=None, adapter: Path | None = None, sample_tokens: int = 1024,
                 command: str = "") -> dict:
    """The paper's recipe (n samples at temperature 1, self-justification, mean NLL) vs score mode, on the
    same N unlabeled questions, demonstrations, learners and warm adapter."""
    reporter = reporter or pipeline.Quiet()
    if n_items < 1:
        raise UserError(f"--n-items {n_items}: give at least 1")
    task = load_task(data)
    labeled, unlabeled = task["labeled"].items, task["unlabeled"].items[:n_items]
    if not all(it.closed for it in labeled + unlabeled):
        raise UserError(f"{data}: score mode needs options on every row; this benchmark compares it with sampling")
    held = load_heldout(find_split_file(Path(data), "unlabeled"))  # reporting only
    if adapter is not None and not Path(adapter).is_file():
        raise UserError(f"--adapter {adapter}: no such file; give a warm-up adapter.gguf or leave it out to train one")
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
    learners = pipeline.learner_configs(cfg)
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
                recs.append(pipeline.collaborate_one(engine, item, demos, learners, mode, mcfg, warm_path))
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


def servers(model_path: Path, data: Path, n_items: int, out: Path, cfg: RunConfig, tcfg: TrainConfig,
            ecfg: EngineConfig, reporter=None, adapter: Path | None = None, n_servers: int = 2,
            command: str = "") -> dict:
    """Collaboration (score mode) on the same N unlabeled questions, demonstrations and warm adapter: in this
    process with every core, through 1 llama-server and through `n_servers` (1 thread each), then again
    through them with one server killed a third of the way. Questions/s of each, and whether the
    pseudo-labels, entropies and selections are the in-process ones."""
    import tempfile

    from . import apikey, engines, llama_server
    from . import llama_engine
    from .llama_engine import default_threads

    reporter = reporter or pipeline.Quiet()
    if n_items < 1:
        raise UserError(f"--n-items {n_items}: give at least 1")
    task = load_task(data)
    labeled, unlabeled = task["labeled"].items, task["unlabeled"].items[:n_items]
    if not all(it.closed for it in labeled + unlabeled):
        raise UserError(f"{data}: this benchmark runs score mode, which needs options on every row")
    if adapter is not None and not Path(adapter).is_file():
        raise UserError(f"--adapter {adapter}: no such file; give a warm-up adapter.gguf or leave it out to train one")
    exe = llama_server.binary(say=lambda msg: reporter.stage(msg, False))
    engine = load(model_path, ecfg)
    run = RunFolder(out)
    warm_path = Path(adapter) if adapter else \
        pipeline.stage_train(run, "warmup", engine, labeled, tcfg, reporter).path("adapter.gguf")
    ret = pipeline.stage_retrieval(run, "retrieval", engine, labeled, unlabeled, cfg, reporter)
    neighbours = np.load(ret.path("neighbours.npy"))
    learners = pipeline.learner_configs(cfg)

    def one(eng, pos):
        return pipeline.collaborate_one(eng, unlabeled[pos], [labeled[i] for i in neighbours[pos]], learners,
                                        "score", cfg, warm_path)

    def collaborate(eng, label: str, kill=None) -> tuple[dict, float]:
        recs, t0 = {}, time.perf_counter()
        with reporter.progress(len(unlabeled), label, "questions") as advance:
            for pos, rec in engines.each(eng, range(len(unlabeled)), one):
                recs[pos] = rec
                advance()
                if kill is not None and len(recs) == len(unlabeled) // 3:
                    kill()
        return recs, time.perf_counter() - t0

    def selected(recs: dict) -> set:  # the pipeline's own selection rule
        return set(np.flatnonzero(pipeline.select_records([recs[p] for p in range(len(unlabeled))], cfg)[0]).tolist())

    result = {"benchmark": "servers", "machine": machine(), "command": command, "model": str(model_path),
              "task": str(data), "n_items": len(unlabeled), "learners": [ln.label() for ln in learners],
              "adapter": str(warm_path), "llama_server": str(exe), "rows": []}
    threads = ecfg.n_threads or default_threads()
    base, secs = collaborate(engine, f"in process ({threads} threads)")
    llama_engine.unload()  # its threads and memory must not compete with the servers'
    want = selected(base)
    result["rows"].append({"engine": f"in process, {threads} threads", "seconds": secs,
                           "questions_per_s": len(base) / secs, "speedup": 1.0, "labels_equal": len(base),
                           "max_entropy_diff": 0.0, "selection_equal": True, "questions_lost": 0})
    logs = Path(out) / "servers"
    logs.mkdir(parents=True, exist_ok=True)
    private = tempfile.TemporaryDirectory(prefix="semievol-bench-")  # the servers' API key, as `serve` keeps one
    key_file = apikey.generate(Path(private.name) / "api-key").source
    for n, kill in ((1, False), (n_servers, False), (n_servers, True)):
        procs, urls = [], []
        try:
            for i in range(n):
                proc, url = llama_server.start(engine.weights.path, adapters=[warm_path], n_ctx=ecfg.n_ctx, threads=1,
                                               log_path=logs / f"server-{n}-{i}.log", key_file=Path(key_file))
                procs.append(proc)
                urls.append(url)
            fleet = engines.load(model_path, dataclasses.replace(ecfg, server=",".join(urls), api_key_file=key_file))
            name = f"{n} server{'s' if n > 1 else ''} x 1 thread" + (", 1 killed at 1/3" if kill else "")
            recs, secs = collaborate(fleet, name, kill=(lambda: procs[0].kill()) if kill else None)
            fleet.close()
        finally:
            for proc in procs:
                llama_server.stop(proc)
        same = sum(recs[p]["pseudo_label"] == base[p]["pseudo_label"] for p in base if p in recs)
        result["rows"].append({
            "engine": name, "seconds": secs, "questions_per_s": len(recs) / secs,
            "speedup": (len(recs) / secs) / result["rows"][0]["questions_per_s"], "labels_equal": same,
            "max_entropy_diff": max(abs(recs[p]["entropy"] - base[p]["entropy"]) for p in recs),
            "selection_equal": selected(recs) == want if len(recs) == len(base) else False,
            "questions_lost": len(base) - len(recs)})
    private.cleanup()
    result["goal"] = {"labels_identical": all(r["labels_equal"] == len(base) for r in result["rows"]),
                      "selection_identical": all(r["selection_equal"] for r in result["rows"]),
                      "no_question_lost": all(r["questions_lost"] == 0 for r in result["rows"])}
    return result


# --- publishing ---------------------------------------------------------------------------------------

def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1e}" if 0 < abs(v) < 5e-4 else f"{v:.3f}"  # a tiny p-value keeps its size, not 0.000
    return "-" if v is None else str(v)


def _md_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    return (["| " + " | ".join(heading(c) for c in cols) + " |", "|" + " --- |" * len(cols)]
            + ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows] + [""])


HEADINGS = {"majority": "majority", "vanilla": "vanilla", "sft": "SFT", "semievol": "SemiEvol",
            "err_red_vs_vanilla": "err. red. vs vanilla", "err_red_vs_sft": "err. red. vs SFT",
            "p_vs_sft": "p vs SFT (McNemar)", "p_vs_full": "p vs full (McNemar)",
            "consistency_rate": "consistency", "accuracy_all": "acc. all", "accuracy_consistent": "acc. consistent",
            "accuracy_justified": "acc. justified", "accuracy_selected": "acc. selected",
            "pseudo_label_accuracy_selected": "pseudo-label acc. (selected)", "peak_rss_mb": "peak RSS (MB)",
            "tflop": "TFLOP counted", "predicted_s": "predicted s (--plan)", "weights_b": "weights (B)",
            "file_mb": "file MB", "train_tokens_per_s": "train tok/s", "train_fraction": "train GEMM fraction",
            "train_peak_mb": "train peak MB", "prompt_file": "prompt tok/s, file", "prompt_f32": "prompt tok/s, f32 copy",
            "auto": "auto picks", "run_peak_mb": "run peak MB (plan)", "plan_time": "run time (plan)"}


def heading(key: str) -> str:
    return HEADINGS.get(key, key.replace("_", " "))


TITLES = {"main": "Main table (test accuracy; error reduction is relative)",
          "pseudo_labels": "Pseudo-labels of the main run (checked against the held-back answers, for reporting only)",
          "ablation": "Ablations (paper Table 2)", "sensitivity": "Sensitivity to n and theta (paper Fig. 3)",
          "rounds": "Rounds (paper Fig. 7; round 0 is SFT)",
          "baselines": "Baselines (p: exact McNemar against SemiEvol on the same test questions)",
          "whole_run": "Whole run, per stage",
          "servers": "Collaboration in process and through local llama-servers (`--server`): the same questions, "
                     "labels and selections",
          "sizes": "At the sizes users bring: training tokens/s and the fraction of float32 GEMM its FLOPs reach "
                   "(batch 4 x 128, loss on 4 answer tokens), prompt tokens/s with the file and with its float32 "
                   "copy, which one `--weights auto` picks, peak RSS, and the estimate `run --plan` prints",
          "stages": "Per stage: llama.cpp tokens evaluated (after prefix reuse) or trained, and the fraction of the "
                    "stage's own limit measured in the same run"}


def markdown(results: list[dict]) -> str:
    """Every table of the results (docs/performance.md's results section), each with its machine, commit and
    command."""
    lines = []
    for r in results:
        m = r.get("machine", {})
        suites = [x for x in r.get("suites", []) if x != "main"]
        limit = (r.get("run") or {}).get("limit_unlabeled")  # the unlabeled questions were cut to the first N
        lines += [f"### {r.get('benchmark', '?')}: {Path(r.get('task') or ', '.join(r.get('tasks', []))).name or '?'}"
                  + (f" ({', '.join(suites)})" if suites else ""), "",
                  f"Measured {m.get('date')} on {m.get('cores')} cores ({m.get('cpu')}), {m.get('os')}, "
                  f"commit `{m.get('commit')}`, model `{Path(r.get('model', '?')).name}`:", "",
                  "```", r.get("command", "?"), "```", ""]
        layers = (r.get("train") or {}).get("num_layers")
        if layers is not None:  # the fine-tunes' LoRA depth: it sets their speed, memory and accuracy
            lines += [f"LoRA on {'all' if layers == -1 else f'the last {layers}'} blocks"
                      + (f"; the first {limit} unlabeled questions." if limit else "."), ""]
        if r.get("benchmark") == "pseudo-label":
            rows = [{"recipe": mode, "questions/s": r[mode]["questions_per_s"], "accuracy": r[mode]["accuracy"],
                     "consistency": r[mode]["consistency_rate"], "justified": r[mode]["justified_rate"]}
                    for mode in ("sample", "score")]
            lines += _md_table(rows)
            lines += [f"{r['n_items']} questions; learners {', '.join(r['learners'])}; sample mode up to "
                      f"{r['sample_max_tokens']} new tokens (mean {r['sample'].get('mean_response_tokens', 0):.0f}). "
                      f"Speed ratio score/sample: **{r['ratio']:.1f}x** (goal 10x).", ""]
        elif r.get("benchmark") == "servers":
            rows = [{"engine": x["engine"], "seconds": round(x["seconds"]), "questions/s": x["questions_per_s"],
                     "speed-up": x["speedup"], "same labels": f"{x['labels_equal']} of {r['n_items']}",
                     "same selection": x["selection_equal"], "questions lost": x["questions_lost"]}
                    for x in r["rows"]]
            lines += [f"**{TITLES['servers']}**", ""] + _md_table(rows)
            lines += [f"{r['n_items']} questions; learners {', '.join(r['learners'])}.", ""]
        else:
            if r.get("benchmark") == "run" and "yardstick" in r:
                kind = "the float32 copy of the file" if r.get("weights") == "f32" else "the file as given"
                lines += [f"llama.cpp computed with {kind}; " + _gemm_sentence(r), ""]
            elif r.get("benchmark") == "run":  # results rated against llama.cpp's own prompt rate
                lines += [f"llama.cpp computed with {'the float32 copy of the file' if r.get('weights') == 'f32' else 'the file as given'}; "
                          f"measured in the same process: float32 GEMM {r['gemm_gflops']:.0f} GFLOPS (MLX), "
                          + _prefill_sentence(r), ""]
            for name, rows in r.get("tables", {}).items():
                lines += [f"**{TITLES.get(name, name)}**", ""] + _md_table(rows)
            w = r.get("whole_run")
            if w:
                lines += [f"Whole run on {w['task']} (sum of stage times): {'at least ' if w.get('untimed_attempts') else ''}"
                          f"{w['seconds'] / 60:.1f} min, "
                          f"peak {w['peak_rss_mb']:.0f} MB "
                          + (f"on the first {limit} unlabeled questions (the goal, 30 min and 3 GB, is for the whole split)."
                             if limit else "(goal: 30 min, 3 GB).")]
                if w.get("untimed_attempts"):
                    lines[-1] += (" Stages marked >= were resumed after an interruption, or timed by a version "
                                  "that did not count earlier attempts: their figure is a lower bound.")
                if w.get("fraction") is not None:
                    lines[-1] += (f" The work counted, {w['tflop']:.1f} TFLOP, is **{w['fraction']:.2f}** of what "
                                  "float32 GEMM would do in the whole run's time (each stage's time at its own "
                                  "GFLOPS; stages with no FLOPs counted, such as selection, count their time).")
                lines += [""]
    return "\n".join(lines).rstrip() + "\n"


START, END = "<!-- results:start -->", "<!-- results:end -->"


def _prefill_sentence(r: dict) -> str:
    """How `bench run` measured llama.cpp's raw prompt rates (a long list of shapes, summarized)."""
    rates = r.get("prefill_tokens_per_s", [])
    ref = r.get("prefill_reference")
    if not ref:  # results written before decode shapes were measured
        return "llama.cpp's raw prompt tokens/s: " + ", ".join(
            f"{x['adapter'] or 'no adapter'} {x['tokens_per_s']:.0f} ({x['tokens']} tokens)" for x in rates) + "."
    v = [x["tokens_per_s"] for x in rates]
    head = (f"llama.cpp's raw prompt rate for each of the {len(rates)} decode shapes (cached tokens, tokens, adapter) "
            f"the stages had: {min(v, default=0):.0f}-{max(v, default=0):.0f} tok/s after the run, scaled by the "
            f"reference ({ref['tokens']} tokens, no adapter) ")
    if "before_stage" not in ref:  # results written before the reference was taken stage by stage
        return head + f"{ref['before']:.0f} before and {ref['after']:.0f} after it."
    b = [*ref["before_stage"].values(), ref["after"]]
    return head + (f"taken before each stage and after the last: {min(b):.0f}-{max(b):.0f} tok/s, each stage rated "
                   "at the mean of its two ends.")


def _gemm_sentence(r: dict) -> str:
    """How `bench run` rated its stages: one float32 GEMM yardstick and FLOPs counted from the work."""
    y, ref = r["yardstick"], r.get("llama_reference")
    b = [*y["before_stage"].values(), y["after"]]
    text = (f"every stage rated against one yardstick, float32 GEMM (MLX), measured in the same process before "
            f"each stage and after the last: {min(b):.0f}-{max(b):.0f} GFLOPS, each stage at the mean of its two "
            "ends. FLOPs are counted from the work each stage did: llama.cpp, 2 x the block weights per token "
            "evaluated, attention over the cache, and the vocabulary projection per row of logits read; the "
            "fine-tunes, 2 x the frozen and 4 x the trained blocks' weights per token and the vocabulary "
            "projection at the answers.")
    if ref:
        text += (f" llama.cpp's raw prompt rate after the run ({ref['tokens']} random tokens, no adapter): "
                 f"{ref['tokens_per_s']:.0f} tok/s, {ref['fraction']:.2f} of GEMM by the same count.")
    return text


PUBLISHED = ("quality", "pseudo-label", "run", "sizes", "servers")  # the benchmarks `publish` renders
_ORDER = {"run": 0, "quality": 1, "pseudo-label": 2, "servers": 3, "sizes": 4}


def in_order(named: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Results in the order they are published, whatever order they were given in: the whole run first, then
    the quality tables (main before the other suites), then pseudo-labeling speed and the sizes table."""
    def key(item):
        name, r = item
        suites = r.get("suites") or []
        return (_ORDER.get(r.get("benchmark"), 9), "main" not in suites, r.get("task") or "", suites, name)
    return sorted(named, key=key)


def summary(named: list[tuple[str, dict]]) -> str:
    """The README's Results section: every main-table row of the results (test accuracy), each with the run's
    setting, date and the file it comes from, and the whole runs' time and memory."""
    rows, runs = [], []
    for name, r in in_order(named):
        layers = (r.get("train") or {}).get("num_layers")
        limit = (r.get("run") or {}).get("limit_unlabeled")
        setting = ("LoRA on all blocks" if layers == -1 else f"LoRA on {layers} blocks" if layers else "-") + (
            f", first {limit} unlabeled" if limit else ", all unlabeled")
        for row in (r.get("tables") or {}).get("main", []):
            rows.append({"task": row.get("task"), "model": Path(r.get("model", "?")).name,
                         **{k: row.get(k) for k in ("majority", "vanilla", "sft", "semievol", "p_vs_sft")},
                         "setting": setting, "measured": (r.get("machine") or {}).get("date"), "file": f"`{name}`"})
        w = r.get("whole_run")
        if r.get("benchmark") == "run" and w:
            runs.append(f"The whole `semievol run` on {w['task']} took {w['seconds'] / 60:.1f} min, peak "
                        f"{w['peak_rss_mb'] / 1000:.2f} GB, on {(r.get('machine') or {}).get('cores')} cores "
                        f"(`{name}`).")
    lines = ["Test accuracy (SemiEvol against the model as it is, the warm-up alone (SFT) and the majority class; "
             "p: exact McNemar test against SFT on the same questions):", ""] + _md_table(rows)
    return "\n".join(lines + runs).rstrip() + "\n"


def _between(path: Path, body: str) -> str:
    text = Path(path).read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise UserError(f"{path}: no '{START}' ... '{END}' markers; add them where the results should go")
    head, rest = text.split(START, 1)
    return head + START + "\n" + body + END + rest.split(END, 1)[1]


def publish(readme: Path, details: Path, named: list[tuple[str, dict]]) -> None:
    """Replace the results section of `readme` with `summary` and that of `details` with every table
    (`markdown`), both from the same (file name, result) pairs; neither file is written unless both can be."""
    named = in_order(named)
    texts = {Path(readme): _between(readme, summary(named)), Path(details): _between(details, markdown([r for _, r in named]))}
    for path, text in texts.items():
        atomic_write_text(path, text)

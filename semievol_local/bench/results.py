"""Measured results: where they were measured (`machine`: date, cores, CPU, OS, versions, commit), and as text: column headings and table titles (the terminal's tables use them too), the
markdown of every table with the machine, commit and command that measured it, and `publish`, which
writes the README's summary and docs/performance.md's tables from the benchmarks' JSON files. Pure
text in, text out, except `publish`, which rewrites the two files' marked sections."""
from __future__ import annotations

import dataclasses

import os
import platform
import subprocess
import time
from pathlib import Path

from ..core.errors import UserError
from ..core.files import atomic_write_text


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
    here = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+changes" if dirty else "")) if sha else None


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
            "auto": "auto picks", "run_peak_mb": "run peak MB (plan)", "plan_time": "run time (plan)",
            "p_vs_full_per_seed": "p vs SemiEvol, per seed", "p_vs_full_pooled": "p vs SemiEvol, pooled"}


def heading(key: str) -> str:
    return HEADINGS.get(key, key.replace("_", " "))


TITLES = {"main": "Main table (test accuracy; error reduction is relative)",
          "pseudo_labels": "Pseudo-labels of the main run (checked against the held-back answers, for reporting only)",
          "ablation": "Ablations (paper Table 2)", "sensitivity": "Sensitivity to n and theta (paper Fig. 3)",
          "rounds": "Rounds (paper Fig. 7; round 0 is SFT)",
          "baselines": "Baselines (p: exact McNemar against SemiEvol on the same test questions)",
          "headline": "SemiEvol against self-consistency and w/o ICP (p: exact McNemar against SemiEvol on the same "
                      "test questions)",
          "probe": "The collapse check per seed (the warm-up's answers on up to 100 unlabeled questions; collapsed: "
                   "at least 90% one class while the labeled split's largest is at most 70%)",
          "whole_run": "Whole run, per stage",
          "seeds": "Over training seeds (test accuracy; p: exact McNemar against SemiEvol per seed, and a sign test "
                   "over the test questions pooled over the seeds)",
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
            lr = (r.get("train") or {}).get("lr")
            lines += [f"LoRA on {'all' if layers == -1 else f'the last {layers}'} blocks"
                      + (f" at lr {lr:g}" if lr else " at the family's lr")
                      + _limits(r) + ".", ""]
        changed = not_today(r)
        if changed:
            lines += ["Options that differ from today's defaults: " + ", ".join(changed) + ".", ""]
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


SAID_ELSEWHERE = {"num_layers", "limit_labeled", "limit_unlabeled", "lr"}  # stated in their own sentence (lr: the family's)


def _p(v) -> str:
    return "-" if v is None else f"{v:.2g}"


def _limits(r: dict) -> str:
    """"; the first 150 labeled rows; the first 200 unlabeled questions" as the result's run was cut, or ""."""
    run = r.get("run") or {}
    return "".join(f"; the first {run[k]} {what}" for k, what in (("limit_labeled", "labeled rows"),
                                                                   ("limit_unlabeled", "unlabeled questions"))
                   if run.get(k))


def not_today(r: dict) -> list[str]:
    """The options a result was measured with that are not today's defaults, as flags (`--embedding model`),
    read from the config the benchmark recorded: a table measured before a default changed says so itself."""
    from ..core import config

    out = []
    for section, cls in (("run", config.RunConfig), ("train", config.TrainConfig)):
        recorded = r.get(section) or {}
        for f in dataclasses.fields(cls):
            if f.name in recorded and f.name not in SAID_ELSEWHERE:
                today = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                if recorded[f.name] != today:
                    v = recorded[f.name]
                    out.append(config.flag(f) if v is True else
                               (config.flag(f).replace("--", "--no-", 1) if v is False else f"{config.flag(f)} {v}"))
    return out


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
        setting = ("LoRA on all blocks" if layers == -1 else f"LoRA on {layers} blocks" if layers else "-") + (
            _limits(r) or "; all unlabeled").replace(";", ",") + "".join(f", {o}" for o in not_today(r))
        for row in (r.get("tables") or {}).get("main", []):
            rows.append({"task": row.get("task"), "model": Path(r.get("model", "?")).name,
                         **{k: row.get(k) for k in ("majority", "vanilla", "sft", "semievol", "p_vs_sft")},
                         "setting": setting, "measured": (r.get("machine") or {}).get("date"), "file": f"`{name}`"})
        seeds = {row["method"]: row for row in (r.get("tables") or {}).get("seeds", [])}
        if seeds:
            sft, full = seeds.pop("SFT (no pseudo-labels)", None), seeds.pop("SemiEvol", None)
            if sft and full:
                others = "; ".join(f"{m} {row['mean']:.3f} (p {_p(row['p_vs_full_pooled'])})" for m, row in seeds.items())
                runs.append(f"Over training seeds {full['seeds']} on {Path((r.get('tasks') or ['?'])[0]).name} "
                            f"({setting.lstrip(', ')}): SemiEvol {full['mean']:.3f} (sd {full['sd']:.3f}) against SFT "
                            f"{sft['mean']:.3f} (sd {sft['sd']:.3f}; sign test pooled over the seeds p "
                            f"{_p(sft['p_vs_full_pooled'])})" + (f"; {others}" if others else "") + f" (`{name}`).")
        w = r.get("whole_run")
        if r.get("benchmark") == "run" and w:
            runs.append(f"The whole `semievol run` on {w['task']} took {w['seconds'] / 60:.1f} min, peak "
                        f"{w['peak_rss_mb'] / 1000:.2f} GB, on {(r.get('machine') or {}).get('cores')} cores "
                        f"(`{name}`).")
    lines = ["Test accuracy (SemiEvol against the model as it is, the warm-up alone (SFT) and the majority class; "
             "p: exact McNemar test against SFT on the same questions):", ""] + _md_table(rows)
    return "\n".join(lines + runs).rstrip() + "\n"


def _between(path: Path, body: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:  # missing, a folder, unreadable
        raise UserError(f"{path}: cannot read it ({e.strerror or type(e).__name__}); give the file whose results "
                        "section to rewrite (--readme, --details)") from None
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

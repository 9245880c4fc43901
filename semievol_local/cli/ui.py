"""All terminal drawing: progress bars, tables, messages. Nothing else in the package imports rich."""
from __future__ import annotations

import contextlib
import logging
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from ..method.report import stage_label, stage_seconds

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def error(message: str) -> None:
    """One line on stderr, never wrapped, markup off (messages hold paths and brackets)."""
    err.print(f"error: {message}", markup=False, soft_wrap=True, style="bold red" if err.is_terminal else None)


def warn(message: str) -> None:
    err.print(f"warning: {message}", markup=False, soft_wrap=True, style="yellow" if err.is_terminal else None)


def info(message: str) -> None:
    err.print(message, markup=False, soft_wrap=True)


class LogLines(logging.Handler):
    """The library's log records as lines on stderr, drawn through rich so they appear above a progress bar:
    warnings as `warning: ...`, notes (INFO: a float32 copy being written, a resumed step) as they are."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            (warn if record.levelno >= logging.WARNING else info)(record.getMessage())
        except Exception:  # a log line must never end a run
            self.handleError(record)


class _Rate(TextColumn):
    """items/s (or any unit/s) from rich's own speed estimate."""

    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress(total: int, description: str, unit: str = "items"):
    """A progress bar with count, rate and ETA; yields `advance(n=1, **fields)`."""
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TaskProgressColumn(), _Rate(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=err, transient=False, disable=not err.is_terminal and "pytest" in sys.modules) as p:
        task = p.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str = "") -> None:
            p.update(task, advance=n, status=status)

        yield advance


@contextlib.contextmanager
def status(message: str):
    """A spinner with a message on stderr while something slow with no count runs (silent off a terminal)."""
    if not err.is_terminal:
        yield
        return
    with err.status(message):
        yield


def table(title: str, columns: list[str], rows: list[list], *, to_stderr: bool = False) -> None:
    from rich.text import Text

    (err if to_stderr else out).print(Text(title, style="bold"), soft_wrap=True)
    t = Table()
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    (err if to_stderr else out).print(t)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1e}" if 0 < abs(v) < 5e-4 else f"{v:.3f}"  # a tiny p-value keeps its size, not 0.000
    return "-" if v is None else str(v)


def eval_report(result, model_label: str, split_label: str) -> None:
    rows = [["accuracy", result.accuracy],
            [f"majority class ({result.majority_label}, from the {result.majority_from})", result.majority_accuracy]]
    if result.majority_from != "this split":
        rows.append([f"oracle: this split's own majority class ({result.oracle_label})", result.oracle_accuracy])
    rows += [["items", result.n], ["items/s", result.items_per_s], ["mode", result.mode]]
    if result.truncated_prompts:
        rows.append(["prompts shortened to fit", result.truncated_prompts])
    table(f"{model_label} on {split_label}", ["", "value"], rows)
    if result.per_category:
        table("per category", ["category", "n", "accuracy"],
              [[c, v["n"], v["accuracy"]] for c, v in result.per_category.items()])


def kv_table(title: str, data: dict) -> None:
    table(title, ["", "value"], [[k, v if not isinstance(v, dict) else ", ".join(f"{a}={b}" for a, b in v.items())]
                                 for k, v in data.items()])


def train_bench(result: dict) -> None:
    """`bench train`'s figures, and with `--split` one trained block's time by part."""
    kv_table("bench train", {k: v for k, v in result.items() if k != "block_split"})
    if "block_split" in result:
        kv_table("one trained block, forward + backward", result["block_split"])


class Reporter:
    """Draws the pipeline's stages, progress bars and training steps (the pipeline's `Quiet`, made visible)."""

    def __init__(self):
        self._train = None

    def stage(self, name: str, reused: bool) -> None:
        self.close()
        if reused:
            err.print(f"  [dim]{name}: up to date, reused[/dim]")
        else:
            err.print(f"[bold cyan]▶ {name}[/bold cyan]")

    def progress(self, total: int, description: str, unit: str = "items"):
        return progress(total, description, unit)

    def train_trunk(self, done: int, total: int) -> None:
        """The one forward pass over the frozen blocks, before the first training step."""
        if self._train is None:
            p = Progress(TextColumn("cache frozen blocks"), BarColumn(), MofNCompleteColumn(), TextColumn("sequences"),
                         TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err)
            p.start()
            self._train = (p, p.add_task("trunk", total=total))
        p, task = self._train
        p.update(task, completed=done)
        if done >= total:
            self.close()

    def train_step(self, info: dict) -> None:
        if self._train is None:
            p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                         TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                         TimeRemainingColumn(), console=err)
            p.start()
            self._train = (p, p.add_task("train", total=info.get("total_steps"), status=""))
        p, task = self._train
        status = f"loss {info['loss']:.3f}  {info.get('tokens_per_s', 0):.0f} tok/s"
        if info.get("val_loss") is not None:
            status += f"  val {info['val_loss']:.3f}"
        p.update(task, completed=info["step"], status=status)
        if info["step"] >= (info.get("total_steps") or 0):
            self.close()

    def close(self) -> None:
        if self._train is not None:
            self._train[0].stop()
            self._train = None


def plan_table(plan, n: int | None = None) -> None:
    """The estimate a run prints first: per stage the tokens it will evaluate or train, the rate calibrated
    here, the time, and peak memory; then the total and what was assumed."""
    from ..method.estimate import clock

    rows = plan.at(n)
    n = plan.n_unlabeled if n is None else n
    table(f"estimate for {n} unlabeled questions on this machine", ["stage", "tokens", "tok/s", "time", "peak MB"],
          [[r.stage, f"{r.tokens:,.0f}" if r.tokens else "-", f"{r.rate:.0f}" if r.rate else "-",
            clock(r.seconds) if r.seconds is not None else "?", f"{r.peak_mb:.0f}" if r.peak_mb else "-"]
           for r in rows])
    total = plan.seconds(n)
    peak = max((r.peak_mb for r in rows if r.peak_mb), default=None)
    out.print(f"estimated run: {clock(total) if total is not None else 'unknown'}"
              + (f", peak about {peak / 1e3:.1f} GB" if peak else "") + f" ({plan.assumptions})",
              markup=False, soft_wrap=True)


def run_report(report: dict) -> None:
    a = report["accuracy"]
    er = report["error_reduction"]
    table("SemiEvol: test accuracy", ["majority", "vanilla", "SFT", "SemiEvol", "err. red. vs vanilla", "vs SFT"],
          [[a["majority"], a["vanilla"], a["sft"], a["semievol"], er["semievol_vs_vanilla"], er["semievol_vs_sft"]]])
    pv = report.get("semievol_vs_sft_paired")
    if pv:
        info(f"question by question: SemiEvol alone right on {pv['only_first']}, SFT alone on {pv['only_second']} "
             f"of {pv['n']} (exact McNemar p = {pv['p_value']:.3f}; a large p: the gap is within chance)")
    if len(report["accuracy_by_round"]) > 1:
        table("by round", ["round", "accuracy"], [[k, v] for k, v in report["accuracy_by_round"].items()])
    for name, st in report["pseudo_labels"].items():
        if st:
            table(f"pseudo-labels, {name} (vs held-back answers, reporting only)", ["", "value"], [
                ["questions", st["n"]], ["consistency rate", st["consistency_rate"]],
                ["accuracy, all", st["accuracy_all"]], ["accuracy, consistent", st["accuracy_consistent"]],
                ["accuracy, self-justified", st["accuracy_justified"]],
                ["accuracy, selected", st["accuracy_selected"]], ["selected", st["selected"]],
                ["prompts shortened to fit", st.get("prompt_shortened")],
                ["justified without candidates (too long)", st.get("justify_fallback")],
                [f"letter mass under {st.get('min_letter_mass', 0):g} (not selected)", st.get("low_letter_mass")]])
    for name, st in report["pseudo_labels"].items():
        if st and st["selected"] == 0:
            why = (f": every one gave the option letters under {st['min_letter_mass']:g} of its probability "
                   "(a model that does not follow the answer format; --min-letter-mass sets the floor)"
                   if st.get("low_letter_mass") == st["n"] else "")
            warn(f"{name}: no pseudo-label was selected, so the final fine-tune trained on the labeled rows alone{why}")
    cls = report.get("classes") or {}
    if cls:
        letters = list(cls["labeled split"])
        table("answers by option (shares)", ["answers", *letters],
              [[name, *(f"{d.get(k, 0.0):.2f}" for k in letters)] for name, d in cls.items()])
    for w in report.get("warnings", []):
        warn(w)
    mj = report.get("majority")
    if mj:
        info(f"majority class {mj['majority_label']} from the {mj['majority_from']}; the test split's own majority "
             f"class ({mj['label']}, an oracle) would score {_fmt(mj['accuracy'])}")
    table("stages", ["stage", "seconds", "peak RSS (MB)"],
          [[stage_label(n, s), stage_seconds(s), f"{s['peak_rss_mb']:.0f}"] for n, s in report["stages"].items()])


def bench_tables(result: dict) -> None:
    """A benchmark's tables (from `runners.quality` or `runners.pseudo_label`) and where it ran."""
    m = result.get("machine", {})
    info(f"{m.get('date')}: {m.get('cores')} cores, {m.get('cpu')}, {m.get('os')}, commit {m.get('commit')}")
    if result.get("benchmark") == "pseudo-label":
        cols = ["questions_per_s", "accuracy", "consistency_rate", "justified_rate", "seconds"]
        table(f"pseudo-labeling, {result['n_items']} questions", ["recipe"] + cols,
              [[mode] + [result[mode].get(c) for c in cols] for mode in ("sample", "score")])
        kv_table("score mode vs the paper's recipe", {"ratio": result["ratio"], **result["goal"]})
        return
    if result.get("benchmark") == "servers":
        rows = result["rows"]
        table(f"collaboration on {result['n_items']} questions (score mode)", list(rows[0]),
              [list(r.values()) for r in rows])
        kv_table("the same as in process", result["goal"])
        return
    from ..bench.results import TITLES, heading

    for name, rows in result.get("tables", {}).items():
        if rows:
            table(TITLES.get(name, name), [heading(k) for k in rows[0]], [list(r.values()) for r in rows])
    w = result.get("whole_run")
    if w:
        kv_table("whole run", w)

"""The run's report: accuracy table, pseudo-label statistics, time and memory per stage, plots.

This is the one place that reads the unlabeled split's held-back answers, and only to *report* how good
the pseudo-labels were; nothing computed here flows back into the pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core import collapse
from ..core.config import RunConfig
from ..core.data import Item, find_split_file, head, load_heldout, load_split
from ..core.errors import UserError
from ..core.files import atomic_write_json, atomic_write_text
from ..core.prompts import answers_match
from ..core.runfolder import exclusive, run_record, sealed_stages


def _json(path: Path):
    return json.loads(path.read_text())


def _stages(run: Path) -> dict[str, dict]:
    return dict(sorted(sealed_stages(run).items(), key=lambda kv: stage_order(kv[0])))


ORDER = ["warmup", "eval/vanilla", "eval/sft", "probe", "retrieval", "collaboration", "selection", "final", "eval"]


def stage_order(name: str) -> tuple:
    """Stages in the order the pipeline runs them: warm-up and baselines, then each round's stages."""
    head, _, tail = name.partition("/")
    if head.startswith("round") and head[5:].isdigit():
        return (int(head[5:]), ORDER.index(tail) if tail in ORDER else len(ORDER), name)
    return (0, ORDER.index(name) if name in ORDER else len(ORDER), name)


def error_reduction(base: float, new: float) -> float | None:
    """Relative reduction of the error rate from `base` to `new` accuracy."""
    return None if base >= 1 else (new - base) / (1 - base)


def paired(a: dict, b: dict) -> dict | None:
    """Two evaluations of the same test questions, question by question: how many only `a` gets right, how
    many only `b`, and the exact two-sided McNemar p-value (a binomial test on those discordant questions).
    A small gap with a large p is what two equally good models also show."""
    right_a = {p["index"]: bool(p["correct"]) for p in a["predictions"] if p.get("correct") is not None}
    right_b = {p["index"]: bool(p["correct"]) for p in b["predictions"] if p.get("correct") is not None}
    common = right_a.keys() & right_b.keys()
    if not common:
        return None
    only_a = sum(right_a[i] and not right_b[i] for i in common)
    only_b = sum(right_b[i] and not right_a[i] for i in common)
    return {"n": len(common), "only_first": only_a, "only_second": only_b, "p_value": sign_test(only_a, only_b)}


def sign_test(plus: int, minus: int) -> float:
    """Exact two-sided sign test: the chance of a split at least this uneven between `plus` and `minus` when
    each is equally likely (scipy's binomial test)."""
    from scipy.stats import binomtest

    return float(binomtest(plus, plus + minus, 0.5).pvalue) if plus + minus else 1.0


def paired_pooled(pairs: list[tuple[dict, dict]]) -> dict | None:
    """Two methods run with several seeds, on the same test questions: per question, how many of the first's
    runs got it right minus how many of the second's, and the exact sign test over the questions where that
    differs. The questions are the units (a question's runs under different seeds are not independent of each
    other), so this is one paired test pooled over the seeds."""
    diff: dict[int, int] = {}
    for a, b in pairs:
        right_a = {p["index"]: bool(p["correct"]) for p in a["predictions"] if p.get("correct") is not None}
        right_b = {p["index"]: bool(p["correct"]) for p in b["predictions"] if p.get("correct") is not None}
        for i in right_a.keys() & right_b.keys():
            diff[i] = diff.get(i, 0) + int(right_a[i]) - int(right_b[i])
    if not diff:
        return None
    plus, minus = sum(d > 0 for d in diff.values()), sum(d < 0 for d in diff.values())
    return {"n": len(diff), "first_better": plus, "second_better": minus, "p_value": sign_test(plus, minus)}


def pseudo_label_stats(records: list[dict], held: dict[int, Item],
                       min_letter_mass: float = RunConfig.min_letter_mass) -> dict:
    """Accuracy of pseudo-labels against held-back answers, by kind, by entropy decile, by coverage. A
    pseudo-label is right by the same rule as a test answer (`answers_match`: letters exactly, numbers within
    1%, short text normalized)."""
    recs = [r for r in records if r["index"] in held]
    if not recs:
        return {}
    ok = np.array([answers_match(r["pseudo_label"], held[r["index"]].answer, closed=held[r["index"]].closed)
                   for r in recs])
    cons = np.array([r["consistent"] for r in recs])
    just = np.array([r.get("justified", False) for r in recs])
    sel = np.array([r["selected"] for r in recs])
    ent = np.array([r["entropy"] for r in recs], dtype=np.float64)

    def acc(mask):
        return float(ok[mask].mean()) if mask.any() else None

    order = np.argsort(ent, kind="stable")
    deciles = []
    for d, chunk in enumerate(np.array_split(order, 10)):
        if len(chunk):
            deciles.append({"decile": d + 1, "max_entropy": float(ent[chunk].max()), "n": int(len(chunk)),
                            "accuracy": float(ok[chunk].mean())})
    coverage = []
    for c in range(1, 11):
        n = max(1, int(round(len(order) * c / 10)))
        coverage.append({"coverage": c / 10, "accuracy": float(ok[order[:n]].mean())})
    mass = np.array([np.nan if r.get("letter_mass") is None else r["letter_mass"] for r in recs], dtype=np.float64)
    low = mass < min_letter_mass
    return {"n": len(recs), "consistency_rate": float(cons.mean()), "accuracy_all": acc(np.ones_like(ok)),
            "prompt_shortened": int(sum(bool(r.get("prompt_shortened")) for r in recs)),
            "justify_fallback": int(sum(bool(r.get("justify_fallback")) for r in recs)),
            "low_letter_mass": int(low.sum()), "accuracy_low_letter_mass": acc(low),
            "accuracy_consistent": acc(cons), "accuracy_justified": acc(just), "accuracy_selected": acc(sel),
            "selected": int(sel.sum()), "entropy_deciles": deciles, "coverage_accuracy": coverage}


def build_report(run: Path) -> dict:
    """The run's report (accuracies, paired comparison, pseudo-label quality, classes, warnings, stage figures),
    written as report.json, report.md and plots under the run folder's lock (a run still writing the folder:
    one line naming its PID)."""
    run = Path(run)
    meta = run_record(run)  # not a run folder: one line, before any lock or file
    with exclusive(run):
        return _build(run, meta)


def _build(run: Path, meta: dict) -> dict:
    stages = _stages(run)
    rounds = sorted({int(s.split("/")[0][5:]) for s in stages if s.startswith("round") and s.endswith("/eval")})
    evals = {name: _json(run / name / "eval.json") for name in stages if name.startswith(("eval/", "round")) and
             name.endswith(("vanilla", "sft", "/eval"))}
    van, sft = evals.get("eval/vanilla"), evals.get("eval/sft")
    last = evals.get(f"round{rounds[-1]}/eval") if rounds else None
    acc = {"majority": van["majority_accuracy"] if van else None, "vanilla": van["accuracy"] if van else None,
           "sft": sft["accuracy"] if sft else None, "semievol": last["accuracy"] if last else None}
    # the majority class is the labeled split's (a baseline a user could know); the test split's own majority
    # class reads the answers it is scored on, so it is shown apart, as an oracle
    oracle = ({"label": van.get("oracle_label"), "accuracy": van.get("oracle_accuracy"),
               "majority_label": van["majority_label"], "majority_from": van.get("majority_from", "this split")}
              if van else None)
    report = {"model": meta["model"], "data": meta["data"], "mode": meta["mode"], "accuracy": acc,
              "majority": oracle,
              "accuracy_by_round": {r: evals[f"round{r}/eval"]["accuracy"] for r in rounds},
              "error_reduction": {
                  "semievol_vs_vanilla": error_reduction(acc["vanilla"], acc["semievol"]) if last and van else None,
                  "semievol_vs_sft": error_reduction(acc["sft"], acc["semievol"]) if last and sft else None},
              # question by question: is the gap between SemiEvol and SFT more than chance?
              "semievol_vs_sft_paired": paired(last, sft) if last and sft else None,
              "stages": {n: {"seconds": s["seconds"], "peak_rss_mb": s["peak_rss_mb"], "figures": s.get("figures", {}),
                             # manifests written before attempts were counted time only their last attempt
                             "attempts": s.get("attempts"), "untimed_attempts": s.get("untimed_attempts", "attempts" not in s)}
                         for n, s in stages.items()}}
    # pseudo-label quality, from the held-back answers (reporting only)
    report["pseudo_labels"] = {}
    try:
        path = find_split_file(Path(meta["data"]), "unlabeled")
        held = dict(enumerate(load_heldout(path)))
    except UserError as e:  # no answers to check against: say why instead of leaving the statistics out silently
        held = {}
        report["pseudo_labels_unchecked"] = str(e)
    for r in rounds:
        p = run / f"round{r}" / "selection" / "pseudo_labels.jsonl"
        if p.exists() and held:
            recs = [json.loads(ln) for ln in p.read_text().splitlines()]
            floor = meta.get("run", {}).get("min_letter_mass", 0.0)
            report["pseudo_labels"][f"round{r}"] = {**pseudo_label_stats(recs, held, floor), "min_letter_mass": floor}
    report["classes"] = class_distributions(run, meta, stages, evals)
    report["warnings"] = warnings(run, stages, van, sft, report["classes"])
    report["plots"] = _plots(run, {"vanilla": van, "sft": sft, "semievol": last}, report["pseudo_labels"])
    atomic_write_json(run / "report.json", report)
    atomic_write_text(run / "report.md", to_markdown(report))
    return report


def class_distributions(run: Path, meta: dict, stages: dict, evals: dict) -> dict[str, dict[str, float]]:
    """Per stage, the share of each option among the answers it gave (test predictions, the collapse probe's
    answers, the pseudo-labels: all and selected), beside the labeled split's. A model that answers by the label
    prior shows one letter everywhere. Empty for open-answer tasks."""
    try:
        lab = load_split(find_split_file(Path(meta["data"]), "labeled"), "labeled").items
    except UserError:
        return {}
    lab = head(lab, meta["run"].get("limit_labeled"))  # the rows the run trained on
    if not lab or not all(it.closed for it in lab):
        return {}
    out = {"labeled split": collapse.distribution(it.answer for it in lab)}
    classes = tuple(out["labeled split"])
    for name in stages:
        if name in evals:
            out[f"{name} (test predictions)"] = collapse.distribution(
                (p["predicted"] for p in evals[name]["predictions"]), classes)
        elif name == "probe":
            out["probe (warm model, unlabeled)"] = _json(run / "probe" / "probe.json")["predicted"]
        elif name.endswith("/selection"):
            recs = [json.loads(ln) for ln in (run / name / "pseudo_labels.jsonl").read_text().splitlines()]
            out[f"{name} (all pseudo-labels)"] = collapse.distribution((r["pseudo_label"] for r in recs), classes)
            if any(r["selected"] for r in recs):
                out[f"{name} (selected)"] = collapse.distribution(
                    (r["pseudo_label"] for r in recs if r["selected"]), classes)
    return out


def warnings(run: Path, stages: dict, van: dict | None, sft: dict | None, classes: dict) -> list[str]:
    """What says the method could not help: an SFT not shown better than answering the labeled split's majority
    class everywhere (one-sided exact binomial p >= 0.05), a collapsed warm-up (where the run stopped, or went on
    with --force), a fine-tune whose loss jumped and was rolled back (`mlx_engine.diverged`), and a selection
    with at least `collapse.SHARE` of one class."""
    out = []
    if sft and van and van.get("majority_accuracy") is not None:
        marks = [p["correct"] for p in sft["predictions"] if p.get("correct") is not None]
        p = collapse.beats_majority(int(sum(marks)), len(marks), van["majority_accuracy"])
        if marks and p >= 0.05:
            out.append(f"SFT ({sft['accuracy']:.3f}) is not shown better than answering {van['majority_label']} "
                       f"everywhere ({van['majority_accuracy']:.3f}; exact binomial p = {p:.3f}): the warm-up may "
                       "have learned the label prior only")
    if "probe" in stages:
        found = _json(run / "probe" / "probe.json")
        if found["collapsed"]:
            went_on = any(name.startswith("round") for name in stages)
            out.append(f"the warm-up answered {found['top']} on {found['top_share']:.0%} of {found['n']} probed "
                       "unlabeled questions (collapsed; " + ("the run went on with --force)" if went_on else
                                                             "the run stopped before collaboration)"))
    for name, stage in stages.items():
        done = stage.get("figures", {})
        if done.get("rollbacks"):
            out.append(f"{name}: the training loss jumped far above its level {done['rollbacks']} time(s); each time "
                       f"training went back two steps at half the rate ({done.get('rollback_steps', '')})")
    for name, dist in classes.items():
        if name.endswith("(selected)"):
            top, share = collapse.largest(dist)
            if share >= collapse.SHARE:
                out.append(f"{name.split(' ')[0]}: {share:.0%} of the selected pseudo-labels are {top}")
    return out


def _plots(run: Path, evals: dict, pseudo: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ents = {k: [p["entropy"] for p in v["predictions"] if p.get("entropy") is not None] for k, v in evals.items() if v}
    if ents:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        hi = max((max(e) for e in ents.values() if e), default=1.0)
        for name, e in ents.items():
            ax.hist(e, bins=20, range=(0, hi), alpha=0.5, label=name)
        ax.set_xlabel("entropy of the answer (nats)")
        ax.set_ylabel("test questions")
        ax.legend()
        ax.set_title("Entropy on the test split")
        fig.tight_layout()
        _save(fig, run / "plots" / "entropy_test.png")
        made.append("plots/entropy_test.png")
    if pseudo:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, st in pseudo.items():
            cov = st.get("coverage_accuracy", [])
            ax.plot([c["coverage"] for c in cov], [c["accuracy"] for c in cov], marker="o", label=name)
        ax.set_xlabel("coverage (lowest-entropy fraction kept)")
        ax.set_ylabel("pseudo-label accuracy")
        ax.legend()
        ax.set_title("Coverage vs accuracy of pseudo-labels")
        fig.tight_layout()
        _save(fig, run / "plots" / "coverage_accuracy.png")
        made.append("plots/coverage_accuracy.png")
    plt.close("all")
    return made


def _save(fig, path: Path) -> None:
    import io

    from ..core.files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _f(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def to_markdown(r: dict) -> str:
    a = r["accuracy"]
    lines = [f"# SemiEvol run: {Path(r['data']).name}", "", f"Model: `{r['model']}`; mode: {r['mode']}.", "",
             "| majority | vanilla | SFT | SemiEvol | error reduction vs vanilla | vs SFT |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| {_f(a['majority'])} | {_f(a['vanilla'])} | {_f(a['sft'])} | {_f(a['semievol'])} | "
             f"{_f(r['error_reduction']['semievol_vs_vanilla'])} | {_f(r['error_reduction']['semievol_vs_sft'])} |", ""]
    lines += [f"**Warning:** {w}." for w in r.get("warnings", [])] + ([""] if r.get("warnings") else [])
    mj = r.get("majority")
    if mj:
        lines += [f"Majority class: {mj['majority_label']} (from the {mj['majority_from']}); the test split's own "
                  f"majority class, an oracle, would score {_f(mj['accuracy'])} ({mj['label']}).", ""]
    pv = r.get("semievol_vs_sft_paired")
    if pv:
        lines += [f"Question by question against SFT: SemiEvol alone right on {pv['only_first']}, SFT alone on "
                  f"{pv['only_second']} of {pv['n']} (exact McNemar p = {pv['p_value']:.3f}).", ""]
    if len(r["accuracy_by_round"]) > 1:
        lines += ["| round | accuracy |", "| --- | --- |"]
        lines += [f"| {k} | {_f(v)} |" for k, v in r["accuracy_by_round"].items()] + [""]
    if r.get("pseudo_labels_unchecked"):
        lines += [f"Pseudo-label accuracy is not reported: the unlabeled answers could not be read "
                  f"({r['pseudo_labels_unchecked']}).", ""]
    for name, st in r["pseudo_labels"].items():
        if not st:
            continue
        lines += [f"## Pseudo-labels, {name} (checked against held-back answers, for reporting only)", "",
                  f"- questions: {st['n']}; consistency rate: {_f(st['consistency_rate'])}",
                  f"- accuracy: all {_f(st['accuracy_all'])}, consistent {_f(st['accuracy_consistent'])}, "
                  f"self-justified {_f(st['accuracy_justified'])}, selected {_f(st['accuracy_selected'])} "
                  f"({st['selected']} selected)",
                  f"- prompts shortened to fit the context: {st.get('prompt_shortened', 0)}; justifications asked "
                  f"without their candidates (too long): {st.get('justify_fallback', 0)}; letters under "
                  f"{st.get('min_letter_mass', 0):g} of the probability (never selected): {st.get('low_letter_mass', 0)} "
                  f"(accuracy {_f(st.get('accuracy_low_letter_mass'))})", "",
                  "| entropy decile | max entropy | n | accuracy |", "| --- | --- | --- | --- |"]
        lines += [f"| {d['decile']} | {d['max_entropy']:.3f} | {d['n']} | {d['accuracy']:.3f} |" for d in st["entropy_deciles"]]
        lines += [""]
    cls = r.get("classes") or {}
    if cls:
        letters = list(cls["labeled split"])
        lines += ["## Answers by option", "", "| answers | " + " | ".join(letters) + " |",
                  "| --- |" + " --- |" * len(letters)]
        lines += [f"| {name} | " + " | ".join(f"{d.get(k, 0.0):.2f}" for k in letters) + " |" for name, d in cls.items()]
        lines += [""]
    lines += ["## Stages", "", "| stage | seconds | peak RSS (MB) |", "| --- | --- | --- |"]
    lines += [f"| {stage_label(n, s)} | {stage_seconds(s)} | {s['peak_rss_mb']:.0f} |" for n, s in r["stages"].items()]
    lines += [""] + [f"![{p}]({p})" for p in r.get("plots", [])]
    return "\n".join(lines) + "\n"


def stage_label(name: str, s: dict) -> str:
    """A stage's name, with its attempts when a killed attempt was resumed."""
    n = s.get("attempts") or 1
    return f"{name} ({n} attempts)" if n > 1 else name


def stage_seconds(s: dict) -> str:
    """Seconds over every attempt; '>=' where an earlier attempt may have gone untimed (a lower bound)."""
    return (">=" if s.get("untimed_attempts") else "") + f"{s['seconds']:.1f}"

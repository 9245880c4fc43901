"""SemiEvol, as a recipe: warm-up, retrieval, collaboration, selection, final fine-tune, evaluation, rounds.

Each stage is a plain function that writes its outputs into its own sealed folder of the run folder
(see `runfolder`), so a second invocation resumes after the last complete stage and a changed input
re-runs only what depends on it. Prompts are built from question + options (+ labeled demonstrations)
only; the unlabeled split is loaded without its answers and nothing here reads them (`report` does,
for reporting alone).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ..core import config, retrieval, selection
from ..core.config import EngineConfig, RunConfig, TrainConfig
from ..core.data import Item, Task, load_task
from ..core.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..core.prompts import normalize_text
from ..core.runfolder import RunFolder, StageResult, digest, exclusive, file_digest, items_digest, weights_identity
from ..engines import protocol
from ..engines.protocol import InferenceEngine, load
from .collaboration import collaborate_one, label_entropy, label_mass, learner_configs, self_consistency_one
from .evaluate import evaluate, resolve_mode
from .finetune import train_adapter

log = logging.getLogger(__name__)


class Quiet:
    """The do-nothing reporter: the pipeline calls it; `ui` supplies one that draws."""

    def stage(self, name: str, reused: bool) -> None: ...

    def progress(self, total: int, description: str, unit: str = "items"):
        import contextlib

        return contextlib.nullcontext(lambda n=1, status="": None)

    def train_step(self, info: dict) -> None: ...

    def train_trunk(self, done: int, total: int) -> None: ...


def canonical(cfg: RunConfig) -> RunConfig:
    """One spelling per method: without collaboration there is one learner, so `--no-cl` and `--learners 1`
    are the same pseudo-labeling (a benchmark computes it once)."""
    return dataclasses.replace(cfg, learners=1, cl=True) if not cfg.cl else cfg


# --- stages -------------------------------------------------------------------------------------

def trunk_store(run: RunFolder, engine: InferenceEngine) -> Path:
    """Where a run's fine-tunes keep the frozen blocks' outputs by token sequence (per model file): the final
    fine-tune reads the warm-up's labeled rows instead of computing them again. Removed when the run ends."""
    return run.root / TRUNK_STORE / file_digest(engine.model_path)[:16]


TRUNK_STORE = ".trunk"


def stage_train(run: RunFolder, name: str, engine: InferenceEngine, items: list[Item], tcfg: TrainConfig, reporter,
                *, init_adapter: StageResult | None = None) -> StageResult:
    inputs = {"model": file_digest(engine.model_path), "items": items_digest(items, True),
              "options": config.identity("train", tcfg),
              "init_adapter": init_adapter.outputs_digest if init_adapter else None}

    def build(work: Path):
        resume = (work / "checkpoints").exists()
        summary = train_adapter(engine, items, tcfg, work, resume=resume, on_step=reporter.train_step,
                                on_trunk=reporter.train_trunk,
                                init_adapter=init_adapter.dir if init_adapter else None,
                                trunk_store=trunk_store(run, engine))
        return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, dict))}

    return _stage(run, name, inputs, build, reporter)


def stage_retrieval(run: RunFolder, name: str, engine: InferenceEngine, labeled: list[Item], unlabeled: list[Item],
                    cfg: RunConfig, reporter) -> StageResult:
    inputs = {"model": weights_identity(engine) if cfg.embedding == "model" else None,
              "labeled": items_digest(labeled, False), "unlabeled": items_digest(unlabeled, False),
              "options": config.identity("retrieval", cfg)}

    def build(work: Path):
        before = _counts(engine)
        k = min(cfg.k, 3) if cfg.icp else 0
        if k == 0:
            ids = np.zeros((len(unlabeled), 0), dtype=np.int64)
            sims = np.zeros((len(unlabeled), 0), dtype=np.float32)
        else:
            lab_text = [q.question for q in labeled]
            unl_text = [q.question for q in unlabeled]
            if cfg.embedding == "tfidf":
                a, b = retrieval.tfidf_embed(lab_text, lab_text), retrieval.tfidf_embed(lab_text, unl_text)
            elif cfg.embedding == "model":
                with reporter.progress(len(lab_text) + len(unl_text), "embed", "texts") as advance:
                    a = _embed(engine, lab_text, advance)
                    b = _embed(engine, unl_text, advance)
            ids, sims = retrieval.knn(a, b, k)
        np.save(work / "neighbours.npy", ids)
        np.save(work / "similarities.npy", sims)
        return {"k": int(ids.shape[1]), **(_computed_since(engine, before) if cfg.embedding == "model" else {})}

    return _stage(run, name, inputs, build, reporter)


def _embed(engine: InferenceEngine, texts: list[str], advance, chunk: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(texts), chunk):
        out.append(engine.embed(texts[i:i + chunk]))
        advance(len(texts[i:i + chunk]))
    return np.concatenate(out)


def stage_collaboration(run: RunFolder, name: str, engine: InferenceEngine, labeled: list[Item], unlabeled: list[Item],
                        retrieved: StageResult, warm: StageResult | None, mode: str, cfg: RunConfig,
                        ecfg: EngineConfig, reporter) -> StageResult:
    learners = learner_configs(cfg)
    inputs = {"model": weights_identity(engine), "labeled": items_digest(labeled, True),
              "unlabeled": items_digest(unlabeled, False), "retrieval": retrieved.outputs_digest,
              "warm": warm.outputs_digest if warm else None, "mode": mode,
              "options": config.identity("collaboration", canonical(cfg), ecfg)}

    def build(work: Path):
        neighbours = np.load(retrieved.path("neighbours.npy"))
        warm_path = warm.path("adapter.gguf") if warm else None
        partial = work / "collaboration.partial.jsonl"
        done = {r["position"]: r for r in _read_complete_lines(partial)}  # a killed run's finished questions
        resumed = set(done)

        def one(eng, pos: int) -> dict:
            item, demos = unlabeled[pos], [labeled[i] for i in neighbours[pos]]
            if cfg.labeler == "self-consistency":
                return self_consistency_one(eng, item, demos, mode, cfg, warm_path)
            return collaborate_one(eng, item, demos, learners, mode, cfg, warm_path)

        before = _counts(engine)
        with open(partial, "a", encoding="utf-8") as f, \
                reporter.progress(len(unlabeled), "collaborate", "questions") as advance:
            advance(len(done))
            # in order in process; over a fleet of llama-servers as they finish (a question's record does
            # not depend on which engine, lane or order computed it)
            for pos, rec in protocol.each(engine, [p for p in range(len(unlabeled)) if p not in done], one):
                rec["position"] = pos
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[pos] = rec
                advance(status="agree" if rec["consistent"] else "justified")
        recs = [done[p] for p in range(len(unlabeled))]
        atomic_write_text(work / "collaboration.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
        partial.unlink()
        return {"questions": len(recs), "consistent": int(sum(r["consistent"] for r in recs)), **prompt_counts(recs),
                "asked": len(recs) - len(resumed), **_computed_since(engine, before)}

    return _stage(run, name, inputs, build, reporter)


def _counts(engine) -> tuple | None:
    """(decode calls, tokens by adapter and decode shape) llama.cpp has run so far in this process; None for
    llama-servers."""
    return engine.counts()


def _computed_since(engine, before: tuple | None) -> dict:
    """A stage's figures for `bench run`: tokens evaluated (after prefix reuse), decode calls, tokens by
    adapter file ("": none), and by adapter and decode shape ("cached:size": tokens) since `before`."""
    now = _counts(engine)
    if now is None or before is None:
        return {}
    shapes = {}
    for a, d in now[1].items():
        was = before[1].get(a, {})
        diff = {f"{p}:{n}": t - was.get((p, n), 0) for (p, n), t in sorted(d.items()) if t - was.get((p, n), 0)}
        if diff:
            shapes[a] = diff
    by = {a: sum(d.values()) for a, d in shapes.items()}
    return {"tokens_computed": sum(by.values()), "decodes": now[0] - before[0], "tokens_by_adapter": by,
            "decode_shapes": shapes}


def prompt_counts(recs: list[dict]) -> dict:
    """How many questions had a prompt shortened (demonstrations dropped, question cut) or a justification
    asked without its candidates (they did not fit the context)."""
    asks = [[*r["learners"], *([r["justification"]] if r.get("justification") else [])] for r in recs]
    return {"demos_dropped": sum(any(a.get("demos_dropped") for a in q) for q in asks),
            "question_truncated": sum(any(a.get("question_truncated") for a in q) for q in asks),
            "justify_fallback": sum(bool((r.get("justification") or {}).get("justify_fallback")) for r in recs)}


def _read_complete_lines(path: Path) -> list[dict]:
    """Records of a JSONL file written line by line; a torn last line (a kill mid-write) is dropped."""
    if not path.exists():
        return []
    recs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            recs.append(json.loads(line))
    with open(path, "r+", encoding="utf-8") as f:  # cut the torn tail so appends start on a clean line
        f.truncate(sum(len(json.dumps(r)) + 1 for r in recs))
    return recs


def select_records(recs: list[dict], cfg: RunConfig, closed: bool = True):
    """The keep-mask of `--selection` over collaboration records, with what decided it: (keep, entropy,
    letter mass, vote share, sure) per record."""
    ent = np.array([label_entropy(r) for r in recs], dtype=np.float64)
    has_label = np.array([r["pseudo_label"] is not None for r in recs])
    mass = [label_mass(r) for r in recs]
    # score mode: an answer whose letters got little of the model's probability is not a confident one,
    # however peaked its renormalised distribution: adaptive selection never keeps it
    sure = np.array([m is None or m >= cfg.min_letter_mass for m in mass])
    norm = (lambda x: x) if closed else (lambda x: None if x is None else normalize_text(x))
    shares = np.array([selection.vote_share([norm(a["answer"]) for a in r["learners"]], norm(r["pseudo_label"]))
                       for r in recs])
    if not cfg.adaptive_selection:
        keep = np.ones(len(recs), dtype=bool)
    elif cfg.selection == "vote":  # the self-consistency baseline: the vote alone, no entropy
        keep = shares >= cfg.min_vote_share - 1e-12
    elif cfg.selection == "fixed":  # a baseline: one entropy bar for every task and run, no percentile
        keep = (ent <= cfg.max_entropy) & sure
    else:
        only = np.array([r["justified"] for r in recs]) if cfg.justified_only else None
        groups = [str(r["pseudo_label"]) for r in recs] if cfg.threshold == "per-class" and closed else None
        keep = selection.select(ent, cfg.theta, only=only, groups=groups) & sure
    return keep & has_label, ent, mass, shares, sure


def stage_selection(run: RunFolder, name: str, collab: StageResult, cfg: RunConfig, reporter,
                    closed: bool = True) -> StageResult:
    """Entropy, letter mass and vote share per pseudo-label, and the keep-mask of `--selection`: the
    theta-percentile of entropy (the paper's), a fixed entropy bar, or the vote share (self-consistency);
    `--no-as` keeps all. `closed` (every question has options) lets `--threshold per-class` group by the
    pseudo-label's option (open answers use one threshold, and vote by normalized text)."""
    inputs = {"collaboration": collab.outputs_digest, "entropy": "of the final answer",
              "closed": closed, "options": config.identity("selection", cfg)}

    def build(work: Path):
        recs = [json.loads(ln) for ln in collab.path("collaboration.jsonl").read_text().splitlines()]
        keep, ent, mass, shares, sure = select_records(recs, cfg, closed)
        lines = [json.dumps({"index": r["index"], "pseudo_label": r["pseudo_label"], "entropy": float(e),
                             "letter_mass": m, "vote_share": float(v), "consistent": r["consistent"],
                             "justified": r["justified"],
                             "justify_fallback": bool((r.get("justification") or {}).get("justify_fallback")),
                             "prompt_shortened": any(v for k, v in prompt_counts([r]).items() if k != "justify_fallback"),
                             "selected": bool(k)})
                 for r, k, e, m, v in zip(recs, keep, ent, mass, shares)]
        atomic_write_text(work / "pseudo_labels.jsonl", "\n".join(lines) + "\n")
        return {"selected": int(keep.sum()), "of": len(recs), "low_letter_mass": int((~sure).sum())}

    return _stage(run, name, inputs, build, reporter)


def stage_eval(run: RunFolder, name: str, engine: InferenceEngine, test: list[Item], test_split, adapter: StageResult | None,
               mode: str, ecfg: EngineConfig, prior: list[str], reporter) -> StageResult:
    """Accuracy on the test split; `prior`, the labeled split's answers, sets the majority-class baseline."""
    inputs = {"model": weights_identity(engine), "test": items_digest(test, True),
              "adapter": adapter.outputs_digest if adapter else None, "mode": mode, "prior": digest(prior),
              "options": config.identity("eval", ecfg)}

    def build(work: Path):
        engine.set_adapter(adapter.path("adapter.gguf") if adapter else None)
        before = _counts(engine)
        split = dataclasses.replace(test_split, items=test)
        with reporter.progress(len(test), name.split("/")[-1]) as advance:
            res = evaluate(engine, split, mode=mode, prior=prior,
                           on_item=lambda p: advance(status="ok" if p.correct else "miss"))
        atomic_write_json(work / "eval.json", res.as_dict())
        return {"accuracy": res.accuracy, "items_per_s": res.items_per_s, "asked": len(test),
                **_computed_since(engine, before)}

    return _stage(run, name, inputs, build, reporter)


def _stage(run: RunFolder, name: str, inputs: dict, build, reporter) -> StageResult:
    return run.stage(name, inputs, build, announce=lambda reused: reporter.stage(name, reused))


# --- the recipe ---------------------------------------------------------------------------------

def read_selected(sel: StageResult, unlabeled: list[Item]) -> tuple[list[Item], set[int]]:
    """Selected pseudo-labeled items (answer = pseudo-label) and the indices of those selected."""
    by_index = {it.index: it for it in unlabeled}
    out, chosen = [], set()
    for line in sel.path("pseudo_labels.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["selected"]:
            out.append(dataclasses.replace(by_index[r["index"]], answer=r["pseudo_label"]))
            chosen.add(r["index"])
    return out, chosen


def run_semievol(model_path: Path, data: Path, out: Path, cfg: RunConfig, tcfg: TrainConfig,
                 ecfg: EngineConfig | None = None, reporter=None, share: tuple[Path, ...] = ()) -> dict:
    """The whole method; returns the stage results by name. Writes everything under `out`.

    `share`: sibling run folders whose stages may be reused where their inputs are identical."""
    reporter = reporter or Quiet()
    ecfg = ecfg or EngineConfig()
    for c in (cfg, tcfg, ecfg):  # every option within its declared range, before any data or model loads
        config.check(c)
    with exclusive(out):  # one writer per run folder: a second command on it stops here
        return _run(model_path, data, out, cfg, tcfg, ecfg, reporter, share)


def _run(model_path, data, out, cfg, tcfg, ecfg, reporter, share):
    task: Task = load_task(data)  # the unlabeled split arrives without answers (or any other column)
    labeled, unlabeled, test = task["labeled"].items, task["unlabeled"].items, task["test"].items
    if cfg.limit_unlabeled:
        unlabeled = unlabeled[:cfg.limit_unlabeled]
    if cfg.limit_test:
        test = test[:cfg.limit_test]
    mode = resolve_mode(None if cfg.mode == "auto" else cfg.mode, labeled + unlabeled + test)
    engine = load(model_path, ecfg)
    run = RunFolder(out, share)
    atomic_write_json(out / "run.json", {"model": str(model_path), "data": str(data), "mode": mode,
                                          "run": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
                                          "engine": dataclasses.asdict(ecfg)})
    prior = [it.answer for it in labeled]  # the majority-class baseline: what a user knows without the test set
    stages: dict[str, StageResult] = {}
    ftcfg = dataclasses.replace(tcfg, lr=cfg.final_lr or tcfg.lr, epochs=cfg.final_epochs or tcfg.epochs)
    # 1. in-weight propagation: M_warm = FT(M_base, labeled)
    warm = stages["warmup"] = stage_train(run, "warmup", engine, labeled, tcfg, reporter)
    # 6 (baselines). vanilla and SFT on the test split
    stages["eval/vanilla"] = stage_eval(run, "eval/vanilla", engine, test, task["test"], None, mode, ecfg, prior,
                                        reporter)
    stages["eval/sft"] = stage_eval(run, "eval/sft", engine, test, task["test"], warm, mode, ecfg, prior, reporter)
    current_labeled, remaining, teacher = list(labeled), list(unlabeled), warm
    for r in range(1, cfg.rounds + 1):
        tag = f"round{r}"
        # 2. in-context propagation: k nearest labeled questions per unlabeled question
        ret = stages[f"{tag}/retrieval"] = stage_retrieval(run, f"{tag}/retrieval", engine, current_labeled,
                                                           remaining, cfg, reporter)
        # 3. collaborative learning: n learners, self-justification where they disagree; the teacher (M_warm,
        # then the evolved model) takes part only with in-weight propagation
        col = stages[f"{tag}/collaboration"] = stage_collaboration(
            run, f"{tag}/collaboration", engine, current_labeled, remaining, ret,
            teacher if cfg.iwp else None, mode, cfg, ecfg, reporter)
        # 4. adaptive selection: entropy at or below the theta-percentile
        sel = stages[f"{tag}/selection"] = stage_selection(run, f"{tag}/selection", col, cfg, reporter,
                                                                     closed=all(it.closed for it in remaining))
        chosen_items, chosen = read_selected(sel, remaining)
        # 5. final fine-tune: FT(M_base, labeled + selected), or continue M_warm on the selected
        if cfg.final_from_warm:
            final = stage_train(run, f"{tag}/final", engine, chosen_items, ftcfg, reporter, init_adapter=teacher)
        else:
            final = stage_train(run, f"{tag}/final", engine, current_labeled + chosen_items, ftcfg, reporter)
        stages[f"{tag}/final"] = final
        # 6. evaluation of the evolved model
        stages[f"{tag}/eval"] = stage_eval(run, f"{tag}/eval", engine, test, task["test"], final, mode, ecfg, prior,
                                           reporter)
        # 7. rounds: labeled + selected become the labeled set; the evolved model becomes the teacher
        current_labeled = current_labeled + chosen_items
        remaining = [it for it in remaining if it.index not in chosen]
        teacher = final
        if not remaining:
            break
    last = max(int(k.split("/")[0][5:]) for k in stages if k.startswith("round"))
    atomic_write_bytes(out / "pseudo_labels.jsonl",
                       stages[f"round{last}/selection"].path("pseudo_labels.jsonl").read_bytes())
    shutil.rmtree(out / TRUNK_STORE, ignore_errors=True)  # every fine-tune is done: a cache no more
    return stages

"""The stages of a SemiEvol run, each a plain function that writes its outputs into its own sealed folder of
the run folder (`runfolder`), so a second invocation resumes after the last complete stage and a changed
input re-runs only what depends on it: fine-tunes, retrieval, the warm model's probe for collapse,
collaboration, selection and evaluation. Their order is `pipeline`'s. Prompts are built from question +
options (+ labeled demonstrations) only; nothing here reads the unlabeled split's answers.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..core import collapse, config, retrieval, selection
from ..core.config import EngineConfig, RunConfig, TrainConfig
from ..core.data import Item
from ..core.files import Journal, atomic_write_json, atomic_write_text
from ..core.prompts import normalize_text
from ..core.runfolder import RunFolder, StageResult, digest, file_digest, items_digest, weights_identity
from ..engines.protocol import Counts, InferenceEngine
from .collaboration import collaborate_one, label_entropy, label_mass, learner_configs, self_consistency_one
from .evaluate import ask, evaluate
from .finetune import train_adapter

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
    inputs = {"model": weights_identity(engine.model_path, engine.weights_kind) if cfg.embedding == "model" else None,
              "labeled": items_digest(labeled, False), "unlabeled": items_digest(unlabeled, False),
              "options": config.identity("retrieval", cfg)}

    def build(work: Path):
        before = engine.counts()
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
    inputs = {"model": weights_identity(engine.model_path, engine.weights_kind), "labeled": items_digest(labeled, True),
              "unlabeled": items_digest(unlabeled, False), "retrieval": retrieved.outputs_digest,
              "warm": warm.outputs_digest if warm else None, "mode": mode,
              "options": config.identity("collaboration", canonical(cfg), ecfg)}

    def build(work: Path):
        neighbours = np.load(retrieved.path("neighbours.npy"))
        warm_path = warm.path("adapter.gguf") if warm else None
        journal = Journal(work / "collaboration.partial.jsonl", digest(inputs))  # a killed run's finished questions
        done = {r["position"]: r for r in journal.done}
        resumed = set(done)

        def one(eng, pos: int) -> dict:
            item, demos = unlabeled[pos], [labeled[i] for i in neighbours[pos]]
            if cfg.labeler == "self-consistency":
                return self_consistency_one(eng, item, demos, mode, cfg, warm_path)
            return collaborate_one(eng, item, demos, learners, mode, cfg, warm_path)

        before = engine.counts()
        with journal, reporter.progress(len(unlabeled), "collaborate", "questions") as advance:
            advance(len(done))
            # in order in process; over a fleet of llama-servers as they finish (a question's record does
            # not depend on which engine, lane or order computed it)
            for pos, rec in engine.each([p for p in range(len(unlabeled)) if p not in done], one):
                rec["position"] = pos
                journal.write(rec)
                done[pos] = rec
                advance(status="agree" if rec["consistent"] else "justified")
        recs = [done[p] for p in range(len(unlabeled))]
        atomic_write_text(work / "collaboration.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
        journal.remove()
        return {"questions": len(recs), "consistent": int(sum(r["consistent"] for r in recs)), **prompt_counts(recs),
                "asked": len(recs) - len(resumed), **_computed_since(engine, before)}

    return _stage(run, name, inputs, build, reporter)


def _computed_since(engine: InferenceEngine, before: Counts | None) -> dict:
    """A stage's figures for `bench run`: tokens evaluated (after prefix reuse), decode calls, tokens by
    adapter file ("": none), and by adapter and decode shape ("cached:size": tokens) since `before`."""
    now = engine.counts()
    if now is None or before is None:
        return {}
    shapes = {}
    for a, d in now.shapes.items():
        was = before.shapes.get(a, {})
        diff = {f"{p}:{n}": t - was.get((p, n), 0) for (p, n), t in sorted(d.items()) if t - was.get((p, n), 0)}
        if diff:
            shapes[a] = diff
    by = {a: sum(d.values()) for a, d in shapes.items()}
    return {"tokens_computed": sum(by.values()), "decodes": now.decodes - before.decodes, "tokens_by_adapter": by,
            "decode_shapes": shapes}


def prompt_counts(recs: list[dict]) -> dict:
    """How many questions had a prompt shortened (demonstrations dropped, question cut) or a justification
    asked without its candidates (they did not fit the context)."""
    asks = [[*r["learners"], *([r["justification"]] if r.get("justification") else [])] for r in recs]
    return {"demos_dropped": sum(any(a.get("demos_dropped") for a in q) for q in asks),
            "question_truncated": sum(any(a.get("question_truncated") for a in q) for q in asks),
            "justify_fallback": sum(bool((r.get("justification") or {}).get("justify_fallback")) for r in recs)}


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
    inputs = {"model": weights_identity(engine.model_path, engine.weights_kind), "test": items_digest(test, True),
              "adapter": adapter.outputs_digest if adapter else None, "mode": mode, "prior": digest(prior),
              "options": config.identity("eval", ecfg)}

    def build(work: Path):
        engine.set_adapter(adapter.path("adapter.gguf") if adapter else None)
        before = engine.counts()
        split = dataclasses.replace(test_split, items=test)
        with reporter.progress(len(test), name.split("/")[-1]) as advance:
            res = evaluate(engine, split, mode=mode, prior=prior,
                           on_item=lambda p: advance(status="ok" if p.correct else "miss"))
        atomic_write_json(work / "eval.json", res.as_dict())
        return {"accuracy": res.accuracy, "items_per_s": res.items_per_s, "asked": len(test),
                **_computed_since(engine, before)}

    return _stage(run, name, inputs, build, reporter)


PROBE_QUESTIONS = 100  # unlabeled questions the warm model answers for the collapse check (spread over the split)


def probe_positions(n_unlabeled: int) -> list[int]:
    """The unlabeled questions the collapse check asks: PROBE_QUESTIONS evenly spaced (all of them, if fewer)."""
    k = min(PROBE_QUESTIONS, n_unlabeled)
    return sorted({int(i) for i in np.linspace(0, n_unlabeled - 1, k)}) if k else []


def stage_probe(run: RunFolder, name: str, engine: InferenceEngine, labeled: list[Item], unlabeled: list[Item],
                warm: StageResult, ecfg: EngineConfig, reporter) -> StageResult:
    """The collapse check (`core.collapse`): M_warm, without demonstrations, answers up to PROBE_QUESTIONS
    unlabeled questions spread evenly over the split (score mode); its answers' distribution is compared with
    the labeled split's. Uses the questions only, never the unlabeled answers."""
    picked = probe_positions(len(unlabeled))
    inputs = {"model": weights_identity(engine.model_path, engine.weights_kind), "labeled": digest([it.answer for it in labeled]),
              "unlabeled": items_digest([unlabeled[i] for i in picked], False), "warm": warm.outputs_digest,
              "rule": [collapse.SHARE, collapse.LABELED_MAX], "options": config.identity("eval", ecfg)}

    def build(work: Path):
        adapter = warm.path("adapter.gguf")
        before = engine.counts()

        def one(eng, pos: int) -> str:
            eng.set_adapter(adapter)
            return ask(eng, unlabeled[pos], mode="score")["answer"]

        answers: dict[int, str] = {}
        with reporter.progress(len(picked), "probe", "questions") as advance:
            for pos, letter in engine.each(picked, one):
                answers[pos] = letter
                advance()
        found = collapse.check([answers[p] for p in picked], [it.answer for it in labeled])
        atomic_write_json(work / "probe.json", {**found, "positions": picked})
        return {"collapsed": found["collapsed"], "top": found["top"], "top_share": found["top_share"],
                "labeled_top_share": found["labeled_top_share"], "asked": len(picked),
                **_computed_since(engine, before)}

    return _stage(run, name, inputs, build, reporter)


def _stage(run: RunFolder, name: str, inputs: dict, build, reporter) -> StageResult:
    return run.stage(name, inputs, build, announce=lambda reused: reporter.stage(name, reused))

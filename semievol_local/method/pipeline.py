"""SemiEvol, as a recipe: warm-up, evaluation, the collapse check, then per round retrieval, collaboration,
selection, final fine-tune and evaluation. Each step is a stage of `stages`, sealed in the run folder, so a
run resumes where it stopped. Prompts are built from question + options (+ labeled demonstrations) only;
the unlabeled split is loaded without its answers and nothing here reads them (`report` does, for
reporting alone).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from ..core import config
from ..core.config import EngineConfig, RunConfig, TrainConfig
from ..core.data import Item, Task, limited, load_task
from ..core.errors import CannotHelp
from ..core.files import atomic_write_bytes, atomic_write_json
from ..core.runfolder import RunFolder, StageResult, exclusive
from ..engines import load
from .evaluate import resolve_mode
from .finetune import family_defaults
from .stages import (TRUNK_STORE, stage_collaboration, stage_eval, stage_probe, stage_retrieval, stage_selection,
                     stage_train)

log = logging.getLogger(__name__)


class Quiet:
    """The do-nothing reporter: the pipeline calls it; `ui` supplies one that draws."""

    def stage(self, name: str, reused: bool) -> None: ...

    def progress(self, total: int, description: str, unit: str = "items"):
        import contextlib

        return contextlib.nullcontext(lambda n=1, status="": None)

    def train_step(self, info: dict) -> None: ...

    def train_trunk(self, done: int, total: int) -> None: ...


# --- the recipe ---------------------------------------------------------------------------------

def collapse_message(found: dict) -> str:
    """The one line a collapsed warm-up ends the run with: what was seen, and what to try."""
    return (f"the warm-up model answered {found['top']} on {found['top_share']:.0%} of {found['n']} unlabeled "
            f"questions, while the labeled split's largest class is {found['labeled_top_share']:.0%}: it has learned "
            "the label prior, not the task, and pseudo-labeling would teach that answer everywhere. Try another "
            "--train-seed, more --epochs, another --lr, more labeled rows or a larger model; --force goes on anyway "
            "(the finished stages are kept)")


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
    labeled, unlabeled, test = limited(task, cfg)
    mode = resolve_mode(None if cfg.mode == "auto" else cfg.mode, labeled + unlabeled + test)
    engine = load(model_path, ecfg)
    tcfg = family_defaults(tcfg, engine.architecture)  # --lr left to the family: the value that trains, recorded
    if labeled:  # a machine that cannot hold the warm-up hears it now, before any stage runs or anything is written
        from ..training.mlx_engine import memory_check
        from .finetune import examples

        memory_check(model_path, examples(engine, labeled), tcfg)
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
    # the collapse check: has M_warm learned the task, or only the label prior? (questions only, no answers)
    if cfg.iwp and unlabeled and all(it.closed for it in labeled + unlabeled):
        probe = stages["probe"] = stage_probe(run, "probe", engine, labeled, unlabeled, warm, ecfg, reporter)
        found = json.loads(probe.path("probe.json").read_text())
        if found["collapsed"] and not cfg.force:
            raise CannotHelp(collapse_message(found))
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

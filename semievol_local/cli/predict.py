"""`semievol eval`, `predict` and `export`: a model (and adapter) answering questions, and a run's results
taken elsewhere."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..core.config import EngineConfig
from ..core.errors import UserError
from . import ui
from .common import (
    adapter_option, app, command, data_option, json_option, max_tokens_option, mode_option, model_option,
    options_from, out_option)


# --- eval -----------------------------------------------------------------------------------------

@command(app, "eval")
@options_from(EngineConfig)
def eval_cmd(
    model: str = model_option(),
    data: Path = data_option(..., help="Task folder or split file (CSV/JSONL)."),
    adapter: Optional[Path] = adapter_option(),
    split: str = typer.Option("test", "--split", help="Which split of a task folder."),
    mode: str = mode_option(),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N rows."),
    category_column: Optional[str] = typer.Option(None, "--category-column", help="Metadata column for the per-category table (auto-detected)."),
    max_tokens: int = max_tokens_option(),
    json_out: Optional[Path] = json_option("accuracy and every prediction"),
    *, engine_config: EngineConfig,
):
    """Accuracy of a model (and adapter) on a split, beside the majority class."""
    run_eval(model, data, adapter, split, mode, limit, category_column, max_tokens, json_out, engine_config)


def run_eval(model, data, adapter, split, mode, limit, category_column, max_tokens, json_out, engine_config):
    from ..core import data as data_mod
    from ..core.files import atomic_write_json
    from .. import engines
    from ..method import evaluate, export, models

    adapter = export.adapter_path(adapter) if adapter is not None else None
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
    data: Path = data_option(..., help="Rows to label (CSV/JSONL with question, and options where "
                              "there are any; answers not needed), or a task folder (see --split)."),
    out: Path = out_option(..., help="Where to write the rows with their predictions (.csv or .jsonl)."),
    adapter: Optional[Path] = adapter_option(),
    split: str = typer.Option("unlabeled", "--split", help="Which split of a task folder."),
    mode: str = mode_option(),
    max_tokens: int = max_tokens_option(),
    *, engine_config: EngineConfig,
):
    """Label new rows: each row with its predicted answer, its distribution (score mode) or text (sample mode) and
    its entropy, in input order. An interrupted run resumes when the same command runs again."""
    from ..core import config as cfg_mod, data as data_mod
    from ..core.runfolder import file_digest, weights_identity
    from .. import engines
    from ..method import export, models, predict
    from ..method.evaluate import resolve_mode

    path = data_mod.find_split_file(data, split)
    rows = data_mod.load_split(path, path.stem if data.is_file() else split, with_answers=False)
    raw = [r for _, r in data_mod.read_rows(path)]  # the rows as they are, written back with their predictions
    predict.check_out(out, rows, list(dict.fromkeys(k for r in raw for k in r)))
    adapter_file = export.adapter_path(adapter) if adapter is not None else None
    mode = resolve_mode(None if mode == "auto" else mode, rows.items)
    model_path = models.resolve(model)
    engine = engines.load(model_path, engine_config)  # in process, or the llama-servers of --server
    identity = {"model": weights_identity(engine.model_path, engine.weights_kind), "adapter": file_digest(adapter_file) if adapter_file else None,
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
    run: Path = typer.Argument(..., help="A finished run folder (`semievol run --out`), or with --merged a "
                               "`semievol train` folder."),
    out: Path = out_option(..., help="A new folder for the exported files."),
    data: Optional[Path] = data_option(None, help="The run's task folder, where run.json's path "
                                        "does not reach it (a run started from another folder); for a train folder, "
                                        "the split (or task folder: its test split) to check the merged file on."),
    peft: bool = typer.Option(False, "--peft", help="Also write peft/: the adapter for the Hugging Face base model "
                              "(transformers + PEFT, vLLM), Q/K rows in Hugging Face order."),
    merged: bool = typer.Option(False, "--merged", help="Also write model.gguf: the base with the adapter merged in, "
                                "in the base's own types (the adapted tensors at least Q8_0: 4-bit ones missed "
                                "base + adapter), one file any GGUF front end loads (Ollama, LM Studio, "
                                "llama-server); checked against base + adapter; the Modelfile then uses it."),
    outtype: Optional[str] = typer.Option(None, "--outtype", help="With --merged: the merged file's type (f32, f16, "
                                          "q8_0, q4_k_m, ... as llama.cpp names them), or base: every tensor in "
                                          "the base's type."),
):
    """Export a run: train.csv/.jsonl (labeled + selected pseudo-labels), chat.jsonl for mlx-lm, the adapter and
    an Ollama Modelfile; with --merged, one GGUF with the adapter merged in."""
    from ..core import data as data_mod
    from .. import engines
    from ..method import export, merge

    export.check_out(out)  # a bad --out or --outtype before anything loads
    merge.check_outtype(outtype)
    trained = (run / "adapter_config.json").is_file() and not (run / "run.json").exists()
    if trained:
        if not merged:
            raise UserError(f"{run}: a `semievol train` folder; export --merged writes its merged model (the other "
                            "files need a `semievol run` folder)")
        if data is None:
            raise UserError(f"{run}: give --data, the split (or task folder) to check the merged file on")
        path = data if data.is_file() else data_mod.find_split_file(data, "test")
        items = data_mod.load_split(path, path.stem).items
    model = export.base_model(run)
    if not trained:
        export.final_adapter(run)  # a run without one fails here, before the model loads
    engine = engines.load(model)
    if trained:
        summary = export.export_trained(run, out, engine, items, outtype=outtype, say=ui.info, progress=ui.progress)
        names = ["model.gguf", "merge.json", "Modelfile"]
    else:
        summary = export.export_run(run, out, engine, data=data, peft=peft, merged=merged, outtype=outtype,
                                    say=ui.info, progress=ui.progress)
        names = ["train.csv", "train.jsonl", "chat.jsonl", "mlx-lm/train.jsonl", "adapter.gguf", "Modelfile",
                 *(["model.gguf", "merge.json"] if merged else []),
                 *(["peft/adapter_model.safetensors", "peft/adapter_config.json"] if peft else [])]
    ui.kv_table(f"exported {run}", {k: v for k, v in summary.items() if k != "out"})
    for name in names:
        ui.info(str(out / name))

"""`semievol train` and `semievol adapter check`: LoRA with MLX on a GGUF's own weights, and MLX against
llama.cpp with the adapter it wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..core.config import EngineConfig, TrainConfig
from ..core.errors import UserError
from . import ui
from .common import (
    SERVER_FIELDS, adapter_app, app, command, data_option, json_option, model_option, options_from, out_option)


# --- train / adapter check / bench -------------------------------------------------------------

@command(app, "train")
@options_from(TrainConfig, EngineConfig, skip=SERVER_FIELDS)  # MLX and llama.cpp in this process
def train_cmd(
    model: str = model_option(),
    data: Path = data_option(..., help="Task folder or split file (CSV/JSONL)."),
    out: Path = out_option(..., help="Run folder for adapter.gguf, adapters.safetensors, logs, checkpoints."),
    split: str = typer.Option("labeled", "--split", help="Which split of a task folder to train on."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    *, train_config: TrainConfig, engine_config: EngineConfig,
):
    """LoRA-train a GGUF model with MLX; writes a GGUF LoRA adapter that llama.cpp loads as it is."""
    import time

    from ..core import data as data_mod
    from .. import engines
    from ..core.runfolder import check_folder, exclusive
    from ..method import finetune, models

    if not resume and (check_folder(out) / "adapter_config.json").exists():
        raise UserError(f"{out}: already holds a trained adapter; pass --resume to continue it or choose another --out")

    items = data_mod.load_split(data_mod.find_split_file(data, split), split).items
    engine = engines.load(models.resolve(model), engine_config)
    train_config = finetune.family_defaults(train_config, engine.architecture)
    if not finetune.lead_process():  # started by `mlx.launch`, not rank 0: compute its share, write and draw nothing
        finetune.train_adapter(engine, items, train_config, out, resume=resume)
        return
    reporter = ui.Reporter()
    t0 = time.perf_counter()
    with exclusive(out):  # one writer per folder
        summary = finetune.train_adapter(engine, items, train_config, out, resume=resume,
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
    data: Optional[Path] = data_option(None, help="Questions to compare on (default: the demo task)."),
    n: int = typer.Option(8, "--n", min=1, help="How many questions."),
    json_out: Optional[Path] = json_option("kl_mean and top1_agreement"),
):
    """MLX (mlx-lm adapter) vs llama.cpp (adapter.gguf) on the same prompts: mean KL and top-1 agreement."""
    from ..core import data as data_mod
    from ..core.files import atomic_write_json
    from .. import engines
    from ..method import finetune, models
    from ..method.demo_task import demo_folder

    if adapter.is_file():
        adapter = adapter.parent
    for f in ("adapter.gguf", "adapters.safetensors", "adapter_config.json"):
        if not (adapter / f).exists():
            raise UserError(f"{adapter}: no {f}; give the folder `semievol train --out` wrote")
    split = data_mod.load_split(data_mod.find_split_file(data or demo_folder(), "test"), "test")
    engine = engines.load(models.resolve(model))
    seqs = [p + a for p, a in finetune.examples(engine, split.items[:n])]
    try:
        result = finetune.check_adapter(engine, adapter, seqs)
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

"""`semievol bench ...`: benchmarks that print figures, and publishing them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..core import config
from ..core.config import EngineConfig, RunConfig, TrainConfig
from ..core.errors import UserError
from ..method.models import DEFAULT_MODEL
from . import ui
from .common import (
    SERVER_FIELDS, bench_app, command, data_option, invocation, json_option, model_option, option_of,
    options_from, out_option)


@command(bench_app, "train")
def bench_train_cmd(
    model: str = model_option("Model to train."),
    steps: int = typer.Option(8, "--steps", min=1, help="Timed optimizer steps."),
    batch_size: int = option_of(TrainConfig, "batch_size", default=4),
    seq_len: int = typer.Option(128, "--seq-len", min=8),
    num_layers: int = option_of(TrainConfig, "num_layers", default=-1, help=" Here -1 by default: the shape "
                                "docs/models.md compares with PyTorch + PEFT."),
    answer_len: int = typer.Option(0, "--answer-len", min=0, help="Loss on the last N tokens of each sequence "
                                   "(0: all; SFT on a short answer is a few)."),
    peft_python: Optional[str] = typer.Option(None, "--peft-python", help="Also time PyTorch + PEFT on the same "
                                              "shape, right after, with this Python (an environment with torch, "
                                              "transformers and peft; never needed by semievol itself)."),
    split: bool = typer.Option(False, "--split", help="Also time one trained block whole and by part (frozen "
                               "products, alone and joined; LoRA products; attention; the rest) at this shape."),
    json_out: Optional[Path] = json_option("tokens_per_s, gemm_gflops, roofline_fraction"),
):
    """Training tokens/s beside the float32 GEMM roofline measured in the same run, counting the FLOPs this shape
    needs (frozen blocks once, trained blocks 4x, the vocabulary projection at the loss only), and PyTorch + PEFT's."""
    from ..bench import runners, train
    from ..method import models

    config.check(TrainConfig(batch_size=batch_size, num_layers=num_layers))  # as training checks them
    path = models.resolve(model)
    if answer_len > seq_len:
        raise UserError(f"--answer-len {answer_len} is longer than --seq-len {seq_len}: give at most {seq_len}")
    shape = dict(batch_size=batch_size, seq_len=seq_len, num_layers=num_layers, answer_len=answer_len or None)
    if peft_python:
        result = runners.train_vs_peft(path, peft_python, steps=steps, **shape)
    else:
        result = train.bench_train(path, steps, **shape)
        result.pop("shape")
    if split:
        from ..bench import step_profile

        result["block_split"] = step_profile.split(path, batch_size=batch_size, seq_len=seq_len, rank=result["rank"])
    _publish(result, json_out, ui.train_bench)


@command(bench_app, "model")
def bench_model_cmd(
    out: Path = out_option(..., help="The GGUF file to write (must not exist)."),
    shape: str = typer.Option("llama-1b", "--shape", help="The shape: llama-1b (Llama 3.2 1B: 16 blocks, width 2048, "
                              "FFN 8192, 32/8 heads, llama3 rope scaling; the tokenizer's own vocabulary), llama-3b "
                              "(Llama 3.2 3B: 28 blocks, width 3072, FFN 8192, 24/8 heads, 128256 tokens, tied) or "
                              "llama-8b (Llama 3.1 8B: 32 blocks, width 4096, FFN 14336, 32/8 heads, 128256 tokens)."),
    qtype: str = typer.Option("Q4_K_M", "--type", help="Quantization, by llama.cpp's own quantizer: F16, Q8_0, Q4_0, "
                              "Q4_1, Q4_K_M, Q5_K_M or Q6_K."),
    tokenizer_from: str = typer.Option(DEFAULT_MODEL, "--tokenizer-from", help="The model whose tokenizer and chat "
                                       "template the file gets (alias or .gguf path)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
):
    """Write a random-weight model of a released shape, to measure speed and memory at the sizes users bring
    (its answers mean nothing; while it is made it takes 2 bytes of disk per weight: 16 GB for the 8B shape)."""
    from ..bench import synthetic
    from ..method import models

    path = synthetic.write_random_model(out, shape, models.resolve(tokenizer_from), qtype, seed)
    ui.info(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")


def _publish(result: dict, json_out: Path | None, show=ui.bench_tables) -> None:
    """A benchmark's figures: drawn on the terminal, and written to `--json` when given."""
    from ..core.files import atomic_write_json

    show(result)
    if json_out:
        atomic_write_json(json_out, result)


@command(bench_app, "quality")
@options_from(RunConfig, TrainConfig, EngineConfig)
def bench_quality_cmd(
    ctx: typer.Context,
    model: str = model_option(),
    data: list[Path] = data_option(..., help="Task folder; repeat for more tasks (ablations, "
                                    "sensitivity, rounds and baselines use the first)."),
    out: Path = out_option(Path("runs/bench"), help="Folder for the runs (one per task and variant)."),
    suite: list[str] = typer.Option(list(("main", "ablation", "sensitivity", "rounds")), "--suite",
                                    help="Tables to build: main, ablation, sensitivity, rounds, baselines, headline "
                                    "(SemiEvol, the self-consistency vote and w/o ICP: the table --seeds is for); "
                                    "repeat the flag; the default is the first four."),
    reuse: list[Path] = typer.Option([], "--reuse", help="Finished run folders whose identical stages may be copied "
                                     "(e.g. an earlier `semievol run` on the same task)."),
    json_out: Optional[Path] = json_option("the tables, machine and command"),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Run the whole comparison with this many training seeds "
                              "(--train-seed, +1, ...; the further ones under OUT/seed<s>/) and add a table of each "
                              "method's mean and spread with a paired test pooled over the seeds."),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """The paper's tables at laptop scale: main, ablations, sensitivity to n and theta, rounds; and baselines:
    self-consistency (LMSI-style), a fixed entropy threshold, labeled + all pseudo-labels."""
    from ..bench import runners
    from ..method import models

    for p in reuse:
        if not (p / "run.json").exists():
            raise UserError(f"--reuse {p}: not a run folder (no run.json)")
    result = runners.quality(models.resolve(model), data, out, suite, run_config, train_config, engine_config,
                           reporter=ui.Reporter(), share_extra=tuple(reuse), command=invocation(ctx),
                           on_run=lambda folder: ui.info(f"run: {folder}"), seeds=seeds)
    _publish(result, json_out)


@command(bench_app, "run")
@options_from(RunConfig, TrainConfig, EngineConfig)
def bench_run_cmd(
    ctx: typer.Context,
    model: str = model_option(),
    data: Path = data_option(..., help="Task folder (labeled, unlabeled, test)."),
    out: Path = out_option(Path("runs/bench-run"), help="A new folder for the run."),
    json_out: Optional[Path] = json_option("the per-stage table, machine and command"),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """The whole `semievol run`, timed: per stage seconds, tokens, tokens/s, the FLOPs its work needed, the
    fraction of this machine's float32 GEMM speed (measured before each stage) they reached, peak RSS."""
    from ..bench import whole_run
    from ..method import models

    result = whole_run.whole_run(models.resolve(model), data, out, run_config, train_config, engine_config,
                                 reporter=ui.Reporter(), command=invocation(ctx))
    _publish(result, json_out)


@command(bench_app, "pseudo-label")
@options_from(RunConfig, TrainConfig, EngineConfig, skip=SERVER_FIELDS)  # in process
def bench_pseudo_label_cmd(
    ctx: typer.Context,
    model: str = model_option(),
    data: Path = data_option(..., help="Task folder with labeled and unlabeled splits (with options)."),
    n_items: int = typer.Option(20, "--n-items", "-n", help="Unlabeled questions to pseudo-label with each recipe."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Warm-up adapter.gguf (default: train one on the "
                                           "labeled split into --out)."),
    sample_tokens: int = typer.Option(1024, "--sample-tokens", min=1, help="Longest response of the paper's recipe."),
    out: Path = out_option(Path("runs/bench-pseudo-label"), help="Folder for the warm-up, "
                             "retrieval and each recipe's pseudo-labels."),
    json_out: Optional[Path] = json_option("questions/s, accuracy and the ratio"),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """Pseudo-labeling speed: the paper's sampling recipe vs score mode on the same questions."""
    from ..bench import runners
    from ..method import models

    result = runners.pseudo_label(models.resolve(model), data, n_items, out, run_config, train_config, engine_config,
                                reporter=ui.Reporter(), adapter=adapter, sample_tokens=sample_tokens,
                                command=invocation(ctx))
    _publish(result, json_out)


@command(bench_app, "servers")
@options_from(RunConfig, TrainConfig, EngineConfig, skip=("server", "api_key_file"))  # its own servers, its own key
def bench_servers_cmd(
    ctx: typer.Context,
    model: str = model_option(),
    data: Path = data_option(..., help="Task folder with labeled and unlabeled splits (with options)."),
    n_items: int = typer.Option(100, "--n-items", "-n", help="Unlabeled questions to pseudo-label each way."),
    n_servers: int = typer.Option(2, "--servers", min=2, help="Local llama-servers of the fleet rows (1 thread each)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Warm-up adapter.gguf (default: train one on the "
                                           "labeled split into --out)."),
    out: Path = out_option(Path("runs/bench-servers"), help="Folder for the warm-up, retrieval and "
                             "the servers' logs."),
    json_out: Optional[Path] = json_option("the table"),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """Collaboration in process vs through 1 and N local llama-servers (and N with one killed): speed, same labels."""
    from ..bench import servers
    from ..method import models

    result = servers.servers(models.resolve(model), data, n_items, out, run_config, train_config, engine_config,
                             reporter=ui.Reporter(), adapter=adapter, n_servers=n_servers, command=invocation(ctx))
    _publish(result, json_out)


@command(bench_app, "sizes")
@options_from(RunConfig, TrainConfig, EngineConfig, skip=SERVER_FIELDS)  # in process
def bench_sizes_cmd(
    ctx: typer.Context,
    model: list[str] = typer.Option(..., "--model", "-m", help="A model to measure; repeat for more (alias or .gguf; "
                                    "`semievol bench model` writes one of Llama 3.2 1B's shape)."),
    data: Path = data_option(..., help="The task whose run `--plan` estimates (e.g. fpb)."),
    json_out: Optional[Path] = json_option("the table, machine and command"),
    *, run_config: RunConfig, train_config: TrainConfig, engine_config: EngineConfig,
):
    """Per model, each in a fresh process: training tokens/s and its honest GEMM fraction, prompt tokens/s with
    each weight choice and what auto picks, peak memory, and the run estimate for --data."""
    from ..bench import runners
    from ..method import models

    paths = [models.resolve(m) for m in model]
    result = runners.sizes(paths, data, run_config, train_config, engine_config, command=invocation(ctx),
                         on_model=lambda p: ui.info(f"measuring {p.name}"))
    _publish(result, json_out)


@command(bench_app, "publish")
def bench_publish_cmd(
    files: list[Path] = typer.Argument(..., metavar="RESULT.json", help="JSON files written by `semievol bench ... --json`."),
    readme: Path = typer.Option(Path("README.md"), "--readme", help="File whose results section gets the summary."),
    details: Path = typer.Option(Path("docs/performance.md"), "--details",
                                 help="File whose results section gets every table."),
):
    """Rewrite the Results sections of the README (summary) and docs/performance.md (every table) from measured
    benchmark JSON (never typed in by hand)."""
    import json

    from ..bench import results

    loaded = []
    for p in files:
        try:
            r = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"{p}: no such file; write it with `semievol bench quality|pseudo-label|run --json {p}`") from None
        except ValueError as e:
            raise UserError(f"{p}: not JSON ({e}); give a file written by `semievol bench ... --json`") from None
        if not isinstance(r, dict) or r.get("benchmark") not in results.PUBLISHED:
            raise UserError(f"{p}: not a published benchmark result (its 'benchmark' is none of "
                            f"{', '.join(results.PUBLISHED)})")
        loaded.append((p.as_posix(), r))
    results.publish(readme, details, loaded)
    ui.info(f"{readme}, {details}: results sections rewritten from {len(loaded)} file(s)")

"""`semievol serve`: local llama-servers for `--server`, with an API key."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..core import config
from ..core.config import EngineConfig
from ..core.errors import UserError
from . import ui
from .common import app, command, model_option, option_of


@command(app, "serve")
def serve_cmd(
    model: str = model_option(),
    adapter: list[Path] = typer.Option([], "--adapter", "-a", help="A GGUF LoRA adapter to load (repeatable), or "
                                       "a `semievol train` folder."),
    run: Optional[Path] = typer.Option(None, "--run", help="A run folder: load the adapter of every finished stage, "
                                       "and restart the servers with each new one the run trains."),
    servers: int = typer.Option(1, "--servers", min=1, help="How many llama-server processes to start."),
    port: int = typer.Option(0, "--port", "-p", min=0, max=65535, help="Port of the first server (the next "
                             "ones count up); 0: free ports."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 for other machines."),
    threads: int = typer.Option(0, "--n-threads", "-t", min=0, help="CPU threads per server (0: the cores, shared "
                                "among the servers)."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Slots per server (questions it works on at once)."),
    n_ctx: int = option_of(EngineConfig, "n_ctx", help=" Here: per slot, at least the run's --n-ctx."),
    weights: str = option_of(EngineConfig, "weights", help=" Here: what the servers compute with, as the run's."),
    build_only: bool = typer.Option(False, "--build-only", help="Only get the llama-server binary (build it if "
                                    "needed), print its path and exit."),
    api_key_file: str = option_of(EngineConfig, "api_key_file", help=" If there is none, one is generated "
                                  "(mode 0600) where clients on this machine find it."),
    no_api_key: bool = typer.Option(False, "--no-api-key", help="Serve without a key (only on a loopback --host: "
                                    "anyone on this machine can then use the servers)."),
):
    """Start local llama-servers for `semievol run --server`: prints their URLs, serves until Ctrl-C.

    Every request but /health needs the API key (`Authorization: Bearer KEY`), which `--server` sends."""
    from .. import engines
    from ..core import apikey
    from ..engines import llama_server
    from ..engines.weights import default_threads, inference_weights
    from ..method import export, models

    config.check(EngineConfig(weights=weights, n_ctx=n_ctx, api_key_file=api_key_file))  # the run's own checks
    if no_api_key and not apikey.is_loopback(host):
        raise UserError(f"--host {host} --no-api-key: servers other machines can reach need a key; leave out "
                        "--no-api-key (a key is then found or generated) or listen on 127.0.0.1")
    exe = llama_server.binary(say=ui.info)
    if build_only:
        typer.echo(str(exe))
        return
    key, made = (None, False) if no_api_key else apikey.for_server(api_key_file)
    model_path = models.resolve(model)
    arch = engines.vocabulary(model_path).architecture
    # the weights a run with the same --weights computes with (llama-server has no GPU here: as on a CPU)
    served = inference_weights(model_path, EngineConfig(weights=weights, n_gpu_layers=0)).path
    fixed = [export.adapter_path(a) for a in adapter]
    if run is not None:
        if run.exists() and not run.is_dir():
            raise UserError(f"--run {run}: a file, not a folder; give the run's --out folder")
        run.mkdir(parents=True, exist_ok=True)  # the run may start after its servers: they watch the folder
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

"""`bench servers`: collaboration in this process against the same questions through llama-servers (one, several,
and several with one killed a third of the way), with questions/s and whether the pseudo-labels, entropies
and selections are the in-process ones. The servers are started here with a private API key, as
`semievol serve` keeps one.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from ..core import apikey
from ..core.config import EngineConfig, RunConfig, TrainConfig
from ..core.runfolder import RunFolder
from .. import engines
from ..engines import llama_server
from ..engines.weights import default_threads, inference_weights
from ..method import collaboration, pipeline
from .results import machine
from .runners import refuse_force, score_mode_questions


def servers(model_path: Path, data: Path, n_items: int, out: Path, cfg: RunConfig, tcfg: TrainConfig,
            ecfg: EngineConfig, reporter=None, adapter: Path | None = None, n_servers: int = 2,
            command: str = "") -> dict:
    """Collaboration (score mode) on the same N unlabeled questions, demonstrations and warm adapter: in this
    process with every core, through 1 llama-server and through `n_servers` (1 thread each), then again
    through them with one server killed a third of the way. Questions/s of each, and whether the
    pseudo-labels, entropies and selections are the in-process ones."""
    refuse_force(cfg)
    reporter = reporter or pipeline.Quiet()
    labeled, unlabeled = score_mode_questions(data, n_items, adapter, "this benchmark runs score mode")
    exe = llama_server.binary(say=lambda msg: reporter.stage(msg, False))
    engine = engines.load(model_path, ecfg)
    run = RunFolder(out)
    warm_path = Path(adapter) if adapter else \
        pipeline.stage_train(run, "warmup", engine, labeled, tcfg, reporter).path("adapter.gguf")
    ret = pipeline.stage_retrieval(run, "retrieval", engine, labeled, unlabeled, cfg, reporter)
    neighbours = np.load(ret.path("neighbours.npy"))
    learners = collaboration.learner_configs(cfg)

    def one(eng, pos):
        return collaboration.collaborate_one(eng, unlabeled[pos], [labeled[i] for i in neighbours[pos]], learners,
                                        "score", cfg, warm_path)

    def collaborate(eng, label: str, kill=None) -> tuple[dict, float]:
        recs, t0 = {}, time.perf_counter()
        with reporter.progress(len(unlabeled), label, "questions") as advance:
            for pos, rec in eng.each(range(len(unlabeled)), one):
                recs[pos] = rec
                advance()
                if kill is not None and len(recs) == len(unlabeled) // 3:
                    kill()
        return recs, time.perf_counter() - t0

    def selected(recs: dict) -> set:  # the pipeline's own selection rule
        return set(np.flatnonzero(pipeline.select_records([recs[p] for p in range(len(unlabeled))], cfg)[0]).tolist())

    result = {"benchmark": "servers", "machine": machine(), "command": command, "model": str(model_path),
              "task": str(data), "n_items": len(unlabeled), "learners": [ln.label() for ln in learners],
              "adapter": str(warm_path), "llama_server": str(exe), "rows": []}
    threads = ecfg.n_threads or default_threads()
    base, secs = collaborate(engine, f"in process ({threads} threads)")
    engines.unload()  # its threads and memory must not compete with the servers'
    want = selected(base)
    result["rows"].append({"engine": f"in process, {threads} threads", "seconds": secs,
                           "questions_per_s": len(base) / secs, "speedup": 1.0, "labels_equal": len(base),
                           "max_entropy_diff": 0.0, "selection_equal": True, "questions_lost": 0})
    served = inference_weights(model_path, ecfg).path  # what the in-process engine computed with
    logs = Path(out) / "servers"
    logs.mkdir(parents=True, exist_ok=True)
    private = tempfile.TemporaryDirectory(prefix="semievol-bench-")  # the servers' API key, as `serve` keeps one
    key_file = apikey.generate(Path(private.name) / "api-key").source
    for n, kill in ((1, False), (n_servers, False), (n_servers, True)):
        procs, urls = [], []
        try:
            for i in range(n):
                proc, url = llama_server.start(served, adapters=[warm_path], n_ctx=ecfg.n_ctx, threads=1,
                                               log_path=logs / f"server-{n}-{i}.log", key_file=Path(key_file))
                procs.append(proc)
                urls.append(url)
            fleet = engines.load(model_path, dataclasses.replace(ecfg, server=",".join(urls), api_key_file=key_file))
            name = f"{n} server{'s' if n > 1 else ''} x 1 thread" + (", 1 killed at 1/3" if kill else "")
            recs, secs = collaborate(fleet, name, kill=(lambda: procs[0].kill()) if kill else None)
            fleet.close()
        finally:
            for proc in procs:
                llama_server.stop(proc)
        same = sum(recs[p]["pseudo_label"] == base[p]["pseudo_label"] for p in base if p in recs)
        result["rows"].append({
            "engine": name, "seconds": secs, "questions_per_s": len(recs) / secs,
            "speedup": (len(recs) / secs) / result["rows"][0]["questions_per_s"], "labels_equal": same,
            "max_entropy_diff": max(abs(recs[p]["entropy"] - base[p]["entropy"]) for p in recs),
            "selection_equal": selected(recs) == want if len(recs) == len(base) else False,
            "questions_lost": len(base) - len(recs)})
    private.cleanup()
    result["goal"] = {"labels_identical": all(r["labels_equal"] == len(base) for r in result["rows"]),
                      "selection_identical": all(r["selection_equal"] for r in result["rows"]),
                      "no_question_lost": all(r["questions_lost"] == 0 for r in result["rows"])}
    return result

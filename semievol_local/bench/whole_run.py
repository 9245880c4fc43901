"""`bench run`: one whole `semievol run`, timed stage by stage, every stage rated against one yardstick,
this machine's float32 GEMM speed measured before each stage and after the last (outside the stages'
clocks), with the FLOPs each stage's work needed: llama.cpp's from the decode shapes it recorded, the
fine-tunes' as `train_flops` counts them. `run --plan`'s prediction is recorded beside every stage."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..core.config import EngineConfig, RunConfig, TrainConfig
from ..core.errors import UserError
from ..engines import load
from ..method import estimate, pipeline
from ..method.finetune import family_defaults
from ..method.report import build_report, stage_label
from .results import machine


REFERENCE_DECODE = 128  # tokens: llama.cpp's raw prompt rate (no adapter), measured once after `bench run`'s run
# why a stage's fraction of float32 GEMM passed 1 (a table cell: short)
ABOVE_1 = "above 1: quantized kernels do less float32 work than the count"
ABOVE_1_FLOAT = "above 1: the machine ran faster within the stage than at its two ends"


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What a forward pass's FLOPs depend on (read from a GGUF by `model_shape`)."""

    n_layer: int
    block_weights: int  # elements of every blk.* weight matrix, all blocks
    n_head: float  # query heads per block (the mean where a file gives one count per block)
    key_length: int  # per head
    value_length: int
    n_vocab: int
    n_embd: int


def model_shape(path: Path) -> ModelShape:
    """A GGUF's `ModelShape`, from its header and tensor table (the data is not read)."""
    from ..core import gguf_file

    reader = gguf_file.read(Path(path))
    f = reader.fields
    arch = f.get("general.architecture")
    n_layer, n_embd, heads = (f.get(f"{arch}.{k}") for k in ("block_count", "embedding_length",
                                                             "attention.head_count"))
    if not (n_layer and n_embd and heads):
        raise UserError(f"{path}: no block count, embedding length or head count for architecture {arch!r}; "
                        "the FLOPs of its forward pass cannot be counted")
    heads = float(np.mean(heads)) if isinstance(heads, list) else float(heads)
    key = int(f.get(f"{arch}.attention.key_length") or n_embd // heads)
    tensors = {t.name: t for t in reader.tensors}
    head = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if head is None:
        raise UserError(f"{path}: no output or token_embd tensor; the vocabulary projection cannot be counted")
    # matrices only: a norm or bias multiplies or adds once per element, no matmul
    blocks = sum(t.n_elements for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) >= 2)
    return ModelShape(int(n_layer), int(blocks), heads, key, int(f.get(f"{arch}.attention.value_length") or key),
                      int(head.shape[0]), int(n_embd))


def llama_flops(m: ModelShape, decode_shapes: dict[str, dict[str, int]], logits_rows: int) -> float:
    """The FLOPs of llama.cpp's forward passes (no I/O): for every evaluated token, 2 x the block weights and,
    in each layer, attention over the positions it sees (QK^T and AV: 2 x n_head x (key + value length) per
    position); and 2 x n_vocab x n_embd for each row of logits read (one per decode; embeddings read none).

    `decode_shapes`: {adapter: {"cached:size": tokens}}, a stage's figures: a decode of `size` tokens after
    `cached` ones attends to cached+1 ... cached+size positions, cached + (size+1)/2 per token on average.
    The figures' shapes are binned (`protocol.decode_shape`: cached to 128, size to 8 or 32), so the
    attention term is an estimate; the weights terms are exact. Not counted: LoRA adapters (rank 8, a few
    per mille of a block's weights), norms, activations, softmax; sliding-window layers (gemma3) are counted
    as attending to the whole cache, an overcount past the window. On quantized weights the count is the
    same: it is the work a float32 forward pass needs, which quantized kernels do partly in integers."""
    per_position = 2 * m.n_layer * m.n_head * (m.key_length + m.value_length)
    total = 0.0
    for shapes in decode_shapes.values():  # every adapter's tokens: the base weights' work
        for key, tokens in shapes.items():
            cached, size = (int(v) for v in key.split(":"))
            total += tokens * (2 * m.block_weights + per_position * (cached + (size + 1) / 2))
    return total + 2 * m.n_vocab * m.n_embd * logits_rows


def gemm_fractions(seconds: dict[str, float], flops: dict[str, float], gflops: dict[str, float]
                   ) -> tuple[dict[str, float | None], float | None]:
    """Each stage's fraction of float32 GEMM, FLOPs / (seconds x its GFLOPS x 1e9) (None for a stage with no
    FLOPs counted), and the whole run's: every stage's FLOPs over the sum of every stage's seconds x its
    GFLOPS. Stages without FLOPs (retrieval by TF-IDF, selection) are in that sum: the run spent their
    time too, and a faster pipeline would spend less. No I/O."""
    each = {n: flops[n] / (s * gflops[n] * 1e9) if flops.get(n) and s > 0 else None for n, s in seconds.items()}
    budget = sum(s * gflops[n] * 1e9 for n, s in seconds.items())
    return each, (sum(flops.get(n, 0.0) for n in seconds) / budget if budget > 0 else None)


def above_1(fractions: dict[str, float | None], llama_stages: set[str], quantized: bool) -> dict[str, str]:
    """The note for each stage whose fraction of float32 GEMM passed 1: llama.cpp on quantized weights does
    part of the counted work in integers; anywhere else the machine ran faster within the stage than at its
    two ends. No I/O."""
    return {n: ABOVE_1 if quantized and n in llama_stages else ABOVE_1_FLOAT
            for n, x in fractions.items() if x is not None and x > 1}


def _gemm() -> float:
    """float32 GEMM GFLOPS now (MLX), its buffers handed back: the next stage's peak memory is its own."""
    from ..training.blas import gemm_gflops

    g = gemm_gflops()
    import mlx.core as mx

    mx.clear_cache()
    return g


class _Yardstick:
    """A reporter that measures float32 GEMM just before each stage that runs (the stage hook is called
    before the stage's clock starts: `RunFolder.stage`), and passes everything on to the reporter it wraps."""

    def __init__(self, reporter, measure=_gemm):
        self.reporter, self.measure, self.before = reporter, measure, {}

    def stage(self, name: str, reused: bool) -> None:
        if not reused:
            self.before[name] = self.measure()
        self.reporter.stage(name, reused)

    def __getattr__(self, attr):
        return getattr(self.reporter, attr)


def _sig(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def whole_run(model_path: Path, data: Path, out: Path, cfg: RunConfig, tcfg: TrainConfig, ecfg: EngineConfig,
              reporter=None, command: str = "") -> dict:
    """One `semievol run`, then each stage beside one yardstick: this machine's float32 GEMM (MLX), measured
    in the same process just before every stage (outside its clock) and once after the run; each stage is
    rated at the mean of its own two ends (the cores drift, by a third within an hour on a shared machine).

    A stage's FLOPs are counted from the work it did: llama.cpp stages by `llama_flops` on the tokens,
    decode shapes and decodes it recorded; fine-tunes by `train_flops.train_flops` (recorded as `flops`).
    Its fraction = FLOPs / (seconds x GFLOPS x 1e9); the whole run's = all FLOPs / the sum of every stage's
    seconds x its GFLOPS, stages without FLOPs (retrieval by TF-IDF, selection) included (`gemm_fractions`).
    A fraction above 1 gets a note saying why (`above_1`): llama.cpp on a quantized file can pass 1.
    Informative, not a yardstick: llama.cpp's raw prompt rate (REFERENCE_DECODE random tokens, no adapter)
    after the run, as tokens/s and as a fraction of GEMM by the same count: the best llama.cpp's kernels do."""
    if ecfg.server:
        raise UserError("bench run measures llama.cpp in this process; leave out --server")
    if (Path(out) / "run.json").exists():
        raise UserError(f"--out {out}: already holds a run, whose finished stages would be reused and not timed; "
                        "give a new folder")
    where = machine()  # the commit that runs, not the one checked out when it ends
    engine = load(model_path, ecfg)  # the run's own engine (one per process): the float32 copy is made here
    shape = model_shape(model_path)
    planned = {r.stage: r.seconds for r in estimate.plan(model_path, data, cfg, tcfg, ecfg).at()}  # `run --plan`'s
    stick = _Yardstick(reporter or pipeline.Quiet())
    pipeline.run_semievol(model_path, data, out, cfg, tcfg, ecfg, stick)
    after = _gemm()
    engine.set_adapter(None)
    ref_rate = engine.prefill_rate(REFERENCE_DECODE, repeats=3)
    names = list(stick.before)  # in the order they ran; each stage's GFLOPS: the mean of its two ends
    around = {n: (stick.before[n] + (stick.before[names[i + 1]] if i + 1 < len(names) else after)) / 2
              for i, n in enumerate(names)}
    rep = build_report(out)
    gflops = {n: around.get(n, after) for n in rep["stages"]}
    seconds = {n: st["seconds"] for n, st in rep["stages"].items()}
    flops, tokens = {}, {}
    for name, st in rep["stages"].items():
        f = st["figures"]
        if f.get("decode_shapes"):
            # embeddings (model retrieval) read hidden states, no logits; every other decode reads one row
            read = 0 if name.split("/")[-1] == "retrieval" else f.get("decodes", 0)
            flops[name], tokens[name] = llama_flops(shape, f["decode_shapes"], read), f["tokens_computed"]
        elif f.get("flops"):
            flops[name] = float(f["flops"])
            tokens[name] = sum(r.get("tokens", 0) for r in _train_log(Path(out) / name)) or None
    fraction, whole = gemm_fractions(seconds, flops, gflops)
    quantized = engine.weights_kind != "f32" and not _float_file(model_path)
    rows = []
    for name, st in rep["stages"].items():
        sec, n = st["seconds"], tokens.get(name)
        rows.append({"stage": stage_label(name, st), "seconds": round(sec, 1), "tokens": n,
                     "tokens_per_s": round(n / sec, 1) if n and sec else None,
                     "tflop": _sig(flops[name] / 1e12) if name in flops else None,
                     "limit": f"GEMM {gflops[name]:.0f} GFLOPS", "fraction": _sig(fraction[name]),
                     "peak_rss_mb": round(st["peak_rss_mb"]),
                     "predicted_s": round(planned[name], 1) if planned.get(name) is not None else None})
    notes = above_1(fraction, {n for n, st in rep["stages"].items() if "decode_shapes" in st["figures"]}, quantized)
    if notes:  # a column of its own only where some fraction needs one
        for r, name in zip(rows, rep["stages"]):
            r["note"] = notes.get(name)
    total = sum(seconds.values())
    peak = max((st["peak_rss_mb"] for st in rep["stages"].values()), default=None)
    st = last_pseudo(rep)
    ref_flops = llama_flops(shape, {"": {f"0:{REFERENCE_DECODE}": REFERENCE_DECODE}}, 1) / REFERENCE_DECODE
    every = [*stick.before.values(), after]
    return {"benchmark": "run", "machine": where, "command": command, "model": str(model_path), "task": str(data),
            "weights": engine.weights_kind, "run": dataclasses.asdict(cfg),
            "train": dataclasses.asdict(family_defaults(tcfg, engine.architecture)),  # the lr that trained
            "gemm_gflops": sum(every) / len(every),  # the run's mean, for a reader; no stage is rated at it
            "yardstick": {"what": "float32 GEMM GFLOPS (MLX, (512 x 2048) @ (2048 x 2048), best of 5)",
                          "before_stage": stick.before, "after": after},
            "llama_reference": {"tokens": REFERENCE_DECODE, "tokens_per_s": ref_rate,
                                "fraction": ref_rate * ref_flops / (after * 1e9)},
            "tables": {"main": [{"task": Path(data).name, **rep["accuracy"],
                                 "p_vs_sft": (rep.get("semievol_vs_sft_paired") or {}).get("p_value"),
                                 "pseudo_label_accuracy_selected": st.get("accuracy_selected"),
                                 "selected": st.get("selected")}],
                       "stages": rows},
            "whole_run": {"task": Path(data).name, "seconds": round(total, 1), "peak_rss_mb": peak,
                          "untimed_attempts": any(s.get("untimed_attempts") for s in rep["stages"].values()),
                          "tflop": _sig(sum(flops.values()) / 1e12), "fraction": _sig(whole),
                          "predicted_seconds": (round(sum(planned.values()), 1)
                                                if all(v is not None for v in planned.values()) else None),
                          "goal": {"minutes_at_most_30": total <= 1800, "peak_at_most_3_gb": bool(peak and peak <= 3000)}}}


def _float_file(path: Path) -> bool:
    """Whether a GGUF's block weights are all float (F32, F16, BF16): llama.cpp then computes in float."""
    from ..core import gguf_file

    kinds = {t.tensor_type.name for t in gguf_file.read(Path(path)).tensors if t.name.startswith("blk.")}
    return kinds <= {"F32", "F16", "BF16"}


def _train_log(stage: Path) -> list[dict]:
    path = stage / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def last_pseudo(rep: dict) -> dict:
    stats = rep.get("pseudo_labels") or {}
    return stats[max(stats, key=lambda name: int(name[5:]))] if stats else {}


def last_eval(run: Path) -> dict:
    """The test evaluation of a run's last round (every prediction, for a question-by-question comparison)."""
    last = max(int(p.parent.parent.name[5:]) for p in Path(run).glob("round*/eval/eval.json"))
    return json.loads((Path(run) / f"round{last}" / "eval" / "eval.json").read_text())

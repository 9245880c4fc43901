"""Configuration, declared once: each option is a dataclass field with its default, help text, valid range
and the stages whose outputs it can change.

The CLI builds its options from these fields (see `cli.options_from`), so a flag cannot drift from the
value that reaches the code. Library functions take these objects; they never read flags themselves.

- `check(cfg)` validates every option against its declaration (range, choices) before any model loads.
- `identity(stage, *cfgs)` is what of the options a stage's outputs depend on: the run folder reuses a
  stage when these (and its data inputs) are equal, so every option that can change a stage's outputs is
  declared with that stage in `stages`, and an option that cannot (threads, checkpoint cadence) names none.
"""
from __future__ import annotations

import ipaddress
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The pipeline's kinds of stage (the run folder's `warmup` and `roundN/final` are both `train`).
STAGES = ("train", "retrieval", "collaboration", "selection", "eval")
WEIGHTS = ("auto", "f32", "file")  # what llama.cpp computes with (EngineConfig.weights)


def opt(default, help: str, *, stages: tuple[str, ...] = (), min=None, max=None, gt=None, lt=None,
        choices: tuple | None = None, **extra):
    """A dataclass field that is also a CLI option (`help` becomes the flag's help text).

    `stages`: the kinds of stage whose outputs this option can change (its identity); `min`/`max` (inclusive),
    `gt`/`lt` (exclusive) and `choices`: what `check` accepts."""
    bad = set(stages) - set(STAGES)
    assert not bad, bad
    meta = {"help": help, "stages": tuple(stages), "min": min, "max": max, "gt": gt, "lt": lt, "choices": choices,
            **extra}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(f, toggle: bool = False) -> str:
    """A field's command-line flag: its own (`flag=` in its metadata) or `--field-name`. With `toggle` a
    boolean keeps its `/--no-...` half (what the CLI declares); without, the name alone (what messages show)."""
    full = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return full if toggle else full.split("/")[0]


# --- values parsed here, where their options are declared (the modules that use them import them from here) ---

def parse_urls(text: str) -> list[str]:
    """`--server`: comma-separated URLs, or a file with one URL per line (# comments)."""
    text = text.strip()
    if not text:
        return []
    if "://" not in text and "," not in text and Path(text).is_file():
        lines = [ln.split("#")[0].strip() for ln in Path(text).read_text(encoding="utf-8").splitlines()]
        urls = [u for u in lines if u]
        if not urls:
            raise UserError(f"--server {text}: the file lists no URLs; write one per line, e.g. http://10.0.0.2:8080")
    else:
        urls = [u.strip() for u in text.split(",") if u.strip()]
    for u in urls:
        parts = urlsplit(u if "://" in u else "http://" + u)
        if parts.scheme == "https":
            raise UserError(f"--server {u}: the llama-server this toolkit builds has no TLS; reach a server on another "
                            "machine through an ssh tunnel (ssh -N -L 8080:127.0.0.1:8080 HOST, then --server "
                            "http://127.0.0.1:8080; docs/scale-out.md in the project)")
        if parts.scheme != "http" or not parts.hostname:
            raise UserError(f"--server {u!r}: give an http://HOST:PORT URL of a llama-server (or a file of them)")
    return [(u if "://" in u else "http://" + u).rstrip("/") for u in urls]


def parse_hosts(text: str) -> list[str]:
    """The IP addresses of `--train-hosts` (the ring backend connects by address, not by name)."""
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    for h in hosts:
        try:
            ipaddress.ip_address(h)
        except ValueError:
            raise UserError(f"--train-hosts {text!r}: {h!r} is not an IP address; MLX's ring backend needs "
                            "addresses, e.g. 192.168.1.10,192.168.1.11 (127.0.0.1 twice: two local processes)") from None
    if len(hosts) == 1:
        raise UserError(f"--train-hosts {text!r}: one host is one process; give two or more addresses "
                        "or leave the option out")
    return hosts


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


def parse_duration(text: str) -> float:
    """Seconds of '45m', '2h', '1h30m', '90s' or a bare number of minutes; a `UserError` otherwise."""
    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t) * 60
    else:
        m = _DURATION.match(t)
        if not t or not m or not any(m.groups()):
            raise UserError(f"--time-budget {text!r}: give a duration such as 45m, 2h, 1h30m or 90s")
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    if seconds <= 0:
        raise UserError(f"--time-budget {text!r}: give a duration above zero, such as 45m")
    return seconds


def _given(parse):
    """The check of an option whose empty value means 'not given': `parse` the value when there is one."""
    return lambda value: parse(value) if value else None


def _key_file(path: str) -> None:
    from .apikey import read  # the key file's own checks: readable, not empty, not readable by others

    read(path)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def check(cfg) -> None:
    """Every option of `cfg` within its declared range: else a `UserError` naming the flag, the value and
    what to give instead."""
    for f in fields(cfg):
        v, m, name = getattr(cfg, f.name), f.metadata, flag(f)
        if m.get("choices") is not None and v not in m["choices"]:
            raise UserError(f"{name} {v!r}: choose one of {', '.join(map(str, m['choices']))}")
        if m.get("valid") is not None:
            m["valid"](v)  # the option's own check: raises a UserError naming it
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{name} {v}: give a finite number")
        lo, hi, gt, lt = m.get("min"), m.get("max"), m.get("gt"), m.get("lt")
        allowed = m.get("also")  # single extra values outside the range (e.g. -1 meaning 'all')
        if allowed is not None and v in allowed:
            continue
        ok = ((lo is None or v >= lo) and (hi is None or v <= hi) and (gt is None or v > gt)
              and (lt is None or v < lt))
        if not ok:
            parts = [f"{op} {_fmt(b)}" for op, b in ((">=", lo), (">", gt), ("<=", hi), ("<", lt)) if b is not None]
            extra = f" (or {', '.join(map(_fmt, allowed))})" if allowed else ""
            raise UserError(f"{name} {_fmt(v)}: give a value {' and '.join(parts)}{extra}")


def identity(stage: str, *cfgs) -> dict:
    """The options of `cfgs` declared to change the outputs of `stage` (a kind in STAGES), by field name."""
    assert stage in STAGES, stage
    return {f.name: getattr(c, f.name) for c in cfgs for f in fields(c) if stage in f.metadata.get("stages", ())}


@dataclass
class EngineConfig:
    """How llama.cpp runs a model."""

    n_ctx: int = opt(2048, "Context window in tokens for llama.cpp (0: the model's own).", min=0,
                     stages=("collaboration", "eval"))  # decides which demonstrations fit, and prompt cuts
    n_threads: int = opt(0, "CPU threads for llama.cpp (0: one per CPU this process may use, at most 8).", min=0)
    n_gpu_layers: int = opt(-1, "Layers to offload to a GPU when llama.cpp was built with one (-1: all).", min=-1)
    weights: str = opt("auto", "Weights llama.cpp computes with: auto (on a CPU, a quantized file or its float32 "
                       "copy, whichever evaluates prompts faster on this machine: measured once per file, machine "
                       "and thread count, and cached; the copy, the exact weights MLX trains on, where it takes at "
                       "most a quarter of the RAM and the file is not 1.1x faster), f32 (that copy always), or "
                       "file (the GGUF as given).", choices=WEIGHTS)
    adapter_scale: float = opt(1.0, "Scale applied to a LoRA adapter in llama.cpp.", stages=("collaboration", "eval"))
    server: str = opt("", "Ask llama-servers instead of llama.cpp in this process: comma-separated http://HOST:PORT "
                      "URLs, or a file with one per line. They must serve this model, with the run's adapters "
                      "loaded (--lora); `semievol serve` starts them. Results equal the in-process engine's.",
                      valid=_given(parse_urls))
    server_timeout: float = opt(300.0, "Seconds to wait for one llama-server answer before asking another server.",
                                gt=0)
    api_key_file: str = opt("", "File holding the llama-servers' API key (its first line that is not a # comment; "
                            "readable by you alone). Default: $SEMIEVOL_API_KEY, else the key `semievol serve` "
                            "generated on this machine.", valid=_given(_key_file))


@dataclass
class TrainConfig:
    """LoRA fine-tuning with MLX (owned by mlx_engine)."""

    rank: int = opt(8, "LoRA rank.", min=1, stages=("train",))
    scale: float = opt(20.0, "LoRA scale (mlx-lm's `scale`; the GGUF adapter gets alpha = scale x rank).", gt=0,
                       stages=("train",))
    dropout: float = opt(0.0, "LoRA dropout.", min=0, lt=1, stages=("train",))
    num_layers: int = opt(16, "How many of the last transformer blocks get LoRA (-1, or more than the model has: "
                          "all). The blocks below run once per sequence, not every step: SmolLM2 on fpb, 16 of 30 "
                          "blocks train 2x faster than all 30 (test accuracy 0.918 vs 0.927; 8 blocks: 0.896).",
                          min=1, also=(-1,), stages=("train",))
    keys: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    "Comma-separated projections that get LoRA.", stages=("train",))
    lr: float = opt(0.0, "Peak learning rate (linear warm-up, then cosine decay); 0: the model family's measured "
                    "default (3e-4; gemma3 1e-4; `semievol models info` shows it).", min=0, stages=("train",))
    warmup: float = opt(0.1, "Warm-up as a fraction of all optimizer steps.", min=0, lt=1, stages=("train",))
    epochs: float = opt(3.0, "Passes over the training data.", gt=0, stages=("train",))
    batch_size: int = opt(8, "Sequences per batch.", min=1, stages=("train",))
    grad_accum: int = opt(1, "Batches per optimizer step.", min=1, stages=("train",))
    max_batch_tokens: int = opt(0, "Largest micro-batch in padded tokens (rows x length): a longer batch is split "
                                "into pieces whose gradients add up to the same step, so the rare longest batch "
                                "does not set the memory peak (SmolLM2 on fpb's final fine-tune: 2 of 426). 0: 1.5x "
                                "the median batch; -1: never split.", min=0, also=(-1,), stages=("train",))
    max_seq_len: int = opt(512, "Longest training sequence in tokens (longer ones are cut from the left).", min=8,
                           stages=("train",))
    val_fraction: float = opt(0.0, "Fraction of the training rows held out (seeded) to choose the checkpoint: "
                              "the adapter written is the end-of-epoch one with the lowest validation loss. "
                              "0 (the paper's): every row trains.", min=0, lt=1, stages=("train",))
    weight_decay: float = opt(0.0, "AdamW weight decay on the LoRA weights (0: plain Adam).", min=0, stages=("train",))
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0: no clipping); without it lr 5e-4 "
                           "spikes on fpb.", min=0, stages=("train",))
    grad_checkpoint: bool = opt(False, "Recompute each block's activations in the backward pass: the same "
                                "adapter with far less memory (SmolLM2 on fpb: peak 3.4 -> 1.9 GB), steps ~1.3x slower.")
    frozen_base: str = opt("file", "How the frozen base is held while training on a CPU: file, the GGUF's own "
                           "quantized bytes, each matrix dequantized to float32 (exactly) only where it is multiplied "
                           "(memory about the file's size); f32, the whole base in float32 (about 8x a 4-bit file).",
                           choices=("file", "f32"))
    memory_budget: float = opt(0.0, "GB the fine-tune may take: when its estimated peak (what the process holds, plus "
                               "the activations of the largest micro-batch) passes it, --grad-checkpoint turns on by "
                               "itself. 0: half of this machine's RAM.", min=0)
    save_every: int = opt(50, "Write a resumable checkpoint (and the adapter so far) every N optimizer steps.", min=1)
    seed: int = opt(0, "Random seed for initialization, data order and dropout.", flag="--train-seed", stages=("train",))
    hosts: str = opt("", "Train data-parallel over MLX's ring backend: comma-separated IP addresses, one training "
                     "process each, rank 0 first (127.0.0.1,127.0.0.1: two processes here, started directly; other "
                     "machines through mlx.launch over ssh). Every host needs this project installed and the model "
                     "and run folder at the same paths. The "
                     "adapter equals the one-process adapter up to float rounding.", flag="--train-hosts",
                     valid=_given(parse_hosts))


MODES = ("auto", "score", "sample")
EMBEDDINGS = ("model", "tfidf")
THRESHOLDS = ("global", "per-class")
LABELERS = ("semievol", "self-consistency")
SELECTIONS = ("percentile", "fixed", "vote")


@dataclass
class RunConfig:
    """The SemiEvol pipeline (`semievol run`)."""

    # the mode reaches stages resolved (auto -> score or sample, from the data): the pipeline passes that
    mode: str = opt("auto", "score (option distributions), sample (the paper's generative recipe), or auto.",
                    choices=MODES)
    learners: int = opt(4, "Learners that answer each unlabeled question (n).", min=1, stages=("collaboration",))
    k: int = opt(3, "Labeled neighbours retrieved per unlabeled question (demonstrations; at most 3 are used, "
                 "as in the paper's learner grid).", min=0, stages=("retrieval", "collaboration"))
    theta: float = opt(50.0, "Keep pseudo-labels whose entropy is at or below this percentile (0-100).", min=0,
                       max=100, stages=("selection",))
    rounds: int = opt(1, "Evolution rounds: labeled + selected become the next round's labeled set.", min=1)
    seed: int = opt(0, "Seed for learner configurations and sampling.", stages=("collaboration",))
    embedding: str = opt("tfidf", "Retrieval embeddings: tfidf (word and bigram TF-IDF, scikit-learn: under 3 s on "
                         "fpb) or model (the model's mean-pooled hidden states through llama.cpp: 297 s on fpb, 6 "
                         "texts/s here). The same neighbour quality measured on fpb and arc: docs/method.md.",
                         choices=EMBEDDINGS, stages=("retrieval",))
    iwp: bool = opt(True, "In-weight propagation: the warm adapter takes part in pseudo-labeling (learners and "
                    "the self-justifier); without it only the base model does.", flag="--iwp/--no-iwp",
                    stages=("collaboration",))
    icp: bool = opt(True, "In-context propagation: retrieved demonstrations.", flag="--icp/--no-icp",
                    stages=("retrieval", "collaboration"))
    cl: bool = opt(True, "Collaborative learning: n learners + self-justification.", flag="--cl/--no-cl",
                   stages=("collaboration",))
    labeler: str = opt("semievol", "Who pseudo-labels: semievol (n learners + self-justification) or self-consistency "
                       "(a baseline, LMSI-style: M_warm with k demonstrations answers n times at --temperature, the "
                       "majority vote is the label).", choices=LABELERS, stages=("collaboration",))
    adaptive_selection: bool = opt(True, "Adaptive selection (--selection); --no-as keeps every pseudo-label.",
                                   flag="--as/--no-as", stages=("selection",))
    selection: str = opt("percentile", "percentile: entropy at or below the --theta percentile (the paper's Eq. 7-8); "
                         "fixed: entropy at or below --max-entropy (a baseline); vote: the label's vote share at or "
                         "above --min-vote-share, no entropy (the self-consistency baseline).", choices=SELECTIONS,
                         stages=("selection",))
    max_entropy: float = opt(0.5, "--selection fixed: keep pseudo-labels whose entropy (nats; mean NLL in sample mode) "
                             "is at most this.", min=0, stages=("selection",))
    min_vote_share: float = opt(0.75, "--selection vote: keep pseudo-labels that at least this share of the n answers "
                                "voted for.", min=0, max=1, stages=("selection",))
    threshold: str = opt("global", "Entropy percentile over all pseudo-labels (global: the paper's Eq. 7) or per "
                         "pseudo-label class (per-class: no class is dropped whole); open answers use global.",
                         choices=THRESHOLDS, stages=("selection",))
    min_letter_mass: float = opt(0.5, "Score mode: select a pseudo-label only where the option letters got at least "
                                 "this share of the model's next-token probability (a peaked distribution over letters "
                                 "the model hardly meant to say is no confident answer). SmolLM2 gives them 0.69-0.97.",
                                 min=0, max=1, stages=("selection",))
    justified_only: bool = opt(False, "Apply the entropy threshold to self-justified pseudo-labels only (official code).",
                               stages=("selection",))
    final_from_warm: bool = opt(False, "Final fine-tune continues the warm adapter on the selected only (official code).")
    final_lr: float = opt(0.0, "Peak lr of the final fine-tune (0: --lr); the official code continues M_warm at 1e-6.",
                          min=0)
    final_epochs: float = opt(0.0, "Epochs of the final fine-tune (0: --epochs).", min=0)
    temperature: float = opt(1.0, "Sampling temperature of the learners in sample mode.", min=0,
                             stages=("collaboration",))
    max_tokens: int = opt(256, "Longest generated answer in sample mode.", min=1, stages=("collaboration",))
    limit_labeled: int = opt(0, "Use only the first N labeled rows (0: all).", min=0)
    limit_unlabeled: int = opt(0, "Use only the first N unlabeled questions (0: all).", min=0)
    limit_test: int = opt(0, "Evaluate on only the first N test questions (0: all).", min=0)
    force: bool = opt(False, "Go on where the collapse check stops the run: the warm-up answered one option on at "
                      "least 90% of the probed unlabeled questions while no class holds over 70% of the labeled "
                      "split (the run then stops before collaboration, with exit code 3).")
    time_budget: str = opt("", "Pseudo-label as many unlabeled questions (the first N) as fit this long a run, by the "
                           "estimate every run prints first: 45m, 2h, 1h30m, 90s (a bare number: minutes). "
                           "Empty: all of them.", valid=_given(parse_duration))


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


# --- a run as a file ----------------------------------------------------------------------------------

SECTIONS = {"run": RunConfig, "train": TrainConfig, "engine": EngineConfig}
FILE_KEYS = ("model", "data", "out")  # the command's own options that a file may also give


def _flat_keys() -> dict[str, tuple[str, str]]:
    """Top-level keys of a config file -> (section, field): each option's flag without dashes (`train-seed`,
    `train_seed`), and its field name where no other option has that name (`adaptive_selection`)."""
    keys: dict[str, tuple[str, str]] = {}
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            name = flag(f)[2:]
            keys[name] = keys[name.replace("-", "_")] = (sec, f.name)
    names = [f.name for cls in SECTIONS.values() for f in fields(cls)]
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            if names.count(f.name) == 1:
                keys.setdefault(f.name, (sec, f.name))
    return keys


def _typed(where: str, f, v):
    """`v` as the type of field `f`'s default, or a UserError naming the key."""
    want = type(f.default)
    if want is bool:
        ok = isinstance(v, bool)
    elif want is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif want is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        v = float(v) if ok else v
    else:
        ok = isinstance(v, str)
    if not ok:
        kind = {bool: "true or false", int: "a whole number", float: "a number"}.get(want, "a string")
        raise UserError(f"{where} = {v!r}: give {kind}")
    return v


def read_file(path) -> dict:
    """A run's options from a TOML file or a run folder's run.json: {"model"?, "data"?, "out"?, "run": {...},
    "train": {...}, "engine": {...}} with field names and checked types. Options go at the top level by flag
    name (`learners = 2`, `train-seed = 1`) or in [run] / [train] / [engine] tables by field name (as run.json
    writes them). An unknown key is an error, not ignored."""
    from pathlib import Path

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"--config {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"--config {path}: a folder; give a .toml file or a run folder's run.json") from None
    try:
        if path.suffix == ".json":
            doc = json.loads(raw)
        else:
            doc = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"--config {path}: does not parse ({e}); fix it or give a .toml/.json file") from None
    if not isinstance(doc, dict):
        raise UserError(f"--config {path}: expected a table of options")
    out: dict = {sec: {} for sec in SECTIONS}
    flat = _flat_keys()
    by_name = {sec: {f.name: f for f in fields(cls)} for sec, cls in SECTIONS.items()}
    for key, v in doc.items():
        if key in SECTIONS and isinstance(v, dict):
            for name, val in v.items():
                if name not in by_name[key]:
                    raise UserError(f"--config {path}: [{key}] has no option {name!r}")
                out[key][name] = _typed(f"{path}: {key}.{name}", by_name[key][name], val)
        elif key in FILE_KEYS:
            if not isinstance(v, str):
                raise UserError(f"{path}: {key} = {v!r}: give a string")
            out[key] = v
        elif key == "mode" and isinstance(doc.get("run"), dict) and "mode" in doc["run"]:
            continue  # run.json also records the mode the run resolved to; its [run] table holds the option
        elif key in flat:
            sec, name = flat[key]
            out[sec][name] = _typed(f"{path}: {key}", by_name[sec][name], v)
        else:
            raise UserError(f"--config {path}: unknown option {key!r}; see `semievol run --help` for the names")
    return out


def merged(cls, from_file: dict, given: dict):
    """An options object: what the command line gave (`given`, field -> value) over the file's values over
    the defaults; checked."""
    cfg = cls(**{**from_file, **given})
    check(cfg)
    return cfg

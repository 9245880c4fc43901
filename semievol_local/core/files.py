"""Writing files so that a crash never leaves one that looks complete but is not.

The rule everywhere: write beside the target, fsync, `os.replace`. A reader sees the old file or the new one,
never half of one. `atomic_target` serves writers that insist on a path (mx.save_safetensors, GGUFWriter);
`atomic_folder` and `seal_folder` do the same for a folder (a run's stage, a checkpoint, an export); a
`Journal` keeps a long job's finished records so that a killed job resumes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir(name: str) -> Path:
    """This user's cache folder `name` for semievol: $XDG_CACHE_HOME/semievol/name, else ~/.cache/semievol/name."""
    root = os.environ.get("XDG_CACHE_HOME")
    return (Path(root) if root else Path.home() / ".cache") / "semievol" / name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike):
    """Yield a temporary path next to `path` with the same suffix (mx.save_safetensors appends one
    otherwise); on success fsync it and move it over `path`, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def seal_folder(work: Path, final: Path) -> None:
    """Make the finished folder `work` into `final` in one rename, replacing an older `final` (a crash between
    the two leaves no `final`, never half of one: its writer builds it again). Files are fsynced first."""
    work, final = Path(work), Path(final)
    for p in work.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, final)


@contextlib.contextmanager
def atomic_folder(final: Path, work: Path | None = None):
    """Yield an empty folder beside `final` (`work`, else `.NAME.tmp-PID`); when the block ends it is sealed as
    `final` (`seal_folder`), and on any failure it is removed: the folder appears whole or not at all."""
    final = Path(final)
    work = Path(work) if work is not None else final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
        seal_folder(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


class Journal:
    """Finished records of a long job, one JSON line each, appended and fsynced as they finish, so that a killed
    job resumes where it stopped. The first line holds the job's `identity`: a journal of other inputs is
    started afresh, and a torn last line (a kill mid-write) is dropped. The caller writes its real output from
    `done` and then `remove`s the journal.

        with Journal(path, identity) as j:
            for rec in work_not_in(j.done):
                j.write(rec)
    """

    def __init__(self, path: Path, identity=None):
        self.path, self.identity = Path(path), identity
        self.done: list[dict] = self._read()
        self._f = None

    def _read(self) -> list[dict]:
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
            head = json.loads(lines[0])
        except (OSError, ValueError):
            return []
        if not isinstance(head, dict) or head.get("identity", object()) != self.identity:
            return []
        recs = []
        for ln in lines[1:-1]:  # the text after the last newline is a torn line (or empty)
            try:
                recs.append(json.loads(ln))
            except ValueError:
                break
        return recs

    def __enter__(self) -> "Journal":
        # rewritten clean (header, the records kept) in one rename, then appended to
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in [{"identity": self.identity}, *self.done]))
        self._f = open(self.path, "a", encoding="utf-8")
        return self

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, default=_jsonable) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.append(rec)

    def __exit__(self, *exc) -> None:
        self._f.close()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

"""The run folder: one sub-folder per stage, each sealed by a manifest, so a run resumes where it stopped.

A stage is built in `.<name>.partial/` (which a killed run leaves behind for the stage to resume from),
then sealed: a manifest records the digest of its inputs, the digests of its output files, its time and
peak memory (summed over every attempt when a killed stage was resumed), and the folder is renamed into place. Running again reuses a sealed stage whose inputs
digest still matches and whose outputs still hash the same; anything else is built again. Stages name
their upstream stages' output digests among their inputs, so a change re-runs exactly what depends on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .files import atomic_write_json, seal_folder, sha256_file

MANIFEST = "manifest.json"
INPUTS = "inputs.json"
CLOCK = ".clock.json"  # a partial stage's time and peak memory so far, over every attempt
LOCK = ".lock"  # held (flock) by the one command writing the folder; holds that command's PID
CLOCK_EVERY = 5.0  # seconds between writes of the clock (a kill -9 loses at most this much)

_file_digests: dict[tuple, str] = {}


def digest(obj) -> str:
    """A stable digest of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a large model is hashed once per process."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_digests:
        _file_digests[key] = sha256_file(path)
    return _file_digests[key]


def weights_identity(model_path: Path, kind: str) -> str:
    """What llama.cpp computes with: the model file's digest, marked when it is not the file itself (`kind`:
    "f32", its float32 copy)."""
    return file_digest(model_path) + ("" if kind == "file" else f"+{kind}")


def items_digest(items, with_answers: bool) -> str:
    """What of a split reaches the pipeline: questions and options (and answers where they are labels)."""
    return digest([[it.question, list(it.options), it.answer if with_answers else None] for it in items])


def rss_mb() -> float:
    """Resident memory of this process now, in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def ram_bytes() -> int:
    """This machine's physical memory in bytes (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class PeakMemory:
    """Samples resident memory in a background thread; `.peak_mb` is the highest seen inside the block."""

    def __init__(self, interval: float = 0.2, on_tick: Callable[[float], None] | None = None, every: float = 5.0):
        self.interval, self.peak_mb = interval, 0.0
        self.on_tick, self.every = on_tick, every  # on_tick(peak_mb) every `every` seconds
        self._stop = threading.Event()

    def __enter__(self):
        self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())
            if self.on_tick is not None and time.perf_counter() - last >= self.every:
                last = time.perf_counter()
                self.on_tick(self.peak_mb)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


@dataclass
class StageResult:
    name: str
    dir: Path
    reused: bool
    manifest: dict

    @property
    def outputs_digest(self) -> str:
        return self.manifest["outputs_digest"]

    def path(self, name: str) -> Path:
        return self.dir / name


def _outputs(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, INPUTS) and not p.name.startswith(".")
            and "checkpoints" not in p.relative_to(folder).parts}


def _sealed(folder: Path, inputs_digest: str) -> dict | None:
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if m.get("inputs_digest") != inputs_digest:
        return None
    if _outputs(folder) != m.get("outputs"):
        return None  # an output was changed or lost since the stage was sealed
    return m


def sealed_stages(run: Path) -> dict[str, dict]:
    """Every sealed stage under a run folder: its name -> its manifest (unsealed `.partial` work skipped, and
    the files of another schema that a stage may hold: checkpoints written before theirs were checksums.json)."""
    out = {}
    for m in sorted(Path(run).rglob(MANIFEST)):
        if any(part.startswith(".") for part in m.relative_to(run).parts):
            continue
        try:
            d = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and "stage" in d and "inputs_digest" in d:
            out[d["stage"]] = d
    return out


def run_record(run: Path) -> dict:
    """A run folder's run.json (what the run was started with), or a one-line `UserError`."""
    from .errors import UserError

    try:
        meta = json.loads((Path(run) / "run.json").read_text())
    except (FileNotFoundError, NotADirectoryError):  # no such folder, or a file given for one
        raise UserError(f"{run}: not a run folder (no run.json); give the --out of a `semievol run`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{run}/run.json: not readable JSON ({e}); the run folder is damaged: run it again "
                        "into a new --out") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise UserError(f"{run}/run.json: no 'model' in it, so not a semievol run's record; give the --out of a "
                        "`semievol run`") from None
    return meta


def check_folder(root: Path) -> Path:
    """`root` if it can be a run folder (missing, or a folder); else a `UserError` naming what is in the way."""
    root = Path(root)
    for p in (root, *root.parents):
        if p.exists() and not p.is_dir():
            raise UserError(f"--out {root}: {p} is a file, not a folder; give a folder (a new one, or a run "
                            "folder to resume)")
    return root


@contextmanager
def exclusive(root: Path):
    """Hold `root`'s lock for the block: the OS's advisory file lock, which the kernel drops when the process
    ends however it ends (kill -9 leaves no stale lock). A second writer gets a `UserError` naming the
    holder's PID. Readers (`report`, a benchmark's siblings sharing stages) take no lock. A folder this call
    created is removed again if the block fails before writing anything in it."""
    root = check_folder(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one writer is the user's to keep
        yield
        return
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{root}: in use by another semievol command (PID {holder}); wait for it to finish "
                            "or give another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        except BaseException:
            if created and [p.name for p in root.iterdir()] == [LOCK]:
                (root / LOCK).unlink(missing_ok=True)
                root.rmdir()
            raise
    finally:
        os.close(fd)  # releases the lock


class RunFolder:
    """A run's folder. `share` names sibling run folders whose sealed stages may be copied when their
    inputs are identical (benchmarks that vary one option reuse everything upstream of it)."""

    def __init__(self, root: Path, share: tuple[Path, ...] = ()):
        self.root = check_folder(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.share = [Path(p) for p in share if Path(p).resolve() != self.root.resolve()]

    def _copy_twin(self, name: str, key: str, final: Path) -> dict | None:
        """Copy a sibling's sealed stage with the same inputs into place (never its checkpoints)."""
        for other in self.share:
            src = other / name
            if _sealed(src, key) is None:
                continue
            tmp = final.with_name(f".{final.name}.copy")
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints", ".*"))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            m = _sealed(final, key)
            if m is not None:
                return m
        return None

    def stage(self, name: str, inputs: dict, build: Callable[[Path], dict | None],
              announce: Callable[[bool], None] = lambda reused: None) -> StageResult:
        """Reuse the sealed stage `name` if its inputs are unchanged, else build it with `build(work_dir)`.

        `build` writes its outputs into `work_dir` (which may hold a killed run's partial work for the
        same inputs, to resume from) and may return a dict of figures for the manifest.
        """
        final = self.root / name
        key = digest(inputs)
        m = _sealed(final, key) or self._copy_twin(name, key, final)
        announce(m is not None)
        if m is not None:
            return StageResult(name, final, True, m)
        work = final.with_name(f".{final.name}.partial")
        try:
            same = json.loads((work / INPUTS).read_text()).get("digest") == key
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            atomic_write_json(work / INPUTS, {"digest": key, "inputs": inputs})
            before = {"seconds": 0.0, "peak_rss_mb": 0.0, "attempts": 0}
        else:  # resuming a killed attempt: its time counts (up to its last tick) and so does the attempt
            try:
                before = json.loads((work / CLOCK).read_text())
            except (OSError, ValueError):
                before = {"seconds": 0.0, "peak_rss_mb": 0.0, "attempts": 1, "untimed_attempts": True}
        t0 = time.perf_counter()

        def clock(peak_mb: float) -> dict:
            return {**before, "seconds": before["seconds"] + time.perf_counter() - t0,
                    "peak_rss_mb": max(before["peak_rss_mb"], peak_mb), "attempts": before["attempts"] + 1}

        atomic_write_json(work / CLOCK, clock(0.0))  # the attempt counts even if killed before the first tick
        with PeakMemory(on_tick=lambda peak: atomic_write_json(work / CLOCK, clock(peak)), every=CLOCK_EVERY) as mem:
            try:
                figures = build(work) or {}
            except BaseException:
                atomic_write_json(work / CLOCK, clock(mem.peak_mb))
                raise
        total = clock(mem.peak_mb)
        (work / CLOCK).unlink(missing_ok=True)
        outputs = _outputs(work)
        manifest = {"stage": name, "inputs_digest": key, "inputs": inputs, "outputs": outputs,
                    "outputs_digest": digest(outputs), "seconds": round(total["seconds"], 2),
                    "peak_rss_mb": round(total["peak_rss_mb"], 1), "attempts": total["attempts"],
                    "figures": figures, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if total.get("untimed_attempts"):
            manifest["untimed_attempts"] = True  # resumed from a partial stage that kept no clock
        atomic_write_json(work / MANIFEST, manifest)
        seal_folder(work, final)  # a crash inside leaves no sealed stage: it is rebuilt
        return StageResult(name, final, False, manifest)

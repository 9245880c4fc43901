"""Data-parallel training on more than one process or host, over MLX's ring backend.

`train` writes what a fine-tune needs (token ids, options, paths) into the output folder, starts this module
as the program of every rank (directly where every host is this machine, else through `mlx.launch --backend
ring --hosts ...` over ssh), and follows rank 0's progress,
which the worker prints as JSON lines. Each worker runs `mlx_engine.train`, which shards every micro-batch
over the processes and sums gradients with `mx.distributed.all_sum`. The caller gets the same
summary, callbacks and files as from an in-process `mlx_engine.train`.

Started by hand instead (`mlx.launch ... -- semievol train ...`), `semievol train` does the same without
this module: every rank runs the command and rank 0 alone writes.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..core.config import parse_hosts
from ..core.errors import UserError
from ..core.files import atomic_write_json

SPEC = ".launch.json"  # in the output folder: what every worker trains
PROGRESS, DONE, ERROR = "semievol-progress ", "semievol-done ", "semievol-error "


def launcher() -> Path:
    """mlx.launch, installed with mlx beside this Python."""
    exe = Path(sys.executable).parent / "mlx.launch"
    if not exe.exists():
        found = shutil.which("mlx.launch")
        if not found:
            raise UserError("--train-hosts needs MLX's launcher (mlx.launch), which comes with the mlx package; "
                            "reinstall semievol-local (`just setup`)")
        exe = Path(found)
    return exe


def free_port(n: int) -> int:
    """A first port P such that P..P+n-1 are free here now (ring ranks listen on P + rank on their host)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        held = []
        try:
            for i in range(n):
                t = socket.socket()
                held.append(t)
                t.bind(("", first + i))
            return first
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise UserError("found no free TCP ports for the training processes")


def _all_here(hosts: list[str]) -> bool:
    """Whether every host is this machine (`parse_hosts` gives IP addresses)."""
    return all(ipaddress.ip_address(h).is_loopback for h in hosts)


def thread_env(hosts: list[str]) -> dict[str, str]:
    """The environment giving each process its share of the cores when every host is this machine (BLAS
    results depend on the thread count: the same processes means the same threads too)."""
    if not _all_here(hosts):
        return {}
    n = str(max(1, (os.cpu_count() or 1) // len(hosts)))
    return {"OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n}


def train(model_path, train_examples, cfg, out_dir: Path, *, valid_examples=None, resume: bool = False,
          init_adapter=None, on_step: Callable[[dict], None] | None = None,
          on_trunk: Callable[[int, int], None] | None = None, trunk_store: Path | None = None) -> dict:
    """`mlx_engine.train` (same arguments; no `trunk_store`: each process computes its own rows) over the
    processes of `cfg.hosts`; returns rank 0's summary."""
    hosts = parse_hosts(cfg.hosts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"model": str(Path(model_path).resolve()), "train": [list(map(list, e)) for e in train_examples],
            "valid": [list(map(list, e)) for e in valid_examples or []],
            "config": dataclasses.asdict(dataclasses.replace(cfg, hosts="")), "out_dir": str(out_dir.resolve()),
            "resume": resume, "init_adapter": str(Path(init_adapter).resolve()) if init_adapter else None}
    atomic_write_json(out_dir / SPEC, spec)
    program = [sys.executable, "-m", "semievol_local.training.distributed", str((out_dir / SPEC).resolve())]
    summary, errors, tail = None, [], []
    with _start(hosts, program, out_dir) as lines:
        try:
            for line in lines:  # every rank's output, merged; rank 0 alone prints progress
                if line.startswith(PROGRESS):
                    msg = json.loads(line[len(PROGRESS):])
                    if "trunk" in msg and on_trunk:
                        on_trunk(*msg["trunk"])
                    elif "step" in msg and on_step:
                        on_step(msg["step"])
                elif line.startswith(DONE):
                    summary = json.loads(line[len(DONE):])
                elif ERROR in line:
                    errors.append(line.split(ERROR, 1)[1].strip())
                elif line.strip():
                    tail = (tail + [line.rstrip()])[-20:]
        except BaseException:  # interrupted: take the processes down with us (the checkpoints stay)
            lines.stop()
            raise
    if summary is None:  # mlx.launch exits 0 whatever its processes did: the summary line is the proof
        if errors:
            raise UserError(errors[0])
        raise UserError(f"data-parallel training on {cfg.hosts} stopped without finishing; the launcher said:\n"
                        + "\n".join(tail[-8:]))
    (out_dir / SPEC).unlink(missing_ok=True)
    return summary


class _Lines:
    """The merged output lines of the training processes, read with blocking reads (one thread per stream:
    no CPU while the processes train), and a way to stop them all."""

    def __init__(self, procs: list[subprocess.Popen], cleanup: Callable[[], None] = lambda: None):
        import queue
        import threading

        self.procs, self.cleanup, self._q = procs, cleanup, queue.Queue()
        for p in procs:
            threading.Thread(target=self._pump, args=(p,), daemon=True).start()

    def _pump(self, p: subprocess.Popen) -> None:
        for line in p.stdout:
            self._q.put(line)
        if p.wait() != 0:  # a process that failed leaves the others waiting in a collective: stop them too
            self.stop()
        self._q.put(None)

    def __iter__(self):
        open_streams = len(self.procs)
        while open_streams:
            line = self._q.get()
            if line is None:
                open_streams -= 1
            else:
                yield line

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.wait()
        self.cleanup()


def _start(hosts: list[str], program: list[str], out_dir: Path) -> _Lines:
    """Start one training process per host. Where every host is this machine, the processes are started
    here directly, as MLX's ring backend expects them (MLX_RANK, and MLX_HOSTFILE naming every rank's
    address and port), each with its share of the cores: one process less than through a launcher, and no
    relay between the ranks and this one; otherwise through `mlx.launch` over ssh. Each process (or the
    launcher) in its own session: an interrupt takes it down with its children; no stdin."""
    port = free_port(len(hosts))
    if _all_here(hosts):
        hostfile = out_dir / ".hosts.json"
        atomic_write_json(hostfile, [[f"{h}:{port + i}"] for i, h in enumerate(hosts)])
        procs = [subprocess.Popen(program, env={**os.environ, **thread_env(hosts), "MLX_RANK": str(rank),
                                                "MLX_HOSTFILE": str(hostfile)},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, bufsize=1, start_new_session=True)
                 for rank in range(len(hosts))]
        return _Lines(procs, cleanup=lambda: hostfile.unlink(missing_ok=True))
    cmd = [str(launcher()), "--backend", "ring", "--hosts", ",".join(hosts), "--starting-port", str(port), "--",
           *program]
    return _Lines([subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, start_new_session=True)])


def _worker(spec_path: str) -> int:
    """One process of the launched training (every rank runs this)."""
    from ..core.config import TrainConfig
    from . import collectives, mlx_engine

    spec = json.loads(Path(spec_path).read_text())
    lead = collectives.group().rank() == 0

    def say(prefix, obj):
        if lead:
            print(prefix + json.dumps(obj), flush=True)

    try:
        summary = mlx_engine.train(
            spec["model"], [tuple(e) for e in spec["train"]], TrainConfig(**spec["config"]), spec["out_dir"],
            valid_examples=[tuple(e) for e in spec["valid"]], resume=spec["resume"], init_adapter=spec["init_adapter"],
            on_step=lambda info: say(PROGRESS, {"step": info}),
            on_trunk=lambda done, total: say(PROGRESS, {"trunk": [done, total]}))
    except UserError as e:
        print(ERROR + str(e).replace("\n", " "), flush=True)
        return 2
    say(DONE, summary)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))

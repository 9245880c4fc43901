"""llama.cpp's HTTP server (`llama-server`): where its binary comes from, and starting local ones.

The binary is built on first use from the llama.cpp source that llama-cpp-python vendors, at the version
this environment runs and with the same build flags as its library (on Linux x86-64: without the AMX
kernels, as `just setup` builds it), so a server computes what the in-process engine computes. It is
cached per version under ~/.cache/semievol/llama-server/. `SEMIEVOL_LLAMA_SERVER=/path/to/llama-server`
uses another build (Homebrew's `llama.cpp`, a release archive): it works, but a different llama.cpp
version may change probabilities in their last digits.

What it does not do: talk to a server (`server_engine` does), or start servers on other hosts (run
`semievol serve` there, see docs/scale-out.md). The flags it starts servers with, and why: docs/engines.md.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..core import files
from ..core.errors import UserError

ENV = "SEMIEVOL_LLAMA_SERVER"


def cache_dir() -> Path:
    return files.cache_dir("llama-server")


def _cmake_args() -> list[str]:
    """The flags `just setup` builds llama-cpp-python with (on Linux x86-64 without llama.cpp's AMX
    kernels: the compiler's AMX macros undefined)."""
    args = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"]
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        args += ['-DCMAKE_C_FLAGS=-U__AMX_INT8__ -U__AMX_TILE__', '-DCMAKE_CXX_FLAGS=-U__AMX_INT8__ -U__AMX_TILE__']
    return args


def binary(say: Callable[[str], None] = lambda msg: None) -> Path:
    """The llama-server to run: $SEMIEVOL_LLAMA_SERVER, else the cached build, else built now (minutes)."""
    own = os.environ.get(ENV)
    if own:
        if not (Path(own).is_file() and os.access(own, os.X_OK)):
            raise UserError(f"{ENV}={own}: not an executable file; point it at a llama-server binary or unset it")
        return Path(own)
    version = importlib.metadata.version("llama-cpp-python")
    exe = cache_dir() / f"{version}-{platform.machine()}" / "llama-server"
    if exe.is_file():
        return exe
    say(f"building llama-server from the llama.cpp source of llama-cpp-python {version} "
        "(once; a few minutes, cached in " + str(exe.parent) + ")")
    build(version, exe, say)
    return exe


def _tool(name: str, say) -> str:
    """cmake or ninja: on PATH, beside this Python, or installed from PyPI into this environment."""
    found = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                   if (Path(sys.executable).parent / name).exists() else None)
    if found:
        return found
    say(f"installing {name} from PyPI into this environment")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", name], check=True)
    return str(Path(sys.executable).parent / name)


def build(version: str, exe: Path, say) -> None:
    """Download llama-cpp-python's source distribution (PyPI), build its vendored llama-server, install it at `exe`."""
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        raise UserError("building llama-server needs a C++ compiler: install build-essential (Debian/Ubuntu) "
                        f"or Xcode's command line tools, or set {ENV} to a llama-server binary")
    cmake, ninja = _tool("cmake", say), _tool("ninja", say)
    with tempfile.TemporaryDirectory(prefix="semievol-llama-server-") as tmp:
        tmp = Path(tmp)
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                            "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", str(tmp)],
                           check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            raise UserError(f"could not download the llama-cpp-python {version} source from PyPI to build "
                            f"llama-server ({e.stderr.strip().splitlines()[-1] if e.stderr.strip() else e}); "
                            f"set {ENV} to a llama-server binary instead") from None
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data") if sys.version_info >= (3, 12) else tar.extractall(tmp)
        src = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
        jobs = str(max(1, os.cpu_count() or 1))
        log = tmp / "build.log"
        with open(log, "w") as out:
            steps = [[cmake, "-S", str(src), "-B", str(tmp / "build"), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
                      *_cmake_args()],
                     [cmake, "--build", str(tmp / "build"), "--target", "llama-server", "-j", jobs]]
            for cmd in steps:
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise UserError("building llama-server failed: " + " | ".join(tail)
                                    + f"; set {ENV} to a llama-server binary instead")
        built = tmp / "build" / "bin" / "llama-server"
        exe.parent.mkdir(parents=True, exist_ok=True)
        part = exe.with_name(exe.name + ".partial")
        shutil.copy2(built, part)
        os.replace(part, exe)  # a build killed half-way leaves no binary that looks finished


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(model: Path, *, port: int, host: str = "127.0.0.1", adapters: list[Path] = (), n_ctx: int = 2048,
            parallel: int = 1, threads: int = 1, exe: Path | None = None, key_file: Path | None = None) -> list[str]:
    """The llama-server command line for `model` with `adapters` loaded and off until a request asks for one.
    Each of the `parallel` slots holds `n_ctx` tokens. With `key_file` (`apikey.server_file`: the key alone)
    every request but `/health` needs that key.

    Two defaults of llama-server are turned off so that it computes what llama-cpp-python computes (measured
    on the tiny test model): flash attention (`-fa auto` picks it on CPU; llama-cpp-python does not; option
    probabilities then differ by ~1%), and the host-memory prompt cache (`--cache-ram`), which restores a
    saved prompt state without regard to the LoRA adapter it was computed with (with an adapter, the second
    prompt sharing a prefix got probabilities up to 0.07 off). Prefix reuse within a slot stays on."""
    cmd = [str(exe or binary()), "-m", str(model), "--host", host, "--port", str(port), "-c", str(n_ctx * parallel),
           "--parallel", str(parallel), "-t", str(threads), "-tb", str(threads), "-b", "512", "-ub", "512",
           "--no-webui", "--lora-init-without-apply", "--no-warmup", "--flash-attn", "off", "--cache-ram", "0"]
    for a in adapters:
        cmd += ["--lora", str(Path(a).resolve())]
    if key_file is not None:
        cmd += ["--api-key-file", str(key_file)]
    return cmd


def start(model: Path, *, port: int | None = None, host: str = "127.0.0.1", adapters: list[Path] = (),
          n_ctx: int = 2048, parallel: int = 1, threads: int = 1, log_path: Path | None = None,
          timeout: float = 120.0, key_file: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start one local llama-server and wait until it answers; (the process, its URL)."""
    port = port or free_port()
    cmd = command(model, port=port, host=host, adapters=adapters, n_ctx=n_ctx, parallel=parallel, threads=threads,
                  key_file=key_file)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"llama-server for {model} exited at start (code {proc.returncode})"
                            + (f"; see {log_path}" if log_path else "") + f": {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise UserError(f"llama-server for {model} did not answer within {timeout:.0f} s: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_adapters(run: Path) -> list[Path]:
    """The adapter.gguf of every finished stage of a run folder (building stages live in dot-folders)."""
    return sorted(f for f in Path(run).glob("**/adapter.gguf")
                  if not any(part.startswith(".") for part in f.relative_to(run).parts[:-1]))


class Local:
    """Local llama-servers on fixed ports, with fixed adapters and, with `run`, every adapter that run has
    finished: when the run trains a new one they are restarted (same ports) with it loaded. With `key`
    (`apikey.Key`) they answer only requests that carry it. A context manager: leaving it stops them."""

    def __init__(self, model: Path, architecture: str, ports: list[int], *, host: str = "127.0.0.1",
                 threads: int = 1, parallel: int = 1, n_ctx: int = 2048, adapters: list[Path] = (),
                 run: Path | None = None, log_prefix: Path | None = None, key=None):
        self.model, self.arch, self.ports, self.host = Path(model), architecture, ports, host
        self.threads, self.parallel, self.n_ctx, self.fixed, self.run = threads, parallel, n_ctx, list(adapters), run
        self.log_prefix, self.key = log_prefix, key
        self._private: tempfile.TemporaryDirectory | None = None  # the key's file for the servers (mode 0700)
        self.procs: list[subprocess.Popen] = []
        self.adapters: list[Path] = []
        local = host in ("0.0.0.0", "::", "127.0.0.1")
        self.urls = [f"http://{'127.0.0.1' if local else host}:{p}" for p in ports]

    def _wanted(self) -> list[Path]:
        from ..core.adapter_gguf import check_adapter

        found = list(self.fixed) + (run_adapters(self.run) if self.run else [])
        for f in found:
            check_adapter(f, self.arch)
        return found

    def _key(self, files: list[Path]) -> list:
        return [(str(f.resolve()), f.stat().st_mtime_ns) for f in files if f.exists()]

    def start(self) -> None:
        from ..core.apikey import server_file

        self.adapters = self._wanted()
        key_file = None
        if self.key is not None:
            if self._private is None:
                self._private = tempfile.TemporaryDirectory(prefix="semievol-serve-")
            key_file = server_file(self.key, Path(self._private.name))
        try:
            for i, port in enumerate(self.ports):
                log = Path(f"{self.log_prefix}-{i}.log") if self.log_prefix else None
                proc, _ = start(self.model, port=port, host=self.host, adapters=self.adapters, n_ctx=self.n_ctx,
                                parallel=self.parallel, threads=self.threads, log_path=log, key_file=key_file)
                self.procs.append(proc)
        finally:
            if key_file is not None:
                key_file.unlink()  # read as they start: this copy of the key does not stay on disk

    def stop(self) -> None:
        for p in self.procs:
            stop(p)
        self.procs = []

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        if self._private is not None:
            self._private.cleanup()
            self._private = None

    def serve(self, on_restart: Callable[[int], None] = lambda n: None, poll: float = 2.0) -> None:
        """Until interrupted (Ctrl-C, SIGTERM): restart when the run finishes a new adapter; stop on a crash."""
        import signal

        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        key = self._key(self.adapters)
        try:
            while True:
                time.sleep(poll)
                dead = [u for p, u in zip(self.procs, self.urls) if p.poll() is not None]
                if dead:
                    raise UserError(f"llama-server {', '.join(dead)} stopped; the others are stopped too")
                if self.run is not None:
                    wanted = run_adapters(self.run)
                    if self._key(self.fixed + wanted) != key:
                        time.sleep(poll)  # a stage seals by renaming its folder: let it settle
                        self.stop()
                        self.start()
                        key = self._key(self.adapters)
                        on_restart(len(self.adapters))
        except KeyboardInterrupt:
            pass

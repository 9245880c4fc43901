"""Data-parallel training with MLX's own launcher (`mlx.launch`, ring backend over TCP on 127.0.0.1):
two processes train the adapter one process trains, and only rank 0 writes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semievol_local.training.distributed import free_port, thread_env

LAUNCH = Path(sys.executable).parent / "mlx.launch"
pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed beside this Python")


def semievol(*args) -> list[str]:
    return [sys.executable, "-m", "semievol_local.cli", *map(str, args)]


def launch(n: int, command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [str(LAUNCH), "--backend", "ring", "-n", str(n), "--starting-port", str(free_port(n)),
           *(a for k, v in thread_env(["127.0.0.1"] * n).items() for a in ("--env", f"{k}={v}")), "--", *command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def adapters(folder: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def test_two_processes_train_what_one_process_trains(tiny_model, tiny_task, tmp_path):
    # LoRA on the last of 2 blocks: block 0's outputs are cached per process for its own rows (the trunk)
    train = ["train", "--model", tiny_model, "--data", tiny_task, "--epochs", 2, "--batch-size", 4,
             "--lr", "1e-3", "--num-layers", 1]
    one = subprocess.run(semievol(*train, "--out", tmp_path / "one"), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert one.returncode == 0, one.stderr
    two = launch(2, semievol(*train, "--out", tmp_path / "two"))
    assert two.returncode == 0, two.stdout + two.stderr

    a, b = adapters(tmp_path / "one"), adapters(tmp_path / "two")
    assert a.keys() == b.keys() and a
    scale = max(float(np.abs(v).max()) for v in a.values())
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert diff <= 1e-4 * scale, f"2-process adapter differs by {diff:.3g} (largest weight {scale:.3g})"
    # the LoRA B matrices start at zero: equal weights after 6 steps means the updates really were the same
    assert any(np.abs(v).max() > 0 for k, v in b.items() if k.endswith("lora_b"))

    log1 = [json.loads(x) for x in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log1] == [r["step"] for r in log2]
    np.testing.assert_allclose([r["loss"] for r in log2], [r["loss"] for r in log1], rtol=1e-4)
    # rank 0 alone reports: one summary table, one parity check
    assert two.stdout.count("trained ") == 1 and two.stdout.count("parity") == 1
    assert (tmp_path / "two" / "adapter.gguf").is_file()

    # --train-hosts: semievol starts mlx.launch itself (what `semievol run` does for its fine-tunes)
    three = subprocess.run(semievol(*train, "--out", tmp_path / "three", "--train-hosts", "127.0.0.1,127.0.0.1"),
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert three.returncode == 0, three.stderr
    c = adapters(tmp_path / "three")
    assert max(float(np.abs(c[k] - b[k]).max()) for k in a) == 0.0  # the same two processes: bit for bit
    assert "train" in three.stderr and "steps" in three.stderr  # rank 0's progress reached the caller's bar
    assert re.search(r"│ processes\s+│\s+2 │", three.stdout), three.stdout
    assert not (tmp_path / "three" / ".launch.json").exists()

    # resume: rank 0 reads the checkpoint and hands the weights, optimizer state and step to rank 1
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    four = [*train, "--out", tmp_path / "four", "--train-hosts", "127.0.0.1,127.0.0.1", "--save-every", 2]
    assert subprocess.run(semievol(*four), capture_output=True, text=True, timeout=600, env=env).returncode == 0
    ckpts = sorted((tmp_path / "four" / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-0000004", "step-0000006"]
    shutil.rmtree(ckpts[-1])  # as if killed after step 5
    (tmp_path / "four" / "adapters.safetensors").unlink()
    res = subprocess.run(semievol(*four, "--resume"), capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    assert re.search(r"│ resumed_from\s+│\s+4 │", res.stdout), res.stdout
    d = adapters(tmp_path / "four")
    assert max(float(np.abs(d[k] - c[k]).max()) for k in a) == 0.0


@pytest.mark.parametrize("hosts, message", [("127.0.0.1", "one host is one process"),
                                            ("localhost,127.0.0.1", "not an IP address")])
def test_bad_train_hosts_are_one_line_before_anything_runs(tiny_model, tiny_task, tmp_path, hosts, message):
    res = subprocess.run(semievol("train", "--model", tiny_model, "--data", tiny_task, "--out", tmp_path / "o",
                                  "--train-hosts", hosts), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "o").exists()


def test_processes_with_different_data_refuse_to_train(tiny_model, tiny_task, tmp_path):
    # each rank reads its own copy of the data: rank 1's differs, so the average would mean nothing
    other = tmp_path / "other"
    other.mkdir()
    rows = (tiny_task / "labeled.csv").read_text().splitlines()
    (other / "labeled.csv").write_text("\n".join(rows[:-1]) + "\n")
    script = ("import os, sys; from semievol_local.cli import main; "
              f"sys.argv = ['semievol', 'train', '--model', {str(tiny_model)!r}, '--out', {str(tmp_path / 'o')!r}, "
              f"'--data', {str(tiny_task)!r} if os.environ['MLX_RANK'] == '0' else {str(other)!r}]; main()")
    res = launch(2, [sys.executable, "-c", script], timeout=300)
    # (mlx.launch itself exits 0 whatever its processes did: it reports their exit codes in warnings)
    assert re.search(r"rank \d exited with code 2", res.stderr), res.stdout + res.stderr  # whichever saw it first
    assert "differ between the processes" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "o" / "adapter.gguf").exists()

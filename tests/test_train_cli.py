"""`semievol train`, `adapter check` and `bench train` through the CLI on tiny models."""
import json
import sys

import pytest
from typer.testing import CliRunner

from semievol_local.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_then_check_then_eval_with_the_gguf_adapter(tiny_q4, tiny_task, tmp_path):
    out = tmp_path / "warm"
    res = invoke("train", "--model", tiny_q4, "--data", tiny_task, "--out", out, "--epochs", 2, "--batch-size", 4,
                 "--lr", "1e-3")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    for f in ("adapter.gguf", "adapters.safetensors", "adapter_config.json", "train_log.jsonl"):
        assert (out / f).is_file(), f
    assert "parity" in res.stdout and "kl_mean" in res.stdout
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == log[-1]["total_steps"] and all("loss" in r and "lr" in r for r in log)
    # the parity check on its own, as JSON
    res = invoke("adapter", "check", "--model", tiny_q4, "--adapter", out, "--data", tiny_task, "--json", tmp_path / "p.json")
    assert res.exit_code == 0, res.stderr
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["kl_mean"] < 0.1 and p["top1_agreement"] >= 0.9
    # llama.cpp serves adapter.gguf as it is
    res = invoke("eval", "--model", tiny_q4, "--data", tiny_task, "--adapter", out / "adapter.gguf", "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.stderr
    # training into a folder that holds an adapter needs --resume
    res = invoke("train", "--model", tiny_q4, "--data", tiny_task, "--out", out)
    assert res.exit_code == 2 and "--resume" in res.stderr


def test_adapter_check_needs_a_training_folder(tiny_q4, tmp_path):
    res = invoke("adapter", "check", "--model", tiny_q4, "--adapter", tmp_path)
    assert res.exit_code == 2 and "adapter.gguf" in res.stderr and "Traceback" not in res.stderr


def test_train_bad_data_is_one_line(tiny_q4, tmp_path):
    res = invoke("train", "--model", tiny_q4, "--data", tmp_path / "none", "--out", tmp_path / "o")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bench_train_reports_the_roofline(tiny_q4, tmp_path):
    res = invoke("bench", "train", "--model", tiny_q4, "--steps", 2, "--batch-size", 2, "--seq-len", 32,
                 "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.stderr
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["tokens_per_s"] > 0 and b["gemm_gflops"] > 0 and 0 < b["roofline_fraction"]
    assert b["lora_blocks"] == 2 and b["tokens_per_s_with_trunk"] == b["tokens_per_s"]  # all blocks: no trunk pass


def test_bench_train_with_fewer_blocks_charges_the_trunk_pass(tiny_q4, tmp_path):
    res = invoke("bench", "train", "--model", tiny_q4, "--steps", 3, "--batch-size", 2, "--seq-len", 32,
                 "--num-layers", 1, "--answer-len", 4, "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.stderr
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["lora_blocks"] == 1 and b["answer_len"] == 4 and b["trunk_seconds"] > 0
    assert b["tokens_per_s_with_trunk"] < b["tokens_per_s"]


@pytest.mark.parametrize("python, says", [("/no/such/python", "no such Python interpreter"),
                                          (sys.executable, "cannot import torch, transformers and peft")])
def test_bench_train_against_peft_needs_a_python_with_torch(tiny_q4, tmp_path, python, says):
    """The peer runs in its own environment; one without torch is named, with the command that fixes it,
    before any training starts."""
    res = invoke("bench", "train", "--model", tiny_q4, "--steps", 2, "--peft-python", python,
                 "--json", tmp_path / "b.json")
    assert res.exit_code == 2 and says in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("command", [["train"], ["bench", "pseudo-label"], ["bench", "sizes"], ["bench", "servers"]])
def test_in_process_commands_offer_no_server_options(command):
    """Commands that compute in this process (or start their own servers) do not offer --server: they would
    ignore it. `run` does offer it."""
    from typer.testing import CliRunner

    from semievol_local.cli import app

    res = CliRunner().invoke(app, [*command, "--server", "http://127.0.0.1:1"])
    assert res.exit_code == 2 and "no such option: --server" in (res.stdout + res.stderr)
    assert "--server " in CliRunner().invoke(app, ["run", "--help"]).stdout

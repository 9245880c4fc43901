"""Resumable training checkpoints (`training.checkpoint`, through `mlx_engine.train`): a resumed run equals an
uninterrupted one bit for bit; a damaged, half-written or differently configured checkpoint is refused or
skipped, never used as if it were whole."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from toyset import toy_cfg, toy_examples

from semievol_local.training import mlx_engine as me  # first: it loads OpenBLAS before mlx.core (blas.py)
from semievol_local.core.errors import UserError

import mlx.core as mx  # noqa: E402, I001  only after mlx_engine, or MLX keeps its reference BLAS for good


@pytest.fixture(scope="module")
def toy(tiny_q4):
    return toy_examples(tiny_q4)


class Interrupt(Exception):
    pass


def stop_at(step):
    def on_step(info):
        if info["step"] == step:
            raise Interrupt
    return on_step


def test_resumed_run_equals_uninterrupted_run(tiny_q4, toy, tmp_path):
    # dropout, gradient accumulation and validation all in play: every source of state must resume exactly
    cfg = toy_cfg(epochs=3, batch_size=2, grad_accum=2, dropout=0.1, save_every=2)
    whole = me.train(tiny_q4, toy, cfg, tmp_path / "whole", valid_examples=toy[:2])
    with pytest.raises(Interrupt):  # dies after step 3, one step past the step-2 checkpoint
        me.train(tiny_q4, toy, cfg, tmp_path / "cut", valid_examples=toy[:2], on_step=stop_at(3))
    resumed = me.train(tiny_q4, toy, cfg, tmp_path / "cut", valid_examples=toy[:2], resume=True)
    assert resumed["resumed_from"] == 2 and resumed["steps"] == whole["steps"] == 6
    a = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "whole") == losses(tmp_path / "cut")
    assert (tmp_path / "whole" / "adapter.gguf").read_bytes() == (tmp_path / "cut" / "adapter.gguf").read_bytes()


def flip_byte(ckpt):
    p = ckpt / "optimizer.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [
    (flip_byte, "corrupted: optimizer.safetensors"),                      # bit rot inside a file
    (lambda c: (c / "state.json").unlink(), "state.json is missing"),      # a file lost after writing
    (lambda c: (c / "checksums.json").unlink(), "no readable checksums.json"),  # the checksums themselves gone
])
def test_damaged_checkpoint_is_refused(tiny_q4, toy, tmp_path, damage, message):
    cfg = toy_cfg(epochs=1, save_every=1)
    me.train(tiny_q4, toy, cfg, tmp_path)
    latest = sorted((tmp_path / "checkpoints").iterdir())[-1]
    damage(latest)
    with pytest.raises(UserError, match=message):
        me.train(tiny_q4, toy, cfg, tmp_path, resume=True)


def test_half_written_checkpoint_is_ignored(tiny_q4, toy, tmp_path):
    # a crash during a checkpoint write leaves only a .tmp directory: resume uses the last complete one
    cfg = toy_cfg(epochs=1, save_every=1)
    me.train(tiny_q4, toy, cfg, tmp_path)
    shutil.copytree(tmp_path / "checkpoints" / "step-0000002", tmp_path / "checkpoints" / "step-0000003.tmp")
    (tmp_path / ".adapter.tmp-99999.gguf").write_bytes(b"half")  # an atomic write cut short
    assert me.train(tiny_q4, toy, cfg, tmp_path, resume=True)["resumed_from"] == 2
    assert not list(tmp_path.glob(".*tmp*")) and not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_resume_with_other_settings_is_refused(tiny_q4, toy, tmp_path):
    me.train(tiny_q4, toy, toy_cfg(epochs=1, save_every=1), tmp_path)
    with pytest.raises(UserError, match="lr: 0.001 -> 0.01"):
        me.train(tiny_q4, toy, toy_cfg(epochs=1, save_every=1, lr=1e-2), tmp_path, resume=True)

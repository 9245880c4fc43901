"""The real default model (SmolLM2-135M from PyPI). Marked slow; CI runs these too."""
import json

import pytest
from typer.testing import CliRunner

from semievol_local.cli import app
from semievol_local.method import models

pytestmark = pytest.mark.slow


def test_default_model_resolves_and_is_trainable(default_model):
    info = models.inspect(default_model)
    assert info.architecture == "llama" and info.block_count == 30 and info.chat_template
    assert 130e6 < info.n_params < 140e6
    assert info.quant_by_kind["attn_q"] == "Q4_1" and info.mlx_trainable.startswith("yes")


def test_fpb_eval_is_reproducible(default_model, shared_task, tmp_path):
    fpb = shared_task("fpb")
    accs = []
    for i in range(2):
        out = tmp_path / f"fpb{i}.json"
        res = CliRunner().invoke(app, ["eval", "--model", "smollm2-135m", "--data", str(fpb), "--limit", "20",
                                       "--json", str(out)])
        assert res.exit_code == 0, res.stderr
        accs.append(json.loads(out.read_text())["accuracy"])
    assert accs[0] == accs[1]
    assert 0.0 < accs[0] < 1.0


def test_demo_runs_the_whole_loop(default_model, tmp_path):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.stderr
    assert "SemiEvol" in res.stdout and "majority" in res.stdout and "consistency rate" in res.stdout
    rep = json.loads((tmp_path / "demo" / "report.json").read_text())
    acc = rep["accuracy"]
    # the demo's task is one SmolLM2 learns from its labeled rows: the fine-tunes beat the model as it is and
    # the majority class, and the pseudo-labels the run selected are mostly right
    assert acc["sft"] > max(acc["vanilla"], acc["majority"]) and acc["semievol"] > acc["majority"], acc
    assert rep["pseudo_labels"]["round1"]["accuracy_selected"] > 0.7, rep["pseudo_labels"]
    assert not any("loss jumped" in w for w in rep["warnings"]), rep["warnings"]  # the default lr trains smoothly

"""The estimate every run prints first (`semievol run --plan`): counted work equals the engines' own counts,
the plan names every stage, and --time-budget picks the unlabeled count or refuses in one line."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from semievol_local.cli import app
from semievol_local.core.config import EngineConfig, RunConfig, TrainConfig
from semievol_local.core.data import load_task
from semievol_local.core.errors import UserError
from semievol_local.engines.llama_engine import Engine
from semievol_local.method import collaboration, estimate, pipeline, workload
from semievol_local.method.estimate import Plan, Rates
from semievol_local.method.evaluate import evaluate
from semievol_local.method.workload import Stage, Tally, Work

TRAIN = ["--epochs", "1", "--batch-size", "4", "--save-every", "1", "--min-letter-mass", "0", "--force"]


def shapes_of(engine) -> Counter:
    return Counter({k: v for d in engine.decode_shapes.values() for k, v in d.items()})


def test_an_evaluation_is_counted_token_for_token(tiny_q4, tiny_task):
    # the tally walks the same prompt builder with the same prefix reuse: the llama.cpp engine's own counts
    split = load_task(tiny_task)["test"]
    eng = Engine(tiny_q4, EngineConfig(n_ctx=512))
    try:
        evaluate(eng, split, mode="score")
        tally = Tally(eng)
        evaluate(tally, split, mode="score")
        assert tally.shapes == shapes_of(eng) and tally.decodes == eng.decodes
        assert sum(tally.shapes.values()) > 10 * len(split.items)  # whole prompts, not just their last tokens
    finally:
        eng.close()


def test_collaboration_is_counted_token_for_token(tiny_q4, tiny_task):
    # one learner (no justification to assume): the tally's count is what the engine evaluated
    task = load_task(tiny_task)
    cfg = RunConfig(learners=1)
    learners = collaboration.learner_configs(cfg)
    labeled = task["labeled"].items
    eng = Engine(tiny_q4, EngineConfig(n_ctx=512))
    try:
        tally = Tally(eng)
        for i, it in enumerate(task["unlabeled"].items):
            demos = [labeled[(i + j) % len(labeled)] for j in range(3)]
            collaboration.collaborate_one(eng, it, demos, learners, "score", cfg, None)
            collaboration.collaborate_one(tally, it, demos, learners, "score", cfg, None)
        assert tally.shapes == shapes_of(eng)
    finally:
        eng.close()


def test_training_tokens_are_the_steps_tokens(tiny_q4, tiny_task, tmp_path):
    from semievol_local.method.finetune import train_adapter

    items = load_task(tiny_task)["labeled"].items
    cfg = TrainConfig(epochs=2.0, batch_size=4, save_every=100)
    eng = Engine(tiny_q4, EngineConfig(n_ctx=512))
    try:
        work, _ = workload._train_work(eng, items, cfg, n_blocks=2, trunk_ok=True)
        train_adapter(eng, items, cfg, tmp_path, check=False)
    finally:
        eng.close()
    steps = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert work.train_tokens == sum(s["tokens"] for s in steps)  # whole epochs: every example twice
    assert work.trunk_tokens == 0  # LoRA on both of the 2 blocks: no frozen pass


def toy_plan() -> Plan:
    """100 s of fixed work, then 2 s of collaboration and 0.5 s of fine-tune (half kept) per question."""
    rates = Rates(llama={(False, (0, 8)): 100.0}, train=10.0)
    stages = [Stage("warmup", "train", Work(train_tokens=1000)),
              Stage("round1/collaboration", "llama", Work(), Work(Counter({(0, 8): 200}))),
              Stage("round1/final", "train", Work(), Work(train_tokens=10), scale=lambda n: n * 0.5)]
    return Plan(stages, rates, n_unlabeled=1000, trunk_first=False, assumptions="")


def test_the_budget_picks_the_largest_count_that_fits():
    plan = toy_plan()
    assert plan.seconds(0) == 100 and plan.seconds(10) == 100 + 10 * 2.5
    assert estimate.fit_budget(plan, 350, "350s") == 100  # 100 + 2.5 x 100
    assert estimate.fit_budget(plan, 10_000, "3h") == 1000  # never more than there are
    with pytest.raises(UserError, match="too small; the warm-up and evaluations alone take about 1m40s"):
        estimate.fit_budget(plan, 101, "101s")


def test_each_llama_call_costs_its_measured_overhead_on_top_of_its_tokens():
    plan = toy_plan()
    plan.stages[1].each.decodes = 4  # 4 calls per question
    plan.rates.per_decode = 0.05
    assert plan.seconds(10) == pytest.approx(100 + 10 * (2.5 + 4 * 0.05))


def test_stages_with_an_adapter_take_the_rate_measured_with_one():
    plan = toy_plan()
    plan.stages[1].lora = True
    assert plan.seconds(10) == 100 + 10 * 2.5  # nothing measured with an adapter: the rate without
    plan.rates.llama[(True, (0, 8))] = 50.0
    assert plan.seconds(10) == 100 + 10 * (4 + 0.5)
    plan.stages[1].lora = False
    assert plan.seconds(10) == 100 + 10 * 2.5


def test_the_calibration_adapter_has_the_shape_training_gives(tiny_q4, tiny_task, tmp_path):
    """`random_adapter` (what the plan times llama.cpp's adapter stages with): the tensors, shapes and alpha of
    an adapter `semievol train` writes with the same options, and llama.cpp loads it and computes with it."""
    from semievol_local.core import adapter_gguf
    from semievol_local.method import finetune
    from semievol_local.training import mlx_engine

    for keys, layers in (("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", -1), ("q_proj,down_proj", 1)):
        tcfg = TrainConfig(epochs=1.0, batch_size=4, keys=keys, num_layers=layers, rank=4, val_fraction=0.0)
        out = tmp_path / f"t{layers}"
        eng = Engine(tiny_q4, EngineConfig(n_ctx=256), vocab_only=True)
        mlx_engine.train(tiny_q4, finetune.examples(eng, load_task(tiny_task)["labeled"].items), tcfg, out,
                         valid_examples=[])
        made = adapter_gguf.random_adapter(tmp_path / f"r{layers}.gguf", tiny_q4, keys, layers, 4, tcfg.scale)
        (meta_t, trained), (meta_r, rand) = (adapter_gguf.read_lora_gguf(f) for f in (out / "adapter.gguf", made))
        assert meta_t == meta_r
        assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in rand.items()}
    full = Engine(tiny_q4, EngineConfig(n_ctx=256))
    try:
        toks = full.tokenize("Answer: the quick brown fox")
        before = full.score(toks, 3).probs
        full.set_adapter(made)
        assert np.abs(full.score(toks, 3).probs - before).max() > 0  # loaded, and computed with
    finally:
        full.close()


def test_plan_names_every_stage_the_run_has(tiny_q4, tiny_task, tmp_path):
    cfg, tcfg = RunConfig(min_letter_mass=0.0, force=True), TrainConfig(epochs=1.0, batch_size=4, save_every=1)
    plan = estimate.plan(tiny_q4, tiny_task, cfg, tcfg, EngineConfig())
    rows = plan.at()
    assert plan.n_unlabeled == 20 and plan.rates.llama and plan.rates.train
    assert 0 <= plan.rates.per_decode < 1  # measured on a few labeled questions: milliseconds, not seconds
    assert "ms beyond its tokens" in plan.assumptions
    assert all(r.seconds is not None and r.seconds >= 0 for r in rows)
    busy = {r.stage: r for r in rows if r.tokens}
    assert set(busy) == {"warmup", "eval/vanilla", "eval/sft", "probe", "round1/collaboration", "round1/final",
                         "round1/eval"}
    assert busy["probe"].tokens < busy["eval/vanilla"].tokens * 3  # 20 unlabeled questions against 10 test ones
    assert busy["round1/collaboration"].tokens > busy["eval/vanilla"].tokens  # 4 learners with demonstrations
    assert plan.seconds(20) > plan.seconds(5) > plan.seconds(0)
    pipeline.run_semievol(tiny_q4, tiny_task, tmp_path / "run", cfg, tcfg)
    from semievol_local.method.report import build_report

    assert set(build_report(tmp_path / "run")["stages"]) == {r.stage for r in rows}


def test_run_plan_prints_the_estimate_and_writes_nothing(tiny_q4, tiny_task, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--model", str(tiny_q4), "--data", str(tiny_task), "--out", str(out),
                                   "--plan", *TRAIN])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert "estimate for 20 unlabeled questions" in res.stdout and "round1/collaboration" in res.stdout
    assert "estimated run:" in res.stdout and "assumed:" in res.stdout
    assert not out.exists()


@pytest.mark.parametrize("budget, message", [
    ("0", "give a duration above zero"),       # nothing to run in
    ("abc", "give a duration such as 45m"),     # not a duration
    ("0.01s", "too small; the warm-up and evaluations alone take about"),  # less than the warm-up alone
])
def test_bad_time_budgets_are_one_line_and_write_nothing(tiny_q4, tiny_task, tmp_path, budget, message):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--model", str(tiny_q4), "--data", str(tiny_task), "--out", str(out),
                                   "--time-budget", budget, *TRAIN])
    assert res.exit_code == 2 and message in res.stderr, (res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not out.exists()


def test_a_time_budget_limits_the_unlabeled_questions(tiny_q4, tiny_task, tmp_path):
    cfg, tcfg = RunConfig(min_letter_mass=0.0, force=True), TrainConfig(epochs=1.0, batch_size=4, save_every=1)
    plan = estimate.plan(tiny_q4, tiny_task, cfg, tcfg, EngineConfig())
    budget = (plan.seconds(0) + plan.seconds(8)) / 2 + 1e-3  # room for a few questions, not for 20
    want = estimate.fit_budget(plan, budget, "")
    assert 0 < want < 20
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--model", str(tiny_q4), "--data", str(tiny_task), "--out", str(out),
                                   "--time-budget", f"{budget * 2:.3f}s", "--plan", *TRAIN])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert "unlabeled questions fit" in res.stderr and "the run uses the first" in res.stderr

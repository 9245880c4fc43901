"""`semievol run` on tiny models: every stage, ablations, rounds, resume after kill -9, and no leakage."""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_rows, write_split

from semievol_local.config import RunConfig, TrainConfig
from semievol_local.pipeline import Learner, learner_configs, run_semievol

TRAIN = TrainConfig(epochs=1.0, batch_size=4, save_every=1)


def pseudo(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "pseudo_labels.jsonl").read_text().splitlines()]


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


@pytest.fixture(scope="module")
def full_run(tiny_q4, tmp_path_factory):
    """One uninterrupted run (CLI), shared by the tests that only read it."""
    from typer.testing import CliRunner

    from semievol_local.cli import app

    folder = tmp_path_factory.mktemp("task")
    write_split(folder / "labeled.csv", make_rows(12, 1))
    write_split(folder / "unlabeled.csv", make_rows(20, 2))
    write_split(folder / "test.csv", make_rows(10, 3))
    out = tmp_path_factory.mktemp("runs") / "full"
    args = ["run", "--model", str(tiny_q4), "--data", str(folder), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--save-every", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return folder, out, args, res


def test_every_stage_writes_sealed_outputs(full_run):
    folder, out, _, res = full_run
    for stage, files in [("warmup", ["adapter.gguf", "adapters.safetensors", "adapter_config.json", "train_log.jsonl"]),
                         ("round1/retrieval", ["neighbours.npy"]), ("round1/collaboration", ["collaboration.jsonl"]),
                         ("round1/selection", ["pseudo_labels.jsonl"]), ("round1/final", ["adapter.gguf"]),
                         ("eval/vanilla", ["eval.json"]), ("eval/sft", ["eval.json"]), ("round1/eval", ["eval.json"])]:
        m = json.loads((out / stage / "manifest.json").read_text())
        assert m["seconds"] >= 0 and m["peak_rss_mb"] > 0
        for f in files:
            assert (out / stage / f).is_file(), (stage, f)
    assert not list(out.rglob("*.partial*"))  # nothing half-written left behind
    rows = pseudo(out)
    assert len(rows) == 20 and {r["index"] for r in rows} == set(range(20))
    assert set(rows[0]) >= {"index", "pseudo_label", "entropy", "consistent", "selected"}
    assert all(r["pseudo_label"] in "ABC" for r in rows)
    # theta = 50%: about half are kept, exactly those at or below the median entropy
    ent = sorted(r["entropy"] for r in rows)
    assert sum(r["selected"] for r in rows) == sum(e <= ent[9] + 1e-12 for e in ent)
    rep = report(out)
    assert set(rep["accuracy"]) == {"majority", "vanilla", "sft", "semievol"}
    assert all(0 <= v <= 1 for v in rep["accuracy"].values())
    st = rep["pseudo_labels"]["round1"]
    assert st["n"] == 20 and 0 <= st["consistency_rate"] <= 1 and len(st["coverage_accuracy"]) == 10
    assert (out / "report.md").read_text().startswith("# SemiEvol run")
    assert (out / "plots" / "entropy_test.png").stat().st_size > 1000
    assert "SemiEvol" in res.stdout and "consistency rate" in res.stdout


def test_collaboration_records_learners_and_justifications(full_run):
    _, out, _, _ = full_run
    recs = [json.loads(ln) for ln in (out / "round1/collaboration/collaboration.jsonl").read_text().splitlines()]
    assert all(len(r["learners"]) == 4 for r in recs)
    for r in recs:
        letters = [ln["answer"] for ln in r["learners"]]
        assert r["consistent"] == (len(set(letters)) == 1)
        assert r["justified"] == (not r["consistent"])  # disagreement -> self-justification
        if r["consistent"]:
            assert r["pseudo_label"] == letters[0]


def test_running_again_reuses_every_stage(full_run, tiny_q4):
    folder, out, _, _ = full_run
    before = pseudo(out)
    stages = run_semievol(tiny_q4, folder, out, RunConfig(), TRAIN)
    assert all(s.reused for s in stages.values())
    assert pseudo(out) == before


def test_a_changed_option_reruns_only_what_depends_on_it(full_run, tiny_q4, tmp_path):
    folder, out, _, _ = full_run
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stages = run_semievol(tiny_q4, folder, copy, RunConfig(theta=30.0), TRAIN)
    reused = {k for k, s in stages.items() if s.reused}
    assert reused == {"warmup", "eval/vanilla", "eval/sft", "round1/retrieval", "round1/collaboration"}
    assert sum(r["selected"] for r in pseudo(copy)) < sum(r["selected"] for r in pseudo(out))


@pytest.mark.parametrize("flags,check", [
    # without in-weight propagation every learner is the base model
    (dict(iwp=False), lambda recs: all(ln["learner"].startswith("base") for r in recs for ln in r["learners"])),
    # without in-context propagation no learner gets demonstrations
    (dict(icp=False), lambda recs: all(ln["learner"].endswith("+0demo") for r in recs for ln in r["learners"])),
    # without collaborative learning: one learner, never a justification
    (dict(cl=False), lambda recs: all(len(r["learners"]) == 1 and not r["justified"] for r in recs)),
])
def test_ablation_flags(tiny_q4, tiny_task, tmp_path, flags, check):
    out = tmp_path / "abl"
    run_semievol(tiny_q4, tiny_task, out, RunConfig(**flags), TRAIN)
    recs = [json.loads(ln) for ln in (out / "round1/collaboration/collaboration.jsonl").read_text().splitlines()]
    assert check(recs)


def test_no_adaptive_selection_keeps_everything(tiny_q4, tiny_task, tmp_path):
    run_semievol(tiny_q4, tiny_task, tmp_path / "r", RunConfig(adaptive_selection=False), TRAIN)
    assert all(r["selected"] for r in pseudo(tmp_path / "r"))


def test_per_class_threshold_keeps_every_class():
    """fpb: every positive pseudo-label was less certain than the neutral ones, so one global percentile
    kept none of them; a percentile per pseudo-label class keeps theta% of each."""
    from semievol_local.selection import select

    labels = np.array(["B"] * 6 + ["C"] * 4)
    ent = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.5, 0.6, 0.7, 0.8])
    assert not select(ent, 50, groups=None)[labels == "C"].any()
    keep = select(ent, 50, groups=labels)
    assert keep.tolist() == [True] * 3 + [False] * 3 + [True] * 2 + [False] * 2
    only = np.array([True] * 3 + [False] * 3 + [True] * 4)  # justified only: the rest are all kept
    assert select(ent, 50, only=only, groups=labels).tolist() == [True, True, False] + [True] * 3 + [True] * 2 + [False] * 2
    assert select(ent, 100, groups=labels).all()


def test_threshold_option_changes_selection_only(full_run, tiny_q4, tmp_path):
    import shutil

    folder, out = full_run[0], full_run[1]
    copy = tmp_path / "per-class"
    shutil.copytree(out, copy)
    stages = run_semievol(tiny_q4, folder, copy, RunConfig(threshold="per-class"), TRAIN)
    assert {k for k, s in stages.items() if s.reused} == {
        "warmup", "eval/vanilla", "eval/sft", "round1/retrieval", "round1/collaboration"}
    rows = pseudo(copy)  # theta = 50% per pseudo-label class: in each, those at or below its median entropy
    for c in {r["pseudo_label"] for r in rows}:
        mine = [r for r in rows if r["pseudo_label"] == c]
        tau = np.percentile([r["entropy"] for r in mine], 50)
        assert [r["selected"] for r in mine] == [bool(r["entropy"] <= tau) for r in mine]
    with pytest.raises(Exception, match="--threshold 'both'"):
        run_semievol(tiny_q4, folder, tmp_path / "bad", RunConfig(threshold="both"), TRAIN)
    assert not (tmp_path / "bad").exists()


def test_final_fine_tune_has_its_own_lr_and_epochs(full_run, tiny_q4, tmp_path):
    import shutil

    folder, out = full_run[0], full_run[1]
    copy = tmp_path / "final-lr"
    shutil.copytree(out, copy)
    stages = run_semievol(tiny_q4, folder, copy, RunConfig(final_lr=1e-5, final_epochs=2.0), TRAIN)
    assert {k for k, s in stages.items() if not s.reused} == {"round1/final", "round1/eval"}
    train = stages["round1/final"].manifest["inputs"]["train"]
    assert (train["lr"], train["epochs"]) == (1e-5, 2.0)
    assert stages["warmup"].manifest["inputs"]["train"]["lr"] == TRAIN.lr


def test_report_says_why_pseudo_labels_are_unchecked(full_run, tmp_path):
    """Held-back answers that cannot be read leave the pseudo-label accuracy out, with the reason."""
    import shutil

    from semievol_local.report import build_report, to_markdown

    folder, out, _, _ = full_run
    data = _variant(folder, tmp_path / "task", lambda rows, h: ([{**r, "answer": "Z"} for r in rows], h))
    run = tmp_path / "run"
    shutil.copytree(out, run)
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "data": str(data)}))
    rep = build_report(run)
    assert rep["pseudo_labels"] == {} and "unlabeled.csv:2" in rep["pseudo_labels_unchecked"]
    assert "not reported" in to_markdown(rep)
    assert report(out)["pseudo_labels"]["round1"]["n"] == 20 and "pseudo_labels_unchecked" not in report(out)


def test_learner_configurations_are_drawn_from_the_paper_grid():
    ls = learner_configs(RunConfig(learners=8))
    assert len(set(ls)) == 8 and {ln.n_demos for ln in ls} == {0, 1, 2, 3} and {ln.warm for ln in ls} == {True, False}
    assert learner_configs(RunConfig(seed=1)) == learner_configs(RunConfig(seed=1))
    # one learner is the warm model with k demonstrations, whatever the seed: --no-cl removes only collaboration
    for seed in range(4):
        assert [ln.label() for ln in learner_configs(RunConfig(cl=False, seed=seed))] == ["warm+3demo"]
        assert learner_configs(RunConfig(learners=1, k=2, seed=seed)) == [Learner(True, 2)]
    assert [ln.label() for ln in learner_configs(RunConfig(cl=False, iwp=False))] == ["base+3demo"]
    assert [ln.label() for ln in learner_configs(RunConfig(cl=False, icp=False))] == ["warm+0demo"]


def test_rounds_grow_the_labeled_set(tiny_q4, tiny_task, tmp_path):
    out = tmp_path / "rounds"
    stages = run_semievol(tiny_q4, tiny_task, out, RunConfig(rounds=2), TRAIN)
    assert "round2/eval" in stages
    r1 = [json.loads(ln) for ln in (out / "round1/selection/pseudo_labels.jsonl").read_text().splitlines()]
    r2 = pseudo(out)  # the last round's
    chosen = {r["index"] for r in r1 if r["selected"]}
    assert {r["index"] for r in r2} == set(range(20)) - chosen  # round 2 works on what round 1 left
    from semievol_local.report import build_report

    assert len(build_report(out)["accuracy_by_round"]) == 2


def _variant(src: Path, dst: Path, change) -> Path:
    """A copy of a task whose unlabeled split is rewritten by `change(rows, header) -> (rows, header)`."""
    import shutil

    shutil.copytree(src, dst)
    with open(dst / "unlabeled.csv", newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        rows, header = list(r), list(r.fieldnames)
    rows, header = change(rows, header)
    with open(dst / "unlabeled.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows([{k: row[k] for k in header} for row in rows])
    return dst


def test_unlabeled_answers_and_metadata_never_reach_pseudo_labeling(tiny_q4, tiny_task, tmp_path):
    def drop_answers(rows, header):
        return rows, [h for h in header if h != "answer"]

    def shuffle_answers(rows, header):
        answers = [r["answer"] for r in rows]
        random.Random(7).shuffle(answers)
        return [{**r, "answer": a} for r, a in zip(rows, answers)], header

    def drop_metadata(rows, header):
        return rows, [h for h in header if h != "category"]

    base = tmp_path / "base"
    run_semievol(tiny_q4, tiny_task, base, RunConfig(), TRAIN)
    for name, change in [("no-answers", drop_answers), ("shuffled", shuffle_answers), ("no-meta", drop_metadata)]:
        task = _variant(tiny_task, tmp_path / f"task-{name}", change)
        out = tmp_path / name
        run_semievol(tiny_q4, task, out, RunConfig(), TRAIN)
        assert pseudo(out) == pseudo(base), name


def _run_cli(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "semievol_local.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def _kill_when(proc, predicate, timeout=120):
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if predicate():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


def test_resume_after_kill_9_gives_the_same_result(full_run, tmp_path):
    _, ref, args, _ = full_run
    out = tmp_path / "killed"
    args = [a if a != str(ref) else str(out) for a in args]
    collab = out / "round1" / ".collaboration.partial" / "collaboration.partial.jsonl"
    kills = [
        lambda: (out / ".warmup.partial" / "checkpoints").exists(),  # inside the warm-up's training
        lambda: collab.exists() and collab.read_text().count("\n") >= 5,  # halfway through collaboration
        lambda: (out / "round1" / ".final.partial" / ".clock.json").exists(),  # inside the final fine-tune (started)
    ]
    landed = [_kill_when(_run_cli(args), k) for k in kills]
    assert sum(landed) >= 2  # the stages are quick on a tiny model; at least two kills must land mid-run
    proc = _run_cli(args)
    assert proc.wait() == 0
    assert pseudo(out) == pseudo(ref)
    assert report(out)["accuracy"] == report(ref)["accuracy"]
    stages = report(out)["stages"]  # a killed stage's time covers its attempts
    for hit, name in zip(landed, ["warmup", "round1/collaboration", "round1/final"]):
        assert (stages[name]["attempts"] >= 2) == hit, name


def test_a_resumed_stage_counts_the_time_of_every_attempt(tmp_path, monkeypatch):
    from semievol_local import runfolder

    monkeypatch.setattr(runfolder, "CLOCK_EVERY", 0.05)
    run = runfolder.RunFolder(tmp_path)

    def crash(work):
        time.sleep(0.4)
        raise RuntimeError("killed")

    def finish(work):
        time.sleep(0.2)
        (work / "out.txt").write_text("done")

    with pytest.raises(RuntimeError):
        run.stage("s", {"a": 1}, crash)
    m = run.stage("s", {"a": 1}, finish).manifest
    assert m["attempts"] == 2 and 0.6 <= m["seconds"] < 5 and "untimed_attempts" not in m
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["inputs.json", "manifest.json", "out.txt"]
    m = run.stage("t", {"a": 2}, finish).manifest  # a stage built in one go
    assert m["attempts"] == 1 and 0.2 <= m["seconds"] < 0.6


def test_entropy_is_that_of_the_final_answer():
    """Selection ranks a pseudo-label by the uncertainty of the answer that became it: the justifier's
    where the learners disagreed (score: its option distribution; sample: its mean NLL), else the learners'."""
    import math

    from semievol_local.pipeline import label_entropy

    agreed = {"justified": False, "entropy": 0.3}
    assert label_entropy(agreed) == 0.3
    sure = {"justified": True, "entropy": 1.0, "justification": {"probs": [1.0, 0.0, 0.0]}}
    unsure = {"justified": True, "entropy": 0.2, "justification": {"probs": [1 / 3, 1 / 3, 1 / 3]}}
    assert label_entropy(sure) < 1e-6 and math.isclose(label_entropy(unsure), math.log(3))
    assert label_entropy({"justified": True, "entropy": 9.0, "justification": {"nll": 0.7, "text": "Answer: B"}}) == 0.7


def _eval(correct: list[bool]) -> dict:
    return {"predictions": [{"index": i, "correct": c} for i, c in enumerate(correct)]}


@pytest.mark.parametrize("first,second,only,p", [
    ([True] * 10, [True] * 10, (0, 0), 1.0),                      # same answers: no evidence either way
    ([True] * 8 + [False] * 2, [False] * 8 + [True] * 2, (8, 2), 0.109375),  # 8 vs 2 discordant: 2*P(X<=2), n=10
    ([True] * 6 + [False] * 4, [False] * 6 + [True] * 4, (6, 4), 772 / 1024),  # near balance: a large p
    ([True] * 5 + [False] * 5, [False] * 5 + [True] * 5, (5, 5), 1.0),     # balance: 2 * P(X <= 5) capped at 1
    ([True] * 12, [False] * 12, (12, 0), 2 / 2**12),              # one-sided: 2 * 0.5^12
])
def test_paired_comparison_is_an_exact_mcnemar_test(first, second, only, p):
    from semievol_local.report import paired

    got = paired(_eval(first), _eval(second))
    assert (got["only_first"], got["only_second"]) == only and got["n"] == len(first)
    assert got["p_value"] == pytest.approx(p)


def test_report_compares_semievol_and_sft_question_by_question(full_run):
    _, out, _, res = full_run
    pv = report(out)["semievol_vs_sft_paired"]
    assert pv["n"] == 10 and 0 <= pv["p_value"] <= 1
    assert f"SemiEvol alone right on {pv['only_first']}" in (out / "report.md").read_text()

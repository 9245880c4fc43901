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
from conftest import write_split, write_task

from semievol_local.core.config import RunConfig, TrainConfig
from semievol_local.core.errors import UserError
from semievol_local.method.collaboration import Learner, learner_configs
from semievol_local.method.pipeline import run_semievol

TRAIN = TrainConfig(epochs=1.0, batch_size=4, save_every=1)


def Run(**kw) -> RunConfig:
    """The tiny random models put little probability on the option letters, which the default selection
    refuses (see test_low_letter_mass_is_never_selected): these tests select by entropy alone. And they learn
    no task in one epoch, so their warm-up answers one option everywhere, which stops a run (see
    test_a_warm_up_that_learned_only_the_prior_stops_the_run): these tests go past the check."""
    return RunConfig(**{"min_letter_mass": 0.0, "force": True, **kw})


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
    write_task(folder)
    out = tmp_path_factory.mktemp("runs") / "full"
    args = ["run", "--model", str(tiny_q4), "--data", str(folder), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--save-every", "1", "--min-letter-mass", "0", "--force"]
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
    stages = run_semievol(tiny_q4, folder, out, Run(), TRAIN)
    assert all(s.reused for s in stages.values())
    assert pseudo(out) == before


def test_a_changed_option_reruns_only_what_depends_on_it(full_run, tiny_q4, tmp_path):
    folder, out, _, _ = full_run
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stages = run_semievol(tiny_q4, folder, copy, Run(theta=30.0), TRAIN)
    reused = {k for k, s in stages.items() if s.reused}
    assert reused == {"warmup", "eval/vanilla", "eval/sft", "probe", "round1/retrieval", "round1/collaboration"}
    assert sum(r["selected"] for r in pseudo(copy)) < sum(r["selected"] for r in pseudo(out))


def _records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "round1/collaboration/collaboration.jsonl").read_text().splitlines()]


def _adapters_used(recs: list[dict]) -> set[str]:
    """Which models answered or justified: 'warm' or 'base', from the learners' labels and the justifier's."""
    used = {ln["learner"].split("+")[0] for r in recs for ln in r["learners"]}
    return used | {r["justification"]["adapter"] for r in recs if r.get("justification")}


# Each ablation of the paper's Table 2 removes what it names and nothing else: the stages it cannot touch are
# the full run's own (copied, not re-run), and the records show the removed part gone and the rest in place.
@pytest.mark.parametrize("flags,changed,check", [
    # w/o IWP: no M_warm anywhere in pseudo-labeling, the self-justifier included; demonstrations stay
    (dict(iwp=False), {"round1/collaboration"},
     lambda recs: _adapters_used(recs) == {"base"} and any(r.get("justification") for r in recs)
     and any(not ln["learner"].endswith("+0demo") for r in recs for ln in r["learners"])),
    # w/o ICP: no learner gets demonstrations (retrieval keeps none); M_warm still answers and justifies
    (dict(icp=False), {"round1/retrieval", "round1/collaboration"},
     lambda recs: all(ln["learner"].endswith("+0demo") for r in recs for ln in r["learners"])
     and "warm" in _adapters_used(recs)),
    # w/o CL: one learner (M_warm with k demonstrations), never a justification
    (dict(cl=False), {"round1/collaboration"},
     lambda recs: all([ln["learner"] for ln in r["learners"]] == ["warm+3demo"] and not r["justified"] for r in recs)),
    # w/o AS: the full run's pseudo-labels, every one kept
    (dict(adaptive_selection=False), {"round1/selection"}, None),
])
def test_each_ablation_changes_only_what_it_names(full_run, tiny_q4, tmp_path, flags, changed, check):
    folder, full = full_run[0], full_run[1]
    out = tmp_path / "abl"
    stages = run_semievol(tiny_q4, folder, out, Run(**flags), TRAIN, share=(full,))
    rerun = {k for k, st in stages.items() if not st.reused}
    # downstream of a changed stage: re-run when its input changed (the selected rows, the records), else reused
    downstream = {"round1/selection", "round1/final", "round1/eval"}
    assert changed <= rerun <= changed | downstream, rerun
    if check is not None:
        assert check(_records(out))
    else:
        assert all(r["selected"] for r in pseudo(out)) and _records(out) == _records(full)


def test_no_adaptive_selection_keeps_everything(tiny_q4, tiny_task, tmp_path):
    run_semievol(tiny_q4, tiny_task, tmp_path / "r", Run(adaptive_selection=False), TRAIN)
    assert all(r["selected"] for r in pseudo(tmp_path / "r"))


def test_threshold_option_changes_selection_only(full_run, tiny_q4, tmp_path):
    import shutil

    folder, out = full_run[0], full_run[1]
    copy = tmp_path / "per-class"
    shutil.copytree(out, copy)
    stages = run_semievol(tiny_q4, folder, copy, Run(threshold="per-class"), TRAIN)
    reused = {k for k, s in stages.items() if s.reused}
    assert {"warmup", "eval/vanilla", "eval/sft", "round1/retrieval", "round1/collaboration"} <= reused
    assert "round1/selection" not in reused  # the final fine-tune re-runs only if the selected rows differ
    assert ("round1/final" in reused) == ([r["selected"] for r in pseudo(copy)] == [r["selected"] for r in pseudo(out)])
    rows = pseudo(copy)  # theta = 50% per pseudo-label class: in each, those at or below its median entropy
    for c in {r["pseudo_label"] for r in rows}:
        mine = [r for r in rows if r["pseudo_label"] == c]
        tau = np.percentile([r["entropy"] for r in mine], 50)
        assert [r["selected"] for r in mine] == [bool(r["entropy"] <= tau) for r in mine]
    with pytest.raises(Exception, match="--threshold 'both'"):
        run_semievol(tiny_q4, folder, tmp_path / "bad", Run(threshold="both"), TRAIN)
    assert not (tmp_path / "bad").exists()


def test_final_fine_tune_has_its_own_lr_and_epochs(full_run, tiny_q4, tmp_path):
    import shutil

    folder, out = full_run[0], full_run[1]
    copy = tmp_path / "final-lr"
    shutil.copytree(out, copy)
    stages = run_semievol(tiny_q4, folder, copy, Run(final_lr=1e-5, final_epochs=2.0), TRAIN)
    assert {k for k, s in stages.items() if not s.reused} == {"round1/final", "round1/eval"}
    train = stages["round1/final"].manifest["inputs"]["options"]
    assert (train["lr"], train["epochs"]) == (1e-5, 2.0)
    assert TRAIN.lr == 0 and stages["warmup"].manifest["inputs"]["options"]["lr"] == 3e-4  # llama's family rate


def test_report_says_why_pseudo_labels_are_unchecked(full_run, tmp_path):
    """Held-back answers that cannot be read leave the pseudo-label accuracy out, with the reason."""
    import shutil

    from semievol_local.method.report import build_report, to_markdown

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
    stages = run_semievol(tiny_q4, tiny_task, out, Run(rounds=2), TRAIN)
    assert "round2/eval" in stages
    r1 = [json.loads(ln) for ln in (out / "round1/selection/pseudo_labels.jsonl").read_text().splitlines()]
    r2 = pseudo(out)  # the last round's
    chosen = {r["index"] for r in r1 if r["selected"]}
    assert {r["index"] for r in r2} == set(range(20)) - chosen  # round 2 works on what round 1 left
    from semievol_local.method.report import build_report

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

    def answer_in_words(rows, header):  # like fpb's `gt`: the answer spelled out in another column
        return [{**r, "gt": json.loads(r["options"])["ABC".index(r["answer"])]} for r in rows], header + ["gt"]

    base = tmp_path / "base"
    run_semievol(tiny_q4, tiny_task, base, Run(), TRAIN)
    for name, change in [("no-answers", drop_answers), ("shuffled", shuffle_answers), ("no-meta", drop_metadata),
                         ("answer-in-words", answer_in_words)]:
        task = _variant(tiny_task, tmp_path / f"task-{name}", change)
        out = tmp_path / name
        run_semievol(tiny_q4, task, out, Run(), TRAIN)
        assert pseudo(out) == pseudo(base), name
        assert _records(out) == _records(base), name


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
    from semievol_local.core import runfolder

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

    from semievol_local.method.collaboration import label_entropy

    agreed = {"justified": False, "entropy": 0.3}
    assert label_entropy(agreed) == 0.3
    sure = {"justified": True, "entropy": 1.0, "justification": {"probs": [1.0, 0.0, 0.0]}}
    unsure = {"justified": True, "entropy": 0.2, "justification": {"probs": [1 / 3, 1 / 3, 1 / 3]}}
    assert label_entropy(sure) < 1e-6 and math.isclose(label_entropy(unsure), math.log(3))
    assert label_entropy({"justified": True, "entropy": 9.0, "justification": {"nll": 0.7, "text": "Answer: B"}}) == 0.7


def test_report_waits_for_no_writer(full_run):
    """`report` writes report.json/md into the run folder: not while another command holds the folder."""
    from semievol_local.core.runfolder import exclusive
    from semievol_local.method.report import build_report

    out = full_run[1]
    with exclusive(out):  # a second open of the lock file conflicts, as another process would
        with pytest.raises(UserError, match="in use by another semievol command"):
            build_report(out)
    assert build_report(out)["accuracy"] == report(out)["accuracy"]  # and once it is free, as before


def test_report_compares_semievol_and_sft_question_by_question(full_run):
    _, out, _, res = full_run
    pv = report(out)["semievol_vs_sft_paired"]
    assert pv["n"] == 10 and 0 <= pv["p_value"] <= 1
    assert f"SemiEvol alone right on {pv['only_first']}" in (out / "report.md").read_text()


# --- what a stage's identity is, low letter mass, prompts that did not fit, one writer per run folder ----------

def test_low_letter_mass_is_never_selected(full_run, tiny_q4, tmp_path):
    """The tiny random model puts little of its probability on the option letters: however peaked the
    renormalised distribution, adaptive selection keeps none of those (the default floor, 0.5)."""
    import shutil

    folder, out = full_run[0], full_run[1]
    copy = tmp_path / "floor"
    shutil.copytree(out, copy)
    stages = run_semievol(tiny_q4, folder, copy, RunConfig(force=True), TRAIN)
    assert not stages["round1/selection"].reused and stages["round1/collaboration"].reused
    rows = pseudo(copy)
    assert all(r["letter_mass"] < 0.5 for r in rows) and not any(r["selected"] for r in rows)
    assert sum(r["selected"] for r in pseudo(out)) > 0  # with the floor at 0 the same records were selected
    from semievol_local.method.report import build_report

    st = build_report(copy)["pseudo_labels"]["round1"]
    assert st["low_letter_mass"] == 20 and st["min_letter_mass"] == 0.5


def test_options_that_cannot_change_outputs_rerun_nothing(full_run, tiny_q4, tmp_path):
    """Checkpoint cadence, gradient checkpointing, threads and GPU layers are no stage's identity."""
    import dataclasses
    import shutil

    from semievol_local.core.config import EngineConfig, TrainConfig, identity

    folder, out = full_run[0], full_run[1]
    copy = tmp_path / "inert"
    shutil.copytree(out, copy)
    from semievol_local.engines.weights import inference_weights

    tcfg = dataclasses.replace(TRAIN, save_every=7, grad_checkpoint=True)
    # `auto` measures which weights are faster per thread count: on a busy machine 1 thread may pick the other
    # one, a real change of weights; the run's own pick, named, keeps the weights and changes only the threads
    kind = inference_weights(tiny_q4, EngineConfig()).kind
    stages = run_semievol(tiny_q4, folder, copy, Run(rounds=1), tcfg,
                          EngineConfig(n_threads=1, n_gpu_layers=0, weights=kind))
    assert all(st.reused for st in stages.values()), [k for k, st in stages.items() if not st.reused]
    for stage in ("train", "collaboration", "eval"):
        assert not {"save_every", "grad_checkpoint", "n_threads", "n_gpu_layers"} & set(
            identity(stage, TrainConfig(), EngineConfig()))


def test_context_size_is_part_of_what_it_changes(full_run, tiny_q4, tmp_path):
    """--n-ctx decides which demonstrations fit and where a prompt is cut, so pseudo-labeling and the
    evaluations depend on it; training does not (and --adapter-scale likewise)."""
    import shutil

    from semievol_local.core.config import EngineConfig

    folder, out = full_run[0], full_run[1]
    for name, ecfg in (("ctx", EngineConfig(n_ctx=1024)), ("scale", EngineConfig(adapter_scale=0.5))):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        stages = run_semievol(tiny_q4, folder, copy, Run(), TRAIN, ecfg)
        rerun = {k for k, st in stages.items() if not st.reused}
        assert {"round1/collaboration", "eval/vanilla", "eval/sft", "round1/eval"} <= rerun, (name, rerun)
        assert not rerun & {"warmup", "round1/retrieval"}, (name, rerun)


def test_prompts_that_did_not_fit_are_recorded(tiny_q4):
    """Demonstrations dropped, a question cut, a justification asked without its candidates: each is in the
    record, and the justifier decodes greedily even when it falls back to the plain question."""
    import dataclasses

    from semievol_local.core.config import EngineConfig
    from semievol_local.core.data import Item
    from semievol_local.engines.llama_engine import load
    from semievol_local.method.collaboration import ask_learner
    from semievol_local.method.stages import prompt_counts

    engine = load(tiny_q4, EngineConfig(n_ctx=256))
    opts = ("red", "blue", "green")  # the tiny tokenizer: ~175 tokens for this question, ~400 with 3 examples
    item = Item(index=0, question="Which option is right? " + "Some context. " * 3, options=opts, answer=None)
    demo = dataclasses.replace(item, answer="A")
    cfg = Run(max_tokens=4)
    rec = ask_learner(engine, item, [demo] * 3, "score", cfg, 1, None)
    assert rec["demos_dropped"] >= 1 and 0 < rec["letter_mass"] <= 1
    cands = [f"Answer: {c} ({o})" for c, o in zip("ABCA", opts + opts[:1])]
    j = ask_learner(engine, item, [], "score", cfg, 1, None, justify=cands)
    assert j.get("justify_fallback") is True
    texts = {ask_learner(engine, item, [], "sample", cfg, seed, None, justify=cands * 3)["text"] for seed in (1, 2, 3)}
    assert len(texts) == 1  # greedy: the seed changes nothing
    long_item = dataclasses.replace(item, question="word " * 400)
    assert ask_learner(engine, long_item, [], "score", cfg, 1, None).get("question_truncated") is True
    recs = [{"learners": [rec], "justification": j}, {"learners": [{}]}]
    assert prompt_counts(recs) == {"demos_dropped": 1, "question_truncated": 0, "justify_fallback": 1}


def test_one_writer_per_run_folder(tiny_q4, tiny_task, tmp_path):
    """A second command on a folder another process holds stops with one line naming that process; kill -9
    of the holder leaves no stale lock."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from semievol_local.core.runfolder import exclusive\n"
        "with exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"), str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run([sys.executable, "-m", "semievol_local.cli", "run", "--model", str(tiny_q4), "--data",
                              str(tiny_task), "--out", str(out)], capture_output=True, text=True, timeout=300)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert f"PID {holder.pid}" in lines[0] and str(out) in lines[0]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the second command wrote nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    from semievol_local.core.runfolder import exclusive

    with exclusive(out):  # the kernel dropped the dead holder's lock
        pass


def test_open_answer_demo_runs_in_sample_mode(tiny_q4, tmp_path):
    """The shipped open-answer demo (the reviews answered with the word) runs the generative recipe end to
    end, and its pseudo-labels are scored as eval scores open answers (normalized text, numbers within 1%)."""
    from semievol_local.core.data import load_heldout, load_task
    from semievol_local.core.prompts import answers_match
    from semievol_local.method.demo_task import DEMO_OPEN_RUN, demo_folder, make_open_rows
    from semievol_local.method.report import build_report, pseudo_label_stats

    folder = demo_folder(open_answers=True)
    task = load_task(folder)
    assert not any(it.closed for s in task.splits.values() for it in s.items)
    assert [it.answer for it in task["test"].items] == [r["answer"] for r in make_open_rows()["test"]]
    small = tmp_path / "demo-open"  # its first rows: the tiny model's tokens are characters, so it trains slowly
    for split, n in (("labeled", 16), ("unlabeled", 4), ("test", 3)):
        write_split(small / f"{split}.csv", make_open_rows()[split][:n])
    out = tmp_path / "open"
    run_semievol(tiny_q4, small, out, DEMO_OPEN_RUN, TRAIN)
    rep = build_report(out)
    assert rep["mode"] == "sample"
    recs = [json.loads(x) for x in (out / "round1/collaboration/collaboration.jsonl").read_text().splitlines()]
    assert all(a["n_tokens"] <= 12 for r in recs for a in r["learners"])
    held = dict(enumerate(load_heldout(small / "unlabeled.csv")))
    ok = [answers_match(r["pseudo_label"], held[r["index"]].answer, closed=False) for r in pseudo(out)]
    assert rep["pseudo_labels"]["round1"]["accuracy_all"] == pytest.approx(np.mean(ok))
    # the same rule as eval, not string equality
    from semievol_local.core.data import Item

    gold = {0: Item(0, "q", (), "Paris"), 1: Item(1, "q", (), "42"), 2: Item(2, "q", (), "42")}
    recs = [{"index": 0, "pseudo_label": "paris.", "consistent": True, "selected": True, "entropy": 0.1},
            {"index": 1, "pseudo_label": "42.2", "consistent": True, "selected": True, "entropy": 0.2},
            {"index": 2, "pseudo_label": "43", "consistent": True, "selected": True, "entropy": 0.3}]
    assert pseudo_label_stats(recs, gold)["accuracy_all"] == pytest.approx(2 / 3)


def test_a_warm_up_that_learned_only_the_prior_stops_the_run(tiny_q4, tmp_path):
    """A task built to collapse: every question is the same text, so the model can only learn the labeled
    split's prior (70% A), and answers one option on every unlabeled question. The run stops after the probe,
    before collaboration, with one line and exit code 3, and keeps what it finished; --force goes on, and the
    report says what it saw. The unlabeled answers (all C) take no part."""
    from typer.testing import CliRunner

    from semievol_local.cli import app

    def rows(answers):
        return [{"question": "Which option?", "options": ["red", "blue", "green"], "answer": a} for a in answers]

    task = tmp_path / "task"
    write_split(task / "labeled.csv", rows("A" * 14 + "B" * 3 + "C" * 3))
    write_split(task / "unlabeled.csv", rows("C" * 20))
    write_split(task / "test.csv", rows("ABC" * 3 + "A"))
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_q4), "--data", str(task), "--out", str(out), "--epochs", "2", "--batch-size",
            "4", "--min-letter-mass", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 3, (res.stdout, res.stderr)
    line = res.stderr.strip().splitlines()[-1]
    assert "unlabeled questions" in line and "70%" in line and "--force" in line, line
    assert "Traceback" not in res.stderr
    probe = json.loads((out / "probe" / "probe.json").read_text())
    assert probe["collapsed"] and probe["n"] == 20 and probe["top_share"] == 1.0
    assert probe["labeled"] == {"A": 0.7, "B": 0.15, "C": 0.15}
    assert (out / "warmup" / "adapter.gguf").is_file() and (out / "eval" / "sft" / "eval.json").is_file()
    assert not (out / "round1").exists()
    assert "answers by option" in res.stdout
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, (forced.stdout, forced.stderr)
    rep = report(out)
    assert rep["stages"]["warmup"] and rep["stages"]["probe"]  # kept, and reused by the forced run
    assert any("collapsed" in w and "--force" in w for w in rep["warnings"]), rep["warnings"]
    assert rep["classes"]["labeled split"] == {"A": 0.7, "B": 0.15, "C": 0.15}
    assert rep["classes"]["probe (warm model, unlabeled)"][probe["top"]] == 1.0
    assert "## Answers by option" in (out / "report.md").read_text()


def test_force_is_refused_where_there_is_no_collapse_check(tiny_q4, tiny_task):
    from typer.testing import CliRunner

    from semievol_local.cli import app

    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_q4), "--data", str(tiny_task), "--force"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "--force" in res.stderr, res.stderr


def test_report_warns_of_a_rolled_back_fine_tune(tmp_path):
    from semievol_local.method.report import warnings

    stages = {"warmup": {"figures": {"rollbacks": 2, "rollback_steps": "step 3: loss 17 against 2.06, then lr x0.5"}},
              "round1/train": {"figures": {"rollbacks": 0, "rollback_steps": ""}}}
    said = warnings(tmp_path, stages, None, None, {})
    assert len(said) == 1 and said[0].startswith("warmup: the training loss jumped") and "2 time(s)" in said[0]

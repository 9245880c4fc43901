"""Benchmarks at tiny size: `bench quality` (shared stages), `bench pseudo-label`, `bench run` (FLOPs counted against
float32 GEMM), `bench train`'s count, `bench publish`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_rows, write_split
from typer.testing import CliRunner

from semievol_local.bench import results, runners, whole_run
from semievol_local.cli import app
from semievol_local.core.config import RunConfig
from semievol_local.core.errors import UserError

# the tiny random models put little probability on the letters: select by entropy alone (test_pipeline)
TINY_TRAIN = ["--epochs", "1", "--batch-size", "4", "--save-every", "100", "--min-letter-mass", "0"]
# the tiny random models learn no task in one epoch: their warm-up answers one option everywhere, which the
# collapse check stops a run for (test_pipeline shows it); the benchmarks that run the pipeline go past it
TINY_RUN = [*TINY_TRAIN, "--force"]
# the tiny model's weights (conftest): a block's q, o (64 x 64), k, v (64 x 32: 2 of 4 heads) and MLP (3 of 64 x 128);
# the vocabulary projection, 290 tokens x 64
TINY_BLOCK, TINY_VOCAB = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128, 290 * 64


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench") / "colours"
    write_split(folder / "labeled.csv", make_rows(12, 1))
    write_split(folder / "unlabeled.csv", make_rows(10, 2))
    write_split(folder / "test.csv", make_rows(8, 3))
    return folder


def test_plan_shares_identical_variants():
    plan = runners.quality_plan([Path("a"), Path("b")], list(runners.SUITES), RunConfig())
    folders = {(v.table, v.row): (v.data.name, v.folder) for v in plan}
    # the full method, n = 4 and theta = 50% are one and the same run of the first task
    assert folders[("ablation", "full")] == folders[("sensitivity", "n=4")] == folders[("sensitivity", "theta=50%")] \
        == folders[("main", "a")] == ("a", "full")
    assert folders[("main", "b")] == ("b", "full")
    assert folders[("ablation", "w/o IWP")] == ("a", "iwp-False")
    assert folders[("sensitivity", "theta=30%")] == ("a", "theta-30.0")
    assert folders[("rounds", "rounds")] == ("a", "rounds-2")
    # baselines: SemiEvol is the full run, "all pseudo-labels" is the w/o AS ablation; two runs of their own
    assert folders[("baselines", "SemiEvol")] == ("a", "full")
    assert folders[("baselines", "labeled + all pseudo-labels")] == folders[("ablation", "w/o AS")]
    assert folders[("baselines", "fixed entropy threshold")] == ("a", "selection-fixed")
    # headline (the table --seeds repeats): three runs the other suites already make
    assert folders[("headline", "SemiEvol")] == ("a", "full")
    assert folders[("headline", "self-consistency (LMSI-style vote)")] == \
        folders[("baselines", "self-consistency (LMSI-style vote)")]
    assert folders[("headline", "w/o ICP")] == folders[("ablation", "w/o ICP")]
    assert len(set(folders.values())) == 14
    with pytest.raises(UserError, match="--suite 'tables'"):
        runners.quality_plan([Path("a")], ["tables"], RunConfig())


@pytest.fixture(scope="module")
def quality(tiny_q4, task, tmp_path_factory):
    out = tmp_path_factory.mktemp("qruns")
    js = out / "quality.json"
    res = CliRunner().invoke(app, ["bench", "quality", "--model", str(tiny_q4), "--data", str(task), "--out", str(out),
                                   "--suite", "main", "--suite", "ablation", "--suite", "rounds",
                                   "--json", str(js), *TINY_RUN])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return out / task.name, json.loads(js.read_text()), res


def test_quality_tables(quality):
    _, r, res = quality
    t = r["tables"]
    assert [row["task"] for row in t["main"]] == ["colours"]
    assert [row["variant"] for row in t["ablation"]] == ["SFT (no pseudo-labels)"] + [name for name, _ in runners.ABLATIONS]
    assert t["ablation"][0]["accuracy"] == t["main"][0]["sft"] and t["ablation"][0]["selected"] is None
    ablation = t["ablation"][1:]
    assert [row["round"] for row in t["rounds"]] == [0, 1, 2]
    assert t["rounds"][0]["accuracy"] == t["main"][0]["sft"]
    for row in t["main"] + ablation:
        for k in ("majority", "vanilla", "sft", "semievol", "accuracy"):
            if k in row:
                assert 0.0 <= row[k] <= 1.0
    # without adaptive selection every pseudo-label is kept; with it, about half (theta = 50%)
    sel = {row["variant"]: row["selected"] for row in ablation}
    assert sel["w/o AS"] == 10 and sel["full"] < 10
    # each ablation is compared with the full run question by question; the full row has no such p
    p = {row["variant"]: row["p_vs_full"] for row in ablation}
    assert p["full"] is None and all(0.0 < p[v] <= 1.0 for v in p if v != "full")
    assert [row["selected"] for row in t["rounds"]][:2] == [None, sel["full"]]
    # the main run's pseudo-labels, checked against the held-back answers
    (pl,) = t["pseudo_labels"]
    assert pl["task"] == "colours" and pl["questions"] == 10 and pl["selected"] == sel["full"]
    assert pl["accuracy_selected"] == ablation[0]["pseudo_label_accuracy_selected"]
    assert 0.0 <= pl["consistency_rate"] <= 1.0 and 0.0 <= pl["accuracy_all"] <= 1.0
    assert {s["stage"] for s in t["whole_run"]} >= {"warmup", "round1/collaboration", "round1/final"}
    assert r["whole_run"]["seconds"] > 0 and r["whole_run"]["peak_rss_mb"] > 0
    assert r["machine"]["cores"] >= 1 and r["command"].startswith("semievol bench quality")
    assert "Ablations" in res.stdout and "w/o ICP" in res.stdout


def test_quality_variants_reuse_shared_stages(quality):
    runs, _, _ = quality

    def manifest(folder, stage):
        return json.loads((runs / folder / stage / "manifest.json").read_text())

    # a stage whose inputs a flag does not touch is copied from the full run, not trained or run again
    for folder in ("iwp-False", "icp-False", "cl-False", "adaptive_selection-False", "rounds-2"):
        assert manifest(folder, "warmup") == manifest("full", "warmup"), folder
        assert manifest(folder, "eval/vanilla") == manifest("full", "eval/vanilla"), folder
    # w/o AS changes selection only: its collaboration is the full run's; w/o ICP re-runs retrieval
    assert manifest("adaptive_selection-False", "round1/collaboration") == manifest("full", "round1/collaboration")
    assert manifest("adaptive_selection-False", "round1/selection") != manifest("full", "round1/selection")
    assert manifest("icp-False", "round1/retrieval") != manifest("full", "round1/retrieval")
    assert manifest("rounds-2", "round1/final") == manifest("full", "round1/final")
    assert not list(runs.rglob(".*.copy"))


def test_one_learner_is_the_run_without_collaboration(quality, tiny_q4, task):
    """n = 1 (sensitivity) and w/o CL (ablation) are one learner without self-justification: one stage."""
    runs, _, _ = quality
    from semievol_local.core.config import TrainConfig
    from semievol_local.method import pipeline

    tcfg = TrainConfig(epochs=1.0, batch_size=4, save_every=100)  # as the CLI parses TINY_TRAIN
    pipeline.run_semievol(tiny_q4, task, runs / "learners-1", RunConfig(learners=1, min_letter_mass=0.0, force=True),
                          tcfg, share=(runs / "cl-False",))
    for stage in ("warmup", "round1/collaboration", "round1/final", "round1/eval"):
        a, b = (json.loads((runs / f / stage / "manifest.json").read_text()) for f in ("learners-1", "cl-False"))
        assert a == b, stage
    recs = [json.loads(x) for x in (runs / "learners-1" / "pseudo_labels.jsonl").read_text().splitlines()]
    assert not any(r["justified"] for r in recs)


def test_sensitivity_table(quality, tiny_q4, task, tmp_path):
    """n in {1, 2, 4} and theta in {30, 50, 80, 100}%: n = 4 and theta = 50% are the full run, and the whole-run
    figures are the full run's, not those of the plan's first row (n = 1)."""
    runs, _, _ = quality
    js = tmp_path / "sensitivity.json"
    res = CliRunner().invoke(app, ["bench", "quality", "--model", str(tiny_q4), "--data", str(task),
                                   "--out", str(runs.parent), "--suite", "sensitivity", "--json", str(js), *TINY_RUN])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    out, r = json.loads(js.read_text()), json.loads((runs / "full" / "report.json").read_text())
    rows = {row["variant"]: row for row in out["tables"]["sensitivity"]}
    assert list(rows) == ["SFT (no pseudo-labels)", "n=1", "n=2", "n=4", "theta=30%", "theta=50%", "theta=80%",
                          "theta=100%"]
    assert rows["n=4"]["accuracy"] == rows["theta=50%"]["accuracy"] == r["accuracy"]["semievol"]
    assert rows["n=4"]["p_vs_full"] is None and rows["theta=30%"]["p_vs_full"] is not None
    # theta is the share of pseudo-labels kept (lowest entropy first): 30% <= 50% <= 80% <= 100% = all 10
    kept = [rows[f"theta={t}%"]["selected"] for t in (30, 50, 80, 100)]
    assert kept == sorted(kept) and kept[-1] == 10 and kept[0] < kept[-1]
    assert out["whole_run"]["seconds"] == round(sum(s["seconds"] for s in r["stages"].values()), 1)
    assert len(out["tables"]["whole_run"]) == len(r["stages"])


def test_pseudo_label_bench(tiny_q4, task, tmp_path):
    js = tmp_path / "pl.json"
    res = CliRunner().invoke(app, ["bench", "pseudo-label", "--model", str(tiny_q4), "--data", str(task), "--n-items", "4",
                                   "--sample-tokens", "6", "--out", str(tmp_path / "pl"), "--json", str(js), *TINY_TRAIN])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    r = json.loads(js.read_text())
    from semievol_local.core.data import find_split_file, load_heldout
    from semievol_local.core.prompts import answers_match

    held = load_heldout(find_split_file(task, "unlabeled"))
    for mode in ("sample", "score"):
        recs = [json.loads(line) for line in (tmp_path / "pl" / f"{mode}.jsonl").read_text().splitlines()]
        assert len(recs) == 4 and r[mode]["questions_per_s"] * r[mode]["seconds"] == pytest.approx(4)
        # the figures are the records' own, checked against the held-back answers (which no record holds)
        ok = [answers_match(x["pseudo_label"], held[x["index"]].answer, closed=True) for x in recs]
        assert r[mode]["accuracy"] == pytest.approx(np.mean(ok))
        assert r[mode]["consistency_rate"] == pytest.approx(np.mean([x["consistent"] for x in recs]))
        assert not any("answer" in x or "gold" in x for x in recs)
    assert r["ratio"] == pytest.approx(r["score"]["questions_per_s"] / r["sample"]["questions_per_s"])
    assert 0 < r["sample"]["mean_response_tokens"] <= 6
    # the same warm-up adapter, given explicitly, is used as it is (no training in the new folder)
    res = CliRunner().invoke(app, ["bench", "pseudo-label", "--model", str(tiny_q4), "--data", str(task), "--n-items", "2",
                                   "--sample-tokens", "4", "--adapter", str(tmp_path / "pl" / "warmup" / "adapter.gguf"),
                                   "--out", str(tmp_path / "pl2")])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert not (tmp_path / "pl2" / "warmup").exists()


def test_publish_rewrites_only_the_results_sections(quality, tmp_path):
    _, r, _ = quality
    js = tmp_path / "q.json"
    js.write_text(json.dumps(r))
    readme, details = tmp_path / "README.md", tmp_path / "performance.md"
    readme.write_text(f"# title\n\n## Results\n{results.START}\nold\n{results.END}\n\n## After\n")
    details.write_text(f"# Performance\n\nprose\n{results.START}\nold\n{results.END}\n")
    publish = ["bench", "publish", "--readme", str(readme), "--details", str(details)]
    res = CliRunner().invoke(app, [*publish, str(js)])
    assert res.exit_code == 0, res.stderr
    text, full = readme.read_text(), details.read_text()
    assert text.startswith("# title\n") and text.endswith("## After\n") and "\nold\n" not in text
    assert full.startswith("# Performance\n\nprose\n") and "\nold\n" not in full
    main = r["tables"]["main"][0]
    for t in (text, full):  # the main table in both: in the README with its setting and file
        assert f"| {main['majority']:.3f} | {main['vanilla']:.3f} | {main['sft']:.3f} | {main['semievol']:.3f} |" in t
    assert f"LoRA on {r['train']['num_layers']} blocks" in text and f"`{js.as_posix()}` |" in text
    assert r["command"] not in text  # the command that measured it: with the full tables
    assert r["command"] in full and r["machine"]["commit"] in full
    assert f"LoRA on the last {r['train']['num_layers']} blocks at " in full  # the fine-tunes' depth and lr are stated
    assert "### quality: colours (ablation, rounds)\n" in full and "p vs full (McNemar)" in full
    # bad inputs: one line, exit 2, neither file touched
    details.write_text("# no markers\n")
    for args, msg in [([str(tmp_path / "none.json")], "no such file"), ([str(readme)], "not JSON"),
                      ([str(js)], "markers"), (["--readme", str(tmp_path / "none.md"), str(js)], "none.md: cannot read it")]:
        before = readme.read_text(), details.read_text()
        res = CliRunner().invoke(app, [*publish, *args])
        assert res.exit_code == 2 and msg in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert (readme.read_text(), details.read_text()) == before


def test_the_published_results_are_what_the_results_files_say():
    """README's Results section and docs/performance.md's are `bench publish results/*.json`, nothing typed."""
    root = Path(__file__).resolve().parents[1]
    named = [(p.relative_to(root).as_posix(), json.loads(p.read_text())) for p in sorted(root.glob("results/*.json"))]
    assert named and all(r["benchmark"] in results.PUBLISHED for _, r in named)

    def section(path):
        return (root / path).read_text(encoding="utf-8").split(results.START + "\n", 1)[1].split(results.END, 1)[0]

    assert section("README.md") == results.summary(named)
    assert section("docs/performance.md") == results.markdown([r for _, r in results.in_order(named)])


def test_baselines_table(quality, tiny_q4, task, tmp_path):
    """Self-consistency (n answers of one learner, majority vote, kept by vote share alone), a fixed entropy
    bar, and all pseudo-labels: each a row beside SemiEvol with its McNemar p, each doing what it says."""
    runs, _, _ = quality
    js = tmp_path / "baselines.json"
    res = CliRunner().invoke(app, ["bench", "quality", "--model", str(tiny_q4), "--data", str(task),
                                   "--out", str(runs.parent), "--suite", "baselines", "--json", str(js), *TINY_RUN])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    rows = {row["variant"]: row for row in json.loads(js.read_text())["tables"]["baselines"]}
    assert list(rows) == ["SFT (no pseudo-labels)"] + [name for name, _ in runners.BASELINES]
    assert rows["SemiEvol"]["p_vs_full"] is None
    assert all(0 < rows[name]["p_vs_full"] <= 1 for name, _ in runners.BASELINES[1:])
    assert rows["labeled + all pseudo-labels"]["selected"] == 10

    def lines(folder, stage):
        return [json.loads(x) for x in (runs / folder / stage).read_text().splitlines()]

    sc = "labeler-self-consistency_selection-vote"
    for rec in lines(sc, "round1/collaboration/collaboration.jsonl"):
        answers = [a["answer"] for a in rec["learners"]]
        assert [a["learner"] for a in rec["learners"]] == ["warm+3demo"] * 4 and not rec["justified"]
        assert answers.count(rec["pseudo_label"]) == max(answers.count(a) for a in answers)
    for r in lines(sc, "pseudo_labels.jsonl"):
        assert r["selected"] == (r["vote_share"] >= 0.75)
    for r in lines("selection-fixed", "pseudo_labels.jsonl"):
        assert r["selected"] == (r["entropy"] <= 0.5)
    # the fixed bar re-ran selection only: its pseudo-labeling is the full run's
    assert lines("selection-fixed", "round1/collaboration/collaboration.jsonl") == \
        lines("full", "round1/collaboration/collaboration.jsonl")


def test_the_recorded_command_is_what_a_user_types_however_it_was_started():
    """Started as `python -m semievol_local.cli`, the program's name must not leak into the published command."""
    import typer

    from semievol_local.cli import invocation

    cmd = typer.main.get_command(app)
    root = typer.Context(cmd, info_name="python -m semievol_local.cli")
    group = typer.Context(cmd.commands["bench"], parent=root, info_name="bench")
    quality = cmd.commands["bench"].commands["quality"]
    ctx = typer.Context(quality, parent=group, info_name="quality")
    ctx.params = {p.name: p.default for p in quality.params}
    ctx.params["opt_learners"] = 2
    assert invocation(ctx) == "semievol bench quality --learners 2"


def test_bench_run_puts_each_stage_beside_its_own_limit(tiny_q4, task, tmp_path):
    from semievol_local.core.config import EngineConfig
    from semievol_local.core.data import load_task
    from semievol_local.core.prompts import question_messages
    from semievol_local.engines import llama_engine

    out, js = tmp_path / "run", tmp_path / "run.json"
    res = CliRunner().invoke(app, ["bench", "run", "--model", str(tiny_q4), "--data", str(task), "--out", str(out),
                                   "--json", str(js), "--num-layers", "1", "--weights", "f32", *TINY_RUN])
    assert res.exit_code == 0, res.stderr
    r = json.loads(js.read_text())
    assert r["benchmark"] == "run" and r["weights"] == "f32"  # the float32 copy of the Q4_1 file
    # what `run --plan` predicted for every stage, beside what it took
    assert all(row["predicted_s"] is not None and row["predicted_s"] >= 0 for row in r["tables"]["stages"])
    assert r["whole_run"]["predicted_seconds"] > 0
    rows = {row["stage"]: row for row in r["tables"]["stages"]}
    assert list(rows) == ["warmup", "eval/vanilla", "eval/sft", "probe", "round1/retrieval", "round1/collaboration",
                          "round1/selection", "round1/final", "round1/eval"]
    # the tokens llama.cpp evaluated: every test prompt once per eval (the cache never holds a whole prompt)
    eng = llama_engine.Engine(tiny_q4, EngineConfig())
    test_items = load_task(task)["test"].items
    figures = json.loads((out / "eval" / "vanilla" / "manifest.json").read_text())["figures"]
    prompts = [eng.tokenize(eng.template.prompt(question_messages(it), answer_prefix=True)) for it in test_items]
    assert 0 < figures["tokens_computed"] <= sum(len(p) for p in prompts)
    collab = json.loads((out / "round1" / "collaboration" / "manifest.json").read_text())["figures"]
    assert set(collab["tokens_by_adapter"]) == {"", str((out / "warmup" / "adapter.gguf").resolve())}
    assert sum(collab["tokens_by_adapter"].values()) == collab["tokens_computed"]
    # the same tokens by decode shape ("cached:size"), adapter by adapter: what the FLOP count reads
    assert {a: sum(d.values()) for a, d in collab["decode_shapes"].items()} == collab["tokens_by_adapter"]
    # one yardstick, float32 GEMM, taken before every stage that ran and after the last
    y = r["yardstick"]
    assert list(y["before_stage"]) == list(rows) and min(y["before_stage"].values()) > 0 and y["after"] > 0
    assert "prefill_tokens_per_s" not in r and "prefill_reference" not in r
    ends = [*y["before_stage"].values(), y["after"]]
    gflops = {n: (ends[i] + ends[i + 1]) / 2 for i, n in enumerate(rows)}  # each stage: the mean of its two ends
    assert all(row["limit"] == f"GEMM {gflops[n]:.0f} GFLOPS" for n, row in rows.items())
    # a llama.cpp stage's FLOPs: counted from its tokens, decode shapes and decodes on the model's own shape
    shape = whole_run.model_shape(tiny_q4)
    manifests = {n: json.loads((out / n / "manifest.json").read_text()) for n in rows}
    flops = {n: whole_run.llama_flops(shape, manifests[n]["figures"]["decode_shapes"], manifests[n]["figures"]["decodes"])
             for n in ("eval/vanilla", "eval/sft", "probe", "round1/collaboration", "round1/eval")}
    flops.update({n: manifests[n]["figures"]["flops"] for n in ("warmup", "round1/final")})
    for n, fl in flops.items():
        sec = manifests[n]["seconds"]
        assert rows[n]["tokens"] > 0 and rows[n]["tflop"] == pytest.approx(fl / 1e12, rel=1e-3), n
        assert rows[n]["fraction"] == pytest.approx(fl / (sec * gflops[n] * 1e9), rel=1e-3), n
    # the warm-up (one epoch, LoRA on the last of 2 blocks): each token once through the frozen block's cached
    # pass (2x) and the LoRA block (4x), the vocabulary (4x) at a whole number of answer tokens
    trained = rows["warmup"]["tokens"]
    answers = (flops["warmup"] - 6 * TINY_BLOCK * trained) / (4 * TINY_VOCAB)
    assert answers == pytest.approx(round(answers)) and 0 < round(answers) < trained
    for n in ("round1/retrieval", "round1/selection"):  # TF-IDF and selection: no FLOPs, but their time counts
        assert rows[n]["tflop"] is None and rows[n]["fraction"] is None
    budget = sum(m["seconds"] * gflops[n] * 1e9 for n, m in manifests.items())
    assert r["whole_run"]["fraction"] == pytest.approx(sum(flops.values()) / budget, rel=1e-3)
    assert r["whole_run"]["tflop"] == pytest.approx(sum(flops.values()) / 1e12, rel=1e-3)
    # float32 weights: a note exactly where the fraction passes 1, and it blames the machine's speed, not the
    # kernels (a stage of a tiny model lasts milliseconds: on a busy machine it can pass 1)
    vanilla = rows["eval/vanilla"]
    assert vanilla.get("note") == (whole_run.ABOVE_1_FLOAT if vanilla["fraction"] > 1 else None)
    ref = r["llama_reference"]  # informative: llama.cpp's best, by the same count
    assert ref["tokens"] == whole_run.REFERENCE_DECODE and ref["tokens_per_s"] > 0 and 0 < ref["fraction"]
    final = json.loads((out / "round1" / "final" / "manifest.json").read_text())["figures"]
    assert final["trunk_sequences_reused"] == 12  # the warm-up's labeled rows, read back
    assert not (out / ".trunk").exists()  # the store goes when the run ends
    w = r["whole_run"]
    assert w["seconds"] == pytest.approx(sum(row["seconds"] for row in rows.values()), abs=1) and w["peak_rss_mb"] > 0
    again = CliRunner().invoke(app, ["bench", "run", "--model", str(tiny_q4), "--data", str(task), "--out", str(out)])
    assert again.exit_code == 2 and "already holds a run" in again.stderr


def test_the_published_yardstick_says_how_it_was_taken():
    rates = [{"adapter": None, "cached": 0, "tokens": 128, "tokens_per_s": 300.0},
             {"adapter": "warmup", "cached": 64, "tokens": 96, "tokens_per_s": 250.0}]
    old = results._prefill_sentence({"prefill_tokens_per_s": rates,
                                   "prefill_reference": {"tokens": 128, "before": 352.0, "after": 275.0}})
    assert "2 decode shapes" in old and "250-300 tok/s" in old and "352 before and 275 after" in old
    new = results._prefill_sentence({"prefill_tokens_per_s": rates, "prefill_reference": {
        "tokens": 128, "before_stage": {"warmup": 330.0, "eval/vanilla": 290.0}, "after": 260.0}})
    assert "taken before each stage and after the last: 260-330 tok/s" in new and "352" not in new


def test_llama_flops_is_the_hand_count():
    """Weights per token, attention over the positions each token sees, the vocabulary per logits row read."""
    m = whole_run.ModelShape(n_layer=2, block_weights=100, n_head=2, key_length=4, value_length=4, n_vocab=10, n_embd=3)
    # one decode of 3 tokens on an empty cache (base model), two decodes of 1 token after 4 cached (an adapter)
    shapes = {"": {"0:3": 3}, "adapter.gguf": {"4:1": 2}}
    weights = 2 * 100 * 5  # 5 tokens
    per_position = 2 * 2 * (2 * 4) * 2  # QK^T and AV: 2 x 2 x (heads x head size) per position, in 2 layers
    attention = per_position * (1 + 2 + 3) + per_position * 5 * 2  # positions 1..3; 5 for each 1-token decode
    vocab = 3 * 2 * 10 * 3  # 3 rows of logits read
    assert whole_run.llama_flops(m, shapes, 3) == weights + attention + vocab == 2204
    assert whole_run.llama_flops(m, shapes, 0) == 2204 - vocab  # embeddings read no logits


def test_the_tiny_models_shape_is_read_from_its_gguf(tiny_q4):
    m = whole_run.model_shape(tiny_q4)
    assert m == whole_run.ModelShape(n_layer=2, block_weights=2 * TINY_BLOCK, n_head=4, key_length=16, value_length=16,
                                 n_vocab=290, n_embd=64)  # norms: no matmul, not counted


def test_whole_run_fraction_counts_every_stages_time_and_notes_fractions_above_1():
    seconds = {"warmup": 10.0, "round1/collaboration": 5.0, "round1/selection": 2.0}
    flops = {"warmup": 5e11, "round1/collaboration": 6e11}
    gflops = {"warmup": 100.0, "round1/collaboration": 80.0, "round1/selection": 50.0}
    each, whole = whole_run.gemm_fractions(seconds, flops, gflops)
    assert each == {"warmup": pytest.approx(0.5), "round1/collaboration": pytest.approx(1.5),
                    "round1/selection": None}
    assert whole == pytest.approx((5e11 + 6e11) / (10 * 100e9 + 5 * 80e9 + 2 * 50e9))  # selection's 2 s count
    llama = {"round1/collaboration"}
    assert whole_run.above_1(each, llama, quantized=True) == {"round1/collaboration": whole_run.ABOVE_1}
    assert whole_run.above_1(each, llama, quantized=False) == {"round1/collaboration": whole_run.ABOVE_1_FLOAT}
    assert whole_run.above_1({"warmup": 0.99, "round1/selection": None}, llama, quantized=True) == {}


def test_bench_train_counts_the_flops_of_its_own_shape(tiny_q4):
    """LoRA on the last of 2 blocks, loss on 4 of 16 tokens: the trained block 4x, the frozen one 2x (its
    one pass), the vocabulary projection at the answers only; less than 4 x all weights per token."""
    from semievol_local.bench import train

    b = train.bench_train(tiny_q4, 3, batch_size=2, seq_len=16, num_layers=1, answer_len=4, skip_steps=1)
    block, vocab = TINY_BLOCK, TINY_VOCAB
    assert b["lora_blocks"] == 1 and b["frozen_blocks_cached"] == 1
    assert b["flops_per_token_steps"] == 4 * block + 4 * vocab * 4 / 16
    assert b["flops_per_token"] == 2 * block + 4 * block + 4 * vocab * 4 / 16 < 4 * b["n_params"]
    assert b["roofline_fraction"] == pytest.approx(b["flops_per_token"] * b["tokens_per_s_with_trunk"]
                                                   / (b["gemm_gflops"] * 1e9))
    assert b["roofline_fraction_steps"] == pytest.approx(b["flops_per_token_steps"] * b["tokens_per_s"]
                                                         / (b["gemm_gflops"] * 1e9))
    assert b["roofline_tokens_per_s"] == pytest.approx(b["gemm_gflops"] * 1e9 / b["flops_per_token"])
    # a tiny model's matrices keep a step far from GEMM speed: a fraction near or above 1 is a miscount
    assert 0 < b["roofline_fraction"] < 0.5 and 0 < b["roofline_fraction_steps"] < 0.5


def test_bench_train_split_times_one_trained_block_by_part(tiny_q4, tmp_path):
    """`--split`: the block whole (as trained, and with q/k/v and gate/up joined) and its parts at the same
    shape; the frozen products' fraction is their FLOPs (forward and input gradient: 4 x the block's weights
    per token) over their time, against the GEMM speed measured with them."""
    out = tmp_path / "t.json"
    r = CliRunner().invoke(app, ["bench", "train", "--model", str(tiny_q4), "--steps", "3", "--batch-size", "2",
                                 "--seq-len", "16", "--split", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "one trained block" in r.output
    s = json.loads(out.read_text())["block_split"]
    assert s["tokens"] == 32 and s["frozen_flops"] == 4 * 32 * TINY_BLOCK
    for k in ("block_ms", "block_joined_ms", "frozen_products_ms", "frozen_products_joined_ms", "lora_products_ms",
              "attention_ms"):
        assert s[k] > 0, k
    assert s["other_ms"] >= 0
    assert s["frozen_products_gemm_fraction"] == pytest.approx(
        s["frozen_flops"] / (s["frozen_products_ms"] / 1e3) / (s["gemm_gflops"] * 1e9), rel=2e-3)
    assert s["block_joined_gemm_fraction"] == pytest.approx(
        s["frozen_flops"] / (s["block_joined_ms"] / 1e3) / (s["gemm_gflops"] * 1e9), rel=2e-3)


def test_a_fine_tunes_flops_are_counted_from_its_blocks():
    """`train_flops`: frozen blocks 2x per token they run on (once, when cached; every step when not), LoRA
    blocks 4x per step token, the vocabulary 4x per answer token."""
    from semievol_local.training.train_flops import train_flops

    per_block = [10, 20, 30]
    kw = dict(trunk_tokens=7, step_tokens=100, answer_tokens=5)
    assert train_flops(per_block, 1, 1000, trunk_cached=True, **kw) == 2 * 30 * 7 + 4 * 30 * 100 + 4 * 1000 * 5
    assert train_flops(per_block, 1, 1000, trunk_cached=False, **kw) == 2 * 30 * 100 + 4 * 30 * 100 + 4 * 1000 * 5
    assert train_flops(per_block, 3, 1000, trunk_cached=False, **kw) == 4 * 60 * 100 + 4 * 1000 * 5


def _gemm_run_result() -> dict:
    """A `bench run` result in the GEMM-rated format, small enough to read."""
    return {"benchmark": "run",
            "machine": {"date": "2027-01-01", "cores": 2, "cpu": "cpu", "os": "os", "commit": "abc"},
            "command": "semievol bench run --data fpb", "model": "m.gguf", "task": "fpb", "weights": "file",
            "train": {"num_layers": 16}, "gemm_gflops": 100.0,
            "yardstick": {"what": "float32 GEMM", "before_stage": {"warmup": 90.0, "round1/collaboration": 110.0},
                          "after": 100.0},
            "llama_reference": {"tokens": 128, "tokens_per_s": 450.0, "fraction": 0.47},
            "tables": {"stages": [
                {"stage": "warmup", "seconds": 10.0, "tokens": 100, "tokens_per_s": 10.0, "tflop": 0.5,
                 "limit": "GEMM 100 GFLOPS", "fraction": 0.5, "peak_rss_mb": 900, "note": None},
                {"stage": "round1/collaboration", "seconds": 5.0, "tokens": 100, "tokens_per_s": 20.0, "tflop": 0.6,
                 "limit": "GEMM 105 GFLOPS", "fraction": 1.143, "peak_rss_mb": 800, "note": whole_run.ABOVE_1}]},
            "whole_run": {"task": "fpb", "seconds": 15.0, "peak_rss_mb": 900, "untimed_attempts": False,
                          "tflop": 1.1, "fraction": 0.733}}


def test_publish_renders_gemm_rated_runs():
    text = results.markdown([_gemm_run_result()])
    assert "llama.cpp computed with the file as given; every stage rated against one yardstick, float32 GEMM" in text
    assert "before each stage and after the last: 90-110 GFLOPS, each stage at the mean of its two ends" in text
    assert "(128 random tokens, no adapter): 450 tok/s, 0.47 of GEMM by the same count." in text
    assert ("| stage | seconds | tokens | tokens per s | TFLOP counted | limit | fraction | peak RSS (MB) | note |"
            in text)
    assert f"| 1.143 | 800 | {whole_run.ABOVE_1} |" in text and "| 0.500 | 900 | - |" in text
    assert "The work counted, 1.1 TFLOP, is **0.73** of what float32 GEMM would do in the whole run's time" in text
    assert "prefill" not in text


def test_publish_renders_the_published_run_result_as_the_docs_have_it():
    """The whole fpb run, rated against float32 GEMM stage by stage, is in docs/performance.md as publish
    writes it, byte for byte."""
    root = Path(__file__).resolve().parents[1]
    run = json.loads((root / "results" / "run_fpb.json").read_text())
    assert "yardstick" in run and run["whole_run"]["fraction"] is not None
    details = (root / "docs" / "performance.md").read_text(encoding="utf-8")
    section = results.markdown([run])
    assert section.startswith("### run: fpb\n") and "every stage rated against one yardstick" in section
    assert f"**{run['whole_run']['fraction']:.2f}**" in section
    assert "\n" + section + "\n" in details


def test_bench_sizes_measures_each_model_in_its_own_process(tiny_q4, task, tmp_path):
    js = tmp_path / "sizes.json"
    res = CliRunner().invoke(app, ["bench", "sizes", "--model", str(tiny_q4), "--data", str(task), "--json", str(js),
                                   *TINY_TRAIN])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    r = json.loads(js.read_text())
    (row,) = r["tables"]["sizes"]
    assert row["model"] == tiny_q4.name and row["auto"] in ("file", "f32")
    assert row["prompt_file"] > 0 and row["prompt_f32"] > 0  # both weights timed, the choice follows the rates
    assert (row["auto"] == "file") == (row["prompt_file"] > 1.1 * row["prompt_f32"])
    assert row["train_tokens_per_s"] > 0 and 0 < row["train_fraction"] and row["train_peak_mb"] > 0
    assert re.fullmatch(r"\d+h\d\dm|\d+m\d\ds", row["plan_time"]) and row["run_peak_mb"] > 0
    assert "At the sizes users bring" in results.markdown([r])


def test_quality_over_seeds(tiny_q4, task, tmp_path):
    """--seeds 2: the comparison again with the next training seed (its own warm-up), and a table with each
    method's mean and spread over the seeds and the pooled test; --seeds 0 is one line and exit 2."""
    out, js = tmp_path / "q", tmp_path / "q.json"
    args = ["bench", "quality", "--model", str(tiny_q4), "--data", str(task), "--out", str(out), "--suite", "main",
            "--json", str(js), *TINY_RUN]
    bad = CliRunner().invoke(app, [*args, "--seeds", "0"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--seeds" in bad.stderr
    assert not out.exists()
    res = CliRunner().invoke(app, [*args, "--seeds", "2"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    r = json.loads(js.read_text())
    runs = [out / task.name / "full", out / "seed1" / task.name / "full"]
    configs = [json.loads((f / "run.json").read_text())["train"]["seed"] for f in runs]
    assert configs == [0, 1] and r["seeds"] == 2
    vanilla = [f / "eval" / "vanilla" / "eval.json" for f in runs]  # no training seed reaches it: copied
    assert vanilla[1].read_bytes() == vanilla[0].read_bytes() and vanilla[1].stat().st_mtime == vanilla[0].stat().st_mtime
    adapters = [(f / "warmup" / "adapter.gguf").read_bytes() for f in runs]
    assert adapters[0] != adapters[1]  # another seed, another warm-up
    rows = {row["method"]: row for row in r["tables"]["seeds"]}
    assert list(rows) == ["SFT (no pseudo-labels)", "SemiEvol"]
    for name, stage in (("SFT (no pseudo-labels)", "eval/sft"), ("SemiEvol", "round1/eval")):
        acc = [json.loads((f / stage / "eval.json").read_text())["accuracy"] for f in runs]
        assert rows[name]["mean"] == pytest.approx(np.mean(acc)) and rows[name]["min"] == min(acc)
        assert rows[name]["sd"] == pytest.approx(np.std(acc, ddof=1))
    assert rows["SemiEvol"]["p_vs_full_pooled"] is None  # itself
    assert 0 < rows["SFT (no pseudo-labels)"]["p_vs_full_pooled"] <= 1
    assert len(rows["SFT (no pseudo-labels)"]["p_vs_full_per_seed"].split(", ")) == 2
    probes = r["tables"]["probe"]  # what the collapse check saw of each seed's warm-up (tiny models: collapsed)
    assert [p["seed"] for p in probes] == [0, 1]
    for p, f in zip(probes, runs):
        found = json.loads((f / "probe" / "probe.json").read_text())
        assert p["its share"] == found["top_share"] and p["collapsed"] == found["collapsed"]

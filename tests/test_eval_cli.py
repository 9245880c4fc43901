"""`semievol eval`, `models` and `data` through the CLI, on tiny models and tasks written here."""
import json

import pytest
from conftest import make_rows, write_split
from typer.testing import CliRunner

from semievol_local.cli import app
from semievol_local.core.data import load_heldout, load_task


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    return res


def test_eval_writes_accuracy_and_every_prediction(tiny_q4, tiny_task, tmp_path):
    out = tmp_path / "eval.json"
    res = run("eval", "--model", tiny_q4, "--data", tiny_task, "--json", out)
    d = json.loads(out.read_text())
    preds = d["predictions"]
    assert len(preds) == 10 and d["mode"] == "score"
    assert d["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 10)
    assert all(abs(sum(p["probs"]) - 1) < 1e-6 and p["predicted"] in "ABC" for p in preds)
    # the majority class is the labeled split's (what a user knows), scored on the test answers; the test
    # split's own majority class is shown apart, as an oracle
    answers = [p["gold"] for p in preds]
    labeled = [r["answer"] for r in make_rows(12, 1)]
    prior = min("ABC", key=lambda a: (-labeled.count(a), a))
    assert d["majority_from"] == "labeled split" and d["majority_label"] == prior
    assert d["majority_accuracy"] == pytest.approx(answers.count(prior) / 10)
    assert d["oracle_accuracy"] == pytest.approx(max(answers.count(a) for a in "ABC") / 10)
    assert "from the labeled split" in res.stdout and "oracle" in res.stdout
    assert "per category" in res.stdout  # the category column is found
    assert set(d["per_category"]) == {"easy", "hard"}
    # deterministic: a second run gives the same predictions
    out2 = tmp_path / "eval2.json"
    run("eval", "--model", tiny_q4, "--data", tiny_task, "--json", out2)
    assert json.loads(out2.read_text())["predictions"] == preds


def test_eval_sample_mode_and_open_answers(tiny_model, tmp_path):
    folder = tmp_path / "open"
    write_split(folder / "test.jsonl", [{"question": "What is 6*7?", "answer": "42"},
                                        {"question": "Capital of France?", "answer": "Paris"}])
    out = tmp_path / "o.json"
    run("eval", "--model", tiny_model, "--data", folder, "--max-tokens", "8", "--json", out)
    d = json.loads(out.read_text())
    assert d["mode"] == "sample" and len(d["predictions"]) == 2
    assert all(isinstance(p["text"], str) for p in d["predictions"])
    # score mode on open answers is refused
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_model), "--data", str(folder), "--mode", "score"])
    assert res.exit_code == 2 and "open-answer" in res.stderr


def test_eval_limit(tiny_q4, tiny_task, tmp_path):
    out = tmp_path / "e.json"
    run("eval", "--model", tiny_q4, "--data", tiny_task, "--limit", 3, "--json", out)
    assert len(json.loads(out.read_text())["predictions"]) == 3


def test_models_info_on_a_gguf(tiny_q4, tmp_path, monkeypatch):
    """`info` writes and measures nothing (a float32 copy can be GBs); once a run's `auto` measured the file,
    it shows the rates and the choice."""
    from semievol_local.core.config import EngineConfig
    from semievol_local.engines.weights import plan_weights

    monkeypatch.setenv("SEMIEVOL_WEIGHTS", str(tmp_path / "weights"))
    res = run("models", "info", tiny_q4)
    assert "llama" in res.stdout and "Q4_1" in res.stdout and "yes" in res.stdout
    assert "not measured here yet" in res.stdout and "prompt tok/s here" not in res.stdout
    assert not (tmp_path / "weights").exists() or not any((tmp_path / "weights").rglob("*.gguf"))
    plan_weights(tiny_q4, EngineConfig())  # what the first run does
    res = run("models", "info", tiny_q4)
    assert "prompt tok/s here" in res.stdout and "float32 copy" in res.stdout and "the file" in res.stdout
    assert "measured" in res.stdout


def test_models_list_names_the_default():
    assert "smollm2-135m" in run("models", "list").stdout


def test_unlabeled_split_is_loaded_without_answers(tiny_task):
    task = load_task(tiny_task)
    assert all(it.answer is None for it in task["unlabeled"].items)
    assert all(it.answer in "ABC" for it in task["labeled"].items)
    # the answers exist, and only the report-side reader returns them
    assert [it.answer for it in load_heldout(tiny_task / "unlabeled.csv")] == [r["answer"] for r in make_rows(20, 2)]
    # and nothing but question and options: an extra column may be the answer in words (fpb's `gt`)
    assert all(it.meta == {} for it in task["unlabeled"].items)
    assert all(it.meta.get("category") in ("easy", "hard") for it in task["test"].items)


def test_majority_without_a_labeled_split_is_the_split_own(tiny_q4, tmp_path):
    """A single file has no labeled split: the baseline is that split's own majority, and it says so."""
    f = write_split(tmp_path / "only" / "test.csv", make_rows(10, 3))
    out = tmp_path / "e.json"
    res = run("eval", "--model", tiny_q4, "--data", f, "--json", out)
    d = json.loads(out.read_text())
    answers = [r["answer"] for r in make_rows(10, 3)]
    assert d["majority_from"] == "this split"
    assert d["majority_accuracy"] == pytest.approx(max(answers.count(a) for a in "ABC") / 10)
    assert "from the this split" in res.stdout and "oracle" not in res.stdout


def test_unlabeled_split_without_answer_column_loads(tmp_path):
    folder = tmp_path / "t"
    for name, n in [("labeled", 4), ("test", 4)]:
        write_split(folder / f"{name}.csv", make_rows(n))
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in make_rows(5)]
    write_split(folder / "unlabeled.csv", rows)
    assert len(load_task(folder)["unlabeled"]) == 5

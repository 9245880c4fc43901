"""`semievol predict`: new rows labeled in input order, the same answers eval gives, resumable, bad input refused."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_rows, write_split
from typer.testing import CliRunner

from semievol_local.cli import app
from semievol_local.core.data import load_split, read_rows
from semievol_local.engines import llama_engine
from semievol_local.method.predict import partial_path, predict


def run(*args, code=0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.stdout, res.stderr, res.exception)
    return res


def unlabeled_rows(n: int, seed: int = 2) -> list[dict]:
    """Rows without answers, with a column of the user's own that must come back untouched."""
    return [{"id": f"row-{i}", "question": r["question"], "options": r["options"]}
            for i, r in enumerate(make_rows(n, seed, category=False))]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predict_writes_every_row_in_order_with_its_distribution(tiny_q4, tmp_path):
    src = write_split(tmp_path / "new.csv", unlabeled_rows(12))
    out = tmp_path / "labeled.csv"
    res = run("predict", "--model", tiny_q4, "--data", src, "--out", out)
    assert "12 rows" in res.stderr + res.stdout
    rows = read_csv(out)
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(12)]  # input order, input columns kept
    for r in rows:
        p = [float(r[f"p_{c}"]) for c in "ABC"]
        assert sum(p) == pytest.approx(1, abs=1e-5)
        assert r["prediction"] == "ABC"[p.index(max(p))]
        assert r["prediction_text"] == json.loads(r["options"])["ABC".index(r["prediction"])]
        assert float(r["entropy"]) == pytest.approx(-sum(x * math.log(x) for x in p if x > 0), abs=1e-4)
    assert not partial_path(out).exists()
    # JSONL holds the same answers, with the distribution as an object and options as a list
    out_j = tmp_path / "labeled.jsonl"
    run("predict", "--model", tiny_q4, "--data", src, "--out", out_j)
    recs = [json.loads(ln) for ln in out_j.read_text().splitlines()]
    assert [r["prediction"] for r in recs] == [r["prediction"] for r in rows]
    assert isinstance(recs[0]["options"], list) and set(recs[0]["probs"]) == {"A", "B", "C"}


def test_predict_gives_the_answers_eval_scores(tiny_q4, tiny_task, tmp_path):
    """One question, one function: predict on the test split agrees with eval's predictions, adapter or not."""
    ev = tmp_path / "eval.json"
    run("eval", "--model", tiny_q4, "--data", tiny_task, "--json", ev)
    out = tmp_path / "test.jsonl"
    run("predict", "--model", tiny_q4, "--data", tiny_task, "--split", "test", "--out", out)
    preds = [json.loads(ln) for ln in out.read_text().splitlines()]
    evald = json.loads(ev.read_text())["predictions"]
    assert [p["prediction"] for p in preds] == [p["predicted"] for p in evald]
    assert [x for p in preds for x in p["probs"].values()] == pytest.approx([x for p in evald for x in p["probs"]], abs=1e-6)


def test_open_rows_are_answered_by_generation(tiny_q4, tmp_path):
    src = write_split(tmp_path / "open.jsonl", [{"question": f"What is {i} plus {i}?"} for i in range(3)])
    out = tmp_path / "open-out.csv"
    run("predict", "--model", tiny_q4, "--data", src, "--out", out, "--max-tokens", "4")
    rows = read_csv(out)
    assert len(rows) == 3 and "p_A" not in rows[0]
    assert all(r["text"] and r["prediction"] and r["prediction_text"] == "" for r in rows)


def test_an_interrupted_predict_resumes_and_gives_the_same_file(tiny_q4, tmp_path):
    src = write_split(tmp_path / "new.csv", unlabeled_rows(10))
    ref = tmp_path / "ref.csv"
    run("predict", "--model", tiny_q4, "--data", src, "--out", ref)
    out = tmp_path / "out.csv"
    engine = llama_engine.load(tiny_q4)
    split = load_split(src, "new", with_answers=False)
    raw = [r for _, r in read_rows(src)]
    ident = {"test": 1}
    seen = []

    def stop_after_four(rec):
        seen.append(rec)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict(engine, split, raw, out, mode="score", max_tokens=1, identity=ident, on_item=stop_after_four)
    assert not out.exists() and partial_path(out).read_text().count("\n") == 5  # header + 4 rows
    resumed = predict(engine, split, raw, out, mode="score", max_tokens=1, identity=ident)
    assert resumed["resumed"] == 4 and out.read_text() == ref.read_text()
    # a partial left by other inputs (another adapter, model or file) is started over, not mixed in
    with pytest.raises(KeyboardInterrupt):
        seen.clear()
        predict(engine, split, raw, out, mode="score", max_tokens=1, identity=ident, on_item=stop_after_four)
    assert predict(engine, split, raw, out, mode="score", max_tokens=1, identity={"test": 2})["resumed"] == 0


def test_predict_killed_with_sigkill_resumes_where_it_stopped(tiny_q4, tmp_path):
    src = write_split(tmp_path / "many.csv", unlabeled_rows(1000))  # seconds of work: the kill lands within it
    out = tmp_path / "many-out.csv"
    args = [sys.executable, "-m", "semievol_local.cli", "predict", "--model", str(tiny_q4), "--data", str(src),
            "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part, t0 = partial_path(out), time.time()
    while proc.poll() is None and time.time() - t0 < 120:
        if part.exists() and part.read_text().count("\n") > 10:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists() and part.exists()
    done = part.read_text().count("\n") - 1
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{done} resumed" in res.stderr.replace("\n", " ") or f"({done}" in res.stderr
    assert len(read_csv(out)) == 1000 and not part.exists()


# what each case covers -> (file rows or None, extra args, message fragment)
BAD = [
    ("out is not csv/jsonl", None, ["--out", "{tmp}/x.txt"], "write .csv or .jsonl"),
    ("out overwrites the input", None, ["--out", "{tmp}/new.csv"], "that is the input file"),
    ("out folder missing", None, ["--out", "{tmp}/nope/x.csv"], "create it first"),
    ("a column predict writes", [{"question": "q?", "options": ["a", "b"], "prediction": "x"}], [], "'prediction'"),
    ("no question column", [{"text": "q?"}], [], "no 'question' column"),
    ("missing input file", "missing", [], "no such task folder or file"),
    ("score mode on open rows", [{"question": "q?"}], ["--mode", "score"], "needs options on every row"),
    ("unknown adapter path", None, ["--adapter", "{tmp}/none"], "no adapter there"),
]


@pytest.mark.parametrize("case,rows,extra,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tiny_q4, tmp_path, case, rows, extra, message):
    src = tmp_path / "new.csv"
    if rows != "missing":
        write_split(src, rows or unlabeled_rows(3))
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    args = ["predict", "--model", tiny_q4, "--data", src, *(["--out", tmp_path / "out.csv"] if "--out" not in extra else []), *extra]
    res = run(*args, code=2)
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["new.csv"] if rows != "missing" else [])

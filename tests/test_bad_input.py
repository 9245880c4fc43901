"""The bad-input contract: one line on stderr naming the file/row/value, exit 2, no traceback, no output file."""
from __future__ import annotations


import pytest
from conftest import make_rows, write_split
from tinymodel import write_tiny_gguf
from typer.testing import CliRunner

from semievol_local.cli import app


def folder_with(tmp_path, test_rows=None, raw: str | None = None, name="test.csv"):
    folder = tmp_path / "task"
    folder.mkdir(exist_ok=True)
    if raw is not None:
        (folder / name).write_text(raw, encoding="utf-8")
    else:
        write_split(folder / name, test_rows)
    return folder


def truncated_gguf(tmp_path, tiny_model):
    p = tmp_path / "cut.gguf"
    p.write_bytes(tiny_model.read_bytes()[:5000])
    return p


def bad_quant_gguf(tmp_path, tiny_model):
    """Patch the first tensor's type to 4 (Q4_2, removed from GGML long ago)."""
    import gguf

    r = gguf.GGUFReader(str(tiny_model))
    t = r.tensors[0]
    data = bytearray(tiny_model.read_bytes())
    # tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64); type sits after the dims
    type_field = t.field.parts[-2]  # the numpy view of the type value inside the file
    off = type_field.ctypes.data - r.data.ctypes.data
    data[off:off + 4] = (4).to_bytes(4, "little")
    p = tmp_path / "badquant.gguf"
    p.write_bytes(bytes(data))
    return p


# Each case: (id, builder(tmp_path, tiny_model) -> extra CLI args, substring the message must contain)
CASES = [
    # a task folder that does not exist
    ("missing-folder", lambda t, m: ["--data", str(t / "nope")], "no such task folder"),
    # a split file that is empty
    ("empty-file", lambda t, m: ["--data", str(folder_with(t, raw=""))], "empty"),
    # an unclosed quote: the CSV does not parse; the row is named
    ("csv-unparsable", lambda t, m: ["--data", str(folder_with(t, raw='question,options,answer\n"open quote,"[""a""]",A\n'))], "test.csv:"),
    # a row with more fields than the header
    ("csv-extra-field", lambda t, m: ["--data", str(folder_with(t, raw='question,options,answer\nq1,"[""a"",""b""]",A,extra\n'))], "test.csv:2"),
    # a JSONL line that is not JSON
    ("jsonl-bad-line", lambda t, m: ["--data", str(folder_with(t, raw='{"question": "q", "options": ["a", "b"], "answer": "A"}\n{oops\n', name="test.jsonl"))], "test.jsonl:2"),
    # no question column
    ("no-question-column", lambda t, m: ["--data", str(folder_with(t, raw='prompt,options,answer\nq,"[""a"",""b""]",A\n'))], "'question'"),
    # options that are not a JSON list
    ("options-not-list", lambda t, m: ["--data", str(folder_with(t, raw='question,options,answer\nq,a;b;c,A\n'))], "not a JSON list"),
    # an answer letter outside the options
    ("answer-out-of-range", lambda t, m: ["--data", str(folder_with(t, raw='question,options,answer\nq,"[""a"",""b""]",D\n'))], "'D'"),
    # the requested split is missing from the folder
    ("missing-split", lambda t, m: ["--data", str(folder_with(t, make_rows(3), name="labeled.csv"))], "no 'test' split"),
    # a model file that is not GGUF
    ("not-gguf", lambda t, m: ["--model", str(_write(t / "model.gguf", b"PK\x03\x04zip")), "--data", str(folder_with(t, make_rows(3)))], "not a GGUF"),
    # a truncated GGUF
    ("truncated-gguf", lambda t, m: ["--model", str(truncated_gguf(t, m)), "--data", str(folder_with(t, make_rows(3)))], "cut.gguf"),
    # an architecture llama.cpp cannot load
    ("unknown-arch", lambda t, m: ["--model", str(write_tiny_gguf(t / "arch.gguf", arch="nosucharch")), "--data", str(folder_with(t, make_rows(3)))], "arch.gguf"),
    # a tensor type nobody can load
    ("bad-quant", lambda t, m: ["--model", str(bad_quant_gguf(t, m)), "--data", str(folder_with(t, make_rows(3)))], "badquant.gguf"),
    # an unknown model alias
    ("unknown-alias", lambda t, m: ["--model", "llama-9000", "--data", str(folder_with(t, make_rows(3)))], "unknown model 'llama-9000'"),
    # a prompt that cannot fit even without demonstrations
    ("prompt-too-long", lambda t, m: ["--n-ctx", "256", "--data", str(folder_with(t, [{"question": "q", "options": ["x" * 200, "y" * 200], "answer": "A"}]))], "--n-ctx"),
    # a category column that does not exist
    ("unknown-column", lambda t, m: ["--category-column", "Subject", "--data", str(folder_with(t, make_rows(3)))], "'Subject'"),
    # an adapter that does not exist
    ("missing-adapter", lambda t, m: ["--adapter", str(t / "none.gguf"), "--data", str(folder_with(t, make_rows(3)))], "none.gguf"),
    # an adapter file that is not a LoRA adapter (a base model)
    ("not-an-adapter", lambda t, m: ["--adapter", str(m), "--data", str(folder_with(t, make_rows(3)))], "adapter"),
]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case_id,build,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, tiny_model, case_id, build, needle):
    args = build(tmp_path, tiny_model)
    if "--model" not in args:
        args = ["--model", str(tiny_model), *args]
    out = tmp_path / "out.json"
    res = CliRunner().invoke(app, ["eval", *args, "--json", str(out)])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    assert not out.exists()


def test_data_check_reports_bad_row(tmp_path):
    folder = folder_with(tmp_path, raw='question,options,answer\nq,"[""a"",""b""]",A\nq2,"[""a""]",C\n')
    res = CliRunner().invoke(app, ["data", "check", str(folder / "test.csv")])
    assert res.exit_code == 2 and "test.csv:3" in res.stderr


def test_data_check_summarizes_a_task(tiny_task):
    res = CliRunner().invoke(app, ["data", "check", str(tiny_task)])
    assert res.exit_code == 0, res.stderr
    assert "unlabeled" in res.stdout and "held apart" in res.stdout and "category" in res.stdout


# More of the same contract through `eval`: file encodings and rows.
DATA_CASES = [
    # a CSV saved as Latin-1: the line and the byte are named
    ("not-utf8", lambda t: folder_with_bytes(t, 'question,options,answer\nq,"[""caf\xe9"",""b""]",A\n'.encode("latin-1")), "test.csv:2: not UTF-8"),
    # a binary file with a .csv name
    ("binary", lambda t: folder_with_bytes(t, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 4), "binary file"),
    # a JSONL line that is JSON but not an object
    ("jsonl-array-row", lambda t: folder_with(t, raw='{"question": "q", "options": ["a", "b"], "answer": "A"}\n[1, 2]\n', name="test.jsonl"), "test.jsonl:2: expected a JSON object"),
    # a split with a header and no rows
    ("empty-split", lambda t: folder_with(t, raw="question,options,answer\n"), "no rows"),
    # an option with no text
    ("empty-option", lambda t: folder_with(t, raw='question,options,answer\nq,"[""a"","" ""]",A\n'), "option B is empty"),
    # options that are a JSON object, not a list
    ("options-object", lambda t: folder_with(t, raw='question,options,answer\nq,"{""a"": 1}",A\n'), "JSON list"),
]


def folder_with_bytes(tmp_path, data: bytes, name="test.csv"):
    folder = tmp_path / "task"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("case_id,build,needle", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(tmp_path, tiny_model, case_id, build, needle):
    out = tmp_path / "out.json"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_model), "--data", str(build(tmp_path)), "--json", str(out)])
    _one_line_exit_2(res, needle)
    assert not out.exists()


def _one_line_exit_2(res, needle):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr + res.stdout


# Every option is checked where it is declared (config.opt), before any model loads or any file is written:
# (command, extra args, what the one line must say).
OPTION_CASES = [
    ("run", ["--learners", "0"], "--learners 0: give a value >= 1"),
    ("run", ["--k", "-2"], "--k -2: give a value >= 0"),
    ("run", ["--lr", "-1"], "--lr -1: give a value >= 0"),
    ("run", ["--lr", "nan"], "--lr nan: give a finite number"),
    ("run", ["--theta", "101"], "--theta 101: give a value >= 0 and <= 100"),
    ("run", ["--rounds", "0"], "--rounds 0"),
    ("run", ["--epochs", "0"], "--epochs 0: give a value > 0"),
    ("run", ["--batch-size", "0"], "--batch-size 0"),
    ("run", ["--grad-accum", "0"], "--grad-accum 0"),
    ("run", ["--dropout", "1"], "--dropout 1: give a value >= 0 and < 1"),
    ("run", ["--val-fraction", "1"], "--val-fraction 1"),
    ("run", ["--warmup", "-0.1"], "--warmup -0.1"),
    ("run", ["--num-layers", "0"], "--num-layers 0: give a value >= 1 (or -1)"),
    ("run", ["--rank", "0"], "--rank 0"),
    ("run", ["--max-seq-len", "4"], "--max-seq-len 4"),
    ("run", ["--save-every", "0"], "--save-every 0"),
    ("run", ["--mode", "guess"], "--mode 'guess': choose one of auto, score, sample"),
    ("run", ["--embedding", "bert"], "--embedding 'bert': choose one of model, tfidf"),
    ("run", ["--threshold", "both"], "--threshold 'both'"),
    ("run", ["--temperature", "-1"], "--temperature -1"),
    ("run", ["--max-tokens", "0"], "--max-tokens 0"),
    ("run", ["--limit-unlabeled", "-1"], "--limit-unlabeled -1"),
    ("run", ["--min-letter-mass", "2"], "--min-letter-mass 2"),
    ("run", ["--final-lr", "-0.001"], "--final-lr -0.001"),
    ("run", ["--n-ctx", "-5"], "--n-ctx -5"),
    ("run", ["--n-threads", "-1"], "--n-threads -1"),
    ("train", ["--grad-clip", "-1"], "--grad-clip -1"),
    ("train", ["--weight-decay", "-1"], "--weight-decay -1"),
    ("train", ["--split", "nope"], "--split 'nope': choose one of labeled, unlabeled, test"),
    ("eval", ["--split", "nope"], "--split 'nope'"),
]


@pytest.mark.parametrize("command,extra,needle", OPTION_CASES, ids=[" ".join(c[1]) for c in OPTION_CASES])
def test_bad_option(tmp_path, tiny_model, tiny_task, command, extra, needle):
    out = tmp_path / "out"
    args = [command, "--model", str(tiny_model), "--data", str(tiny_task)]
    args += ["--json", str(out)] if command == "eval" else ["--out", str(out)]
    res = CliRunner().invoke(app, args + extra)
    _one_line_exit_2(res, needle)
    assert not out.exists()


def test_a_run_with_bad_data_leaves_no_folder(tmp_path, tiny_model, tiny_task):
    """A bad unlabeled row stops `run` before anything is written: the run folder it made is gone again."""
    (tiny_task / "unlabeled.csv").write_bytes(b'question,options,answer\nq,"[""a"",""b""]",A\nq2,"[""a""]"\n')
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--model", str(tiny_model), "--data", str(tiny_task), "--out", str(out)])
    _one_line_exit_2(res, "unlabeled.csv:3")
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "train", "bench run"])
def test_an_out_folder_that_is_a_file_is_one_line(tmp_path, tiny_model, tiny_task, command):
    """--out naming a file (or a folder under one) is said in one line, before anything runs; the file stays."""
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    for out in (f, f / "sub"):
        res = CliRunner().invoke(app, [*command.split(), "--model", str(tiny_model), "--data", str(tiny_task),
                                       "--out", str(out)])
        _one_line_exit_2(res, f"{f} is a file, not a folder")
        assert f.read_text() == "mine\n"


def test_report_of_a_file_is_one_line(tmp_path):
    """`semievol report` given a file (not a run folder): one line, exit 2, no traceback."""
    from typer.testing import CliRunner

    from semievol_local.cli import app

    f = tmp_path / "labeled.csv"
    f.write_text("question,answer\nq,A\n")
    res = CliRunner().invoke(app, ["report", str(f)])
    assert res.exit_code == 2 and "not a run folder" in res.stderr and "Traceback" not in res.stderr

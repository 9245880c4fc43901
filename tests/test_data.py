"""Tasks and their splits (`core.data`): what is read from CSV and JSONL, what is refused and where, and that the
unlabeled split's answers never reach an Item the method sees."""
from __future__ import annotations

import json

import pytest
from conftest import make_rows, write_split
from typer.testing import CliRunner

from semievol_local.cli import app
from semievol_local.core.data import (LETTERS, duplicate_options, find_split_file, load_heldout, load_split,
                                      load_task, read_rows)
from semievol_local.core.errors import UserError


def folder_with(tmp_path, raw: str, name="test.csv"):
    folder = tmp_path / "task"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(raw, encoding="utf-8")
    return folder


def test_csv_and_jsonl_give_the_same_items(tmp_path):
    rows = make_rows(6, 4)
    a = load_split(write_split(tmp_path / "a" / "test.csv", rows), "test").items
    b = load_split(write_split(tmp_path / "b" / "test.jsonl", rows), "test").items
    assert a == b and len(a) == 6
    assert [it.index for it in a] == list(range(6))
    assert all(it.closed and it.letters == "ABC" and it.answer in "ABC" for it in a)
    assert a[0].options == tuple(rows[0]["options"]) and a[0].meta == {"category": rows[0]["category"]}


def test_the_unlabeled_split_comes_without_answers_or_other_columns(tmp_path):
    """The leak guard: load_task gives unlabeled Items with no answer and no metadata (an extra column may hold
    the answer in other words, as fpb's `gt` does); only load_heldout, for the report, reads the answers."""
    rows = [dict(r, gt=r["answer"].lower()) for r in make_rows(5, 2)]
    write_split(tmp_path / "labeled.csv", make_rows(4, 1))
    write_split(tmp_path / "unlabeled.csv", rows)
    write_split(tmp_path / "test.csv", make_rows(3, 3))
    task = load_task(tmp_path)
    unl = task["unlabeled"].items
    assert [it.answer for it in unl] == [None] * 5 and all(it.meta == {} for it in unl)
    assert [it.answer for it in load_heldout(find_split_file(tmp_path, "unlabeled"))] == [r["answer"] for r in rows]
    assert all(it.answer is not None for it in task["labeled"].items + task["test"].items)


def test_an_unlabeled_split_without_an_answer_column_loads(tmp_path):
    rows = [{"question": r["question"], "options": r["options"]} for r in make_rows(3)]
    items = load_split(write_split(tmp_path / "unlabeled.csv", rows), "unlabeled", with_answers=False).items
    assert len(items) == 3 and all(it.answer is None for it in items)
    with pytest.raises(UserError, match=r"unlabeled.csv:2: no 'answer' column"):
        load_split(tmp_path / "unlabeled.csv", "unlabeled")


def test_open_answer_rows(tmp_path):
    f = write_split(tmp_path / "test.jsonl", [{"question": "2+2?", "answer": 4}, {"question": "q", "options": [],
                                                                                   "answer": "Paris"}])
    items = load_split(f, "test").items
    assert [(it.closed, it.answer) for it in items] == [(False, "4"), (False, "Paris")]
    bad = write_split(tmp_path / "bad.jsonl", [{"question": "q", "answer": " "}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: empty answer"):
        load_split(bad, "test")


@pytest.mark.parametrize("raw,needle", [
    ('query,options,answer\nq,"[""a"",""b""]",A\n', r"test.csv:2: no 'question' column \(columns are: query, options, answer\)"),
    ('question,options,answer\n ,"[""a"",""b""]",A\n', r"test.csv:2: empty question"),
    ('question,options,answer\nq,"[""a"",""b""]",E\n', r"test.csv:2: answer 'E' is not a letter within the options \(A-B\)"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, raw, needle):
    with pytest.raises(UserError, match=needle):
        load_split(folder_with(tmp_path, raw) / "test.csv", "test")


def test_a_task_folder_names_the_split_it_lacks(tmp_path):
    write_split(tmp_path / "labeled.csv", make_rows(2))
    with pytest.raises(UserError, match="test"):
        find_split_file(tmp_path, "test")
    assert find_split_file(tmp_path, "labeled") == tmp_path / "labeled.csv"


def test_rows_keep_their_line_numbers(tmp_path):
    raw = 'question,options,answer\n"two\nlines","[""a"",""b""]",A\nq2,"[""a"",""b""]",B\n'
    rows = read_rows(folder_with(tmp_path, raw) / "test.csv")
    assert [n for n, _ in rows] == [2, 4]  # the second row starts on line 4: the first spans two
    assert json.loads(rows[1][1]["options"]) == ["a", "b"]


def test_duplicate_options_are_found_up_to_case_and_spacing(tmp_path):
    f = write_split(tmp_path / "t.csv", [{"question": "q", "options": ["same", " Same", "z", "z"], "answer": "C"}])
    assert duplicate_options(load_split(f, "test").items[0]) == [("A", "B"), ("C", "D")]
    assert LETTERS[:4] == "ABCD"


def test_numbered_answers_are_option_numbers(tmp_path):
    """ARC's unlabeled split labels 26 questions 1-4 instead of A-D: read as the option's number;
    a number beyond the options is still refused."""
    from semievol_local.core.data import load_split

    for sub in ("ok", "bad", "superscript"):
        (tmp_path / sub).mkdir()
    ok = folder_with(tmp_path / "ok", raw='question,options,answer\nq,"[""a"",""b"",""c""]",3\nq2,"[""a"",""b""]",b\n')
    assert [it.answer for it in load_split(ok / "test.csv", "test").items] == ["C", "B"]
    for sub, answer in (("bad", "3"), ("superscript", "\u00b2")):  # '²' is a digit to str.isdigit, not to int()
        bad = folder_with(tmp_path / sub, raw=f'question,options,answer\nq,"[""a"",""b""]",{answer}\n')
        res = CliRunner().invoke(app, ["data", "check", str(bad / "test.csv")])
        assert res.exit_code == 2 and "test.csv:2" in res.stderr and repr(answer) in res.stderr, res.stderr


def test_windows_line_endings_a_bom_and_duplicate_options_are_accepted(tmp_path):
    """What spreadsheets write is read as meant: CRLF line ends (also inside a quoted field), a UTF-8 byte-order
    mark. Identical options (the paper's ARC, MMLU and MMLU-Pro splits have a few) load, and `data check`
    lists them."""
    from semievol_local.core.data import load_split

    raw = ('question,options,answer\r\n"two\r\nlines",["x","y"],B\r\nq2,"[""same"",""Same "",""z""]",C\r\n')
    raw = raw.replace('["x","y"]', '"[""x"",""y""]"')
    (tmp_path / "t").mkdir()
    f = tmp_path / "t" / "test.csv"
    f.write_bytes(b"\xef\xbb\xbf" + raw.encode())
    items = load_split(f, "test").items
    assert [it.question for it in items] == ["two\r\nlines", "q2"]
    assert [it.answer for it in items] == ["B", "C"] and items[1].options == ("same", "Same ", "z")
    res = CliRunner().invoke(app, ["data", "check", str(f)])
    assert res.exit_code == 0, res.stderr
    assert "warning: test: 1 question(s) with identical options (question 2: A = B)" in res.stderr

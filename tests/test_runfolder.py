"""runfolder: stages sealed by their inputs, reused or rebuilt; digests; one writer per folder."""
from __future__ import annotations

import pytest

from semievol_local.core.errors import UserError
from semievol_local.core.runfolder import RunFolder, check_folder, digest, exclusive


def test_a_stage_is_built_once_and_rebuilt_when_its_inputs_change(tmp_path):
    run, built = RunFolder(tmp_path / "run"), []

    def build(work):
        built.append(work)
        (work / "out.txt").write_text(str(len(built)))
        return {"n": len(built)}

    first = run.stage("s", {"x": 1}, build)
    assert not first.reused and first.path("out.txt").read_text() == "1"
    again = run.stage("s", {"x": 1}, build)
    assert again.reused and len(built) == 1 and again.path("out.txt").read_text() == "1"
    other = run.stage("s", {"x": 2}, build)
    assert not other.reused and other.path("out.txt").read_text() == "2"


def test_a_changed_output_is_not_reused(tmp_path):
    run = RunFolder(tmp_path / "run")
    s = run.stage("s", {"x": 1}, lambda work: (work / "out.txt").write_text("a") and None)
    s.path("out.txt").write_text("tampered")
    assert not run.stage("s", {"x": 1}, lambda work: (work / "out.txt").write_text("a") and None).reused


def test_digest_is_stable_and_order_free():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1}) != digest({"a": 1, "b": [2, 1]})


def test_a_second_writer_is_refused_and_a_failed_first_leaves_no_folder(tmp_path):
    root = tmp_path / "run"
    with exclusive(root):
        with pytest.raises(UserError, match="in use by another semievol command"):
            with exclusive(root):
                pass
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with exclusive(fresh):
            raise RuntimeError("bad input found before anything was written")
    assert not fresh.exists()


def test_a_file_in_the_way_is_named(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    assert check_folder(tmp_path / "run") == tmp_path / "run"
    for out in (f, f / "sub"):
        with pytest.raises(UserError, match="notes.txt is a file, not a folder"):
            check_folder(out)


def test_a_journal_resumes_its_own_finished_records_only(tmp_path):
    from semievol_local.core.files import Journal

    path = tmp_path / "job.partial.jsonl"
    with Journal(path, {"inputs": 1}) as j:
        j.write({"i": 0})
        j.write({"i": 1})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"i": 2, "torn')  # a kill mid-write
    again = Journal(path, {"inputs": 1})
    assert again.done == [{"i": 0}, {"i": 1}]
    with again:  # rewritten clean: the torn line is gone and appends start on a new line
        again.write({"i": 2})
    assert Journal(path, {"inputs": 1}).done == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert Journal(path, {"inputs": 2}).done == []  # other inputs: started afresh
    Journal(path, {"inputs": 1}).remove()
    assert not path.exists()


def test_an_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    import pytest

    from semievol_local.core.files import atomic_folder

    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as work:
            (work / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "out") as work:
        (work / "a.txt").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "whole"

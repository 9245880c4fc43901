"""The servers' API key: where it comes from, its file's checks, and the one-line errors of bad keys (no server
needed here; the servers' side is in test_server.py)."""
from __future__ import annotations

import os
import stat

import pytest
from typer.testing import CliRunner

from semievol_local.cli import app
from semievol_local.core import apikey
from semievol_local.core.errors import UserError


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A cache of its own and no key in the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(apikey.ENV, raising=False)
    return tmp_path


def _key_file(path, text="k3y-abc\n", mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_key_is_found_in_order_file_then_environment_then_the_generated_one(home, monkeypatch):
    assert apikey.find("") is None  # nothing anywhere: no key sent
    made, generated = apikey.for_server("")
    assert generated and made.source == str(apikey.default_path())
    assert stat.S_IMODE(apikey.default_path().stat().st_mode) == 0o600
    assert len(made.value) >= 40 and made.value in apikey.default_path().read_text()
    assert apikey.find("").value == made.value  # a client on this machine finds it
    again, generated = apikey.for_server("")
    assert not generated and again.value == made.value  # serve reuses it
    monkeypatch.setenv(apikey.ENV, "from-env")
    assert apikey.find("").value == "from-env" and apikey.find("").source == apikey.ENV
    f = _key_file(home / "k", "# the fleet's key\n\n  file-key  \nignored\n")
    assert apikey.find(str(f)).value == "file-key"
    assert "file-key" not in repr(apikey.find(str(f)))  # a key in a log line shows its source only


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("empty", "holds no key"),
    ("comments only", "holds no key"),
    ("group-readable", "chmod 600"),
    ("world-readable", "chmod 600"),
    ("a folder", "cannot read it"),
    ("spaces inside", "spaces inside"),
])
def test_bad_key_files_are_one_line_naming_the_file(home, case, message):
    f = home / "key"
    if case == "empty":
        _key_file(f, "")
    elif case == "comments only":
        _key_file(f, "# nothing\n\n")
    elif case == "group-readable":
        _key_file(f, mode=0o640)
    elif case == "world-readable":
        _key_file(f, mode=0o604)
    elif case == "a folder":
        f.mkdir(mode=0o700)
    elif case == "spaces inside":
        _key_file(f, "two words\n")
    with pytest.raises(UserError, match=message) as e:
        apikey.read(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_key_file_is_one_line(home):
    f = _key_file(home / "key", mode=0o000)
    with pytest.raises(UserError, match="cannot read it"):
        apikey.read(f)


@pytest.mark.parametrize("args, message", [
    (["serve", "--host", "0.0.0.0", "--no-api-key"], "need a key"),
    (["serve", "--api-key-file", "KEY"], "chmod 600"),
    (["eval", "--data", "DATA", "--server", "http://127.0.0.1:9", "--api-key-file", "KEY"], "chmod 600"),
    (["eval", "--data", "DATA", "--server", "http://127.0.0.1:9", "--api-key-file", "NOFILE"], "no such file"),
    (["eval", "--data", "DATA", "--server", "https://127.0.0.1:9"], "no TLS"),
])
def test_the_cli_ends_bad_keys_and_https_with_one_line_and_exit_2(home, tiny_q4, tiny_task, args, message):
    key = _key_file(home / "open.key", mode=0o644)
    args = [str(key) if a == "KEY" else str(home / "none.key") if a == "NOFILE" else str(tiny_task) if a == "DATA"
            else a for a in args]
    res = CliRunner().invoke(app, [*args, "--model", str(tiny_q4)])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not apikey.default_path().exists()  # nothing generated on the way to an error


def test_is_loopback():
    assert all(apikey.is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(apikey.is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.2", "example.org"))

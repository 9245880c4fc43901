"""config: options declared once, checked where declared, and the values parsed there (durations, server
URLs, train hosts)."""
from __future__ import annotations

import pytest

from semievol_local.core import config
from semievol_local.core.config import EngineConfig, RunConfig, TrainConfig
from semievol_local.core.errors import UserError


@pytest.mark.parametrize("text, seconds", [
    ("45m", 2700), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("10", 600),  # a bare number is minutes
    (" 1.5h ", 5400),
])
def test_durations(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0m", "abc", "45x", "-5m", "m"])
def test_bad_durations_are_one_line(text):
    with pytest.raises(UserError, match="--time-budget"):
        config.parse_duration(text)


def test_server_urls_from_a_list_or_a_file(tmp_path):
    assert config.parse_urls("10.0.0.2:8080, http://h:9/") == ["http://10.0.0.2:8080", "http://h:9"]
    f = tmp_path / "servers.txt"
    f.write_text("# the fleet\nhttp://a:1\n\nb:2  # second\n")
    assert config.parse_urls(str(f)) == ["http://a:1", "http://b:2"]
    for bad, says in (("https://a:1", "no TLS"), ("ftp://a", "http://HOST:PORT")):
        with pytest.raises(UserError, match=says):
            config.parse_urls(bad)
    f.write_text("# nothing\n")
    with pytest.raises(UserError, match="lists no URLs"):
        config.parse_urls(str(f))


def test_train_hosts_are_two_or_more_addresses():
    assert config.parse_hosts("127.0.0.1,127.0.0.1") == ["127.0.0.1", "127.0.0.1"]
    with pytest.raises(UserError, match="not an IP address"):
        config.parse_hosts("localhost,127.0.0.1")
    with pytest.raises(UserError, match="one host is one process"):
        config.parse_hosts("10.0.0.1")


def test_check_names_the_flag_and_the_range():
    config.check(RunConfig())  # the defaults pass their own checks
    config.check(TrainConfig())
    config.check(EngineConfig())
    with pytest.raises(UserError, match="--theta 101: give a value >= 0 and <= 100"):
        config.check(RunConfig(theta=101))
    with pytest.raises(UserError, match="--server"):
        config.check(EngineConfig(server="https://x:1"))

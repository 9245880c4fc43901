"""The llama-server backend against the in-process engine, on real llama-server processes (127.0.0.1, free
ports), built from the same llama.cpp source on first use; skipped only where it could not be built."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from semievol_local.cli import app
from semievol_local.core.config import EngineConfig
from semievol_local.core.data import load_task
from semievol_local.core.errors import UserError
from semievol_local.core.prompts import question_messages
from semievol_local import engines
from semievol_local.engines import llama_engine, llama_server, server_engine, weights


@pytest.fixture(scope="session")
def server_bin():
    try:
        return llama_server.binary(say=lambda msg: print(msg, file=sys.stderr))
    except UserError as e:
        pytest.skip(f"llama-server could not be built here: {e}")


@pytest.fixture(scope="module")
def warm(tiny_q4, tmp_path_factory):
    """A trained adapter for the tiny model (two epochs on the tiny task)."""
    from conftest import write_task

    root = tmp_path_factory.mktemp("warm")
    task = write_task(root / "task")
    res = CliRunner().invoke(app, ["train", "--model", str(tiny_q4), "--data", str(task), "--out", str(root / "w"),
                                   "--epochs", "2", "--batch-size", "4", "--lr", "1e-3"])
    assert res.exit_code == 0, res.stderr
    return root / "w" / "adapter.gguf", task


@pytest.fixture
def servers(server_bin, tiny_q4, warm):
    """Start n local servers with the warm adapter loaded; stopped at the end."""
    procs = []

    def start(n: int = 1, parallel: int = 1, model=None):
        urls = []
        for _ in range(n):
            # what `semievol serve --model tiny_q4` serves: the float32 copy the in-process engine computes with
            served = model or weights.inference_weights(tiny_q4, EngineConfig()).path
            p, url = llama_server.start(served, adapters=[warm[0]], n_ctx=512, parallel=parallel, threads=1)
            procs.append(p)
            urls.append(url)
        return urls, procs[-n:]

    yield start
    for p in procs:
        llama_server.stop(p)


def prompts(engine, task: Path) -> list[tuple[list[int], int]]:
    items = load_task(task)["test"].items
    return [(engine.tokenize(engine.template.prompt(question_messages(it), answer_prefix=True)), len(it.options))
            for it in items]


def test_scores_and_greedy_answers_equal_the_in_process_engine(tiny_q4, warm, servers):
    adapter, task = warm
    (url,), _ = servers(1)
    local = llama_engine.Engine(tiny_q4, EngineConfig(n_ctx=512))
    fleet = engines.load(tiny_q4, EngineConfig(n_ctx=512, server=url))
    assert isinstance(fleet, server_engine.Fleet) and fleet.n_ctx == 512
    for path in (None, adapter):
        local.set_adapter(path)
        fleet.set_adapter(path)
        for toks, n in prompts(local, task):
            text = local.detokenize(toks)
            assert fleet.tokenize(text) == local.tokenize(text) and len(local.tokenize(text)) > 0
            a, b = local.score(toks, n), fleet.score(toks, n)
            np.testing.assert_allclose(b.probs, a.probs, rtol=1e-5, atol=1e-7)  # float32 softmax on the server
            assert abs(a.mass - b.mass) <= 1e-5 * a.mass and abs(a.entropy - b.entropy) <= 1e-5
            assert np.argmax(a.probs) == np.argmax(b.probs)
            ga = local.sample(toks[:-2], [1], temperature=0.0, max_tokens=8)[0]
            gb = fleet.sample(toks[:-2], [1], temperature=0.0, max_tokens=8)[0]
            assert ga.tokens == gb.tokens and ga.text == gb.text
            np.testing.assert_allclose(gb.logprobs, ga.logprobs, rtol=1e-4, atol=1e-5)
    # the adapter changes the scores (it really is applied, and really is off without it)
    fleet.set_adapter(None)
    base = [fleet.score(t, n).probs for t, n in prompts(local, task)]
    fleet.set_adapter(adapter)
    tuned = [fleet.score(t, n).probs for t, n in prompts(local, task)]
    assert max(float(np.abs(x - y).max()) for x, y in zip(base, tuned)) > 1e-3
    local.close()


def test_collaboration_over_two_servers_equals_in_process_and_survives_a_killed_server(tiny_q4, warm, servers):
    """The pipeline's collaboration step, question by question, in process and over two servers; one server
    is killed a third of the way: no question is lost and no label changes."""
    from semievol_local.core.config import RunConfig
    from semievol_local.method import collaboration

    adapter, task = warm
    t = load_task(task)
    labeled, unlabeled = t["labeled"].items, t["unlabeled"].items
    cfg = RunConfig()
    learners = collaboration.learner_configs(cfg)

    def one(eng, pos):
        return collaboration.collaborate_one(eng, unlabeled[pos], labeled[:3], learners, "score", cfg, adapter)

    local = llama_engine.Engine(tiny_q4, EngineConfig(n_ctx=512))
    want = dict(local.each(range(len(unlabeled)), one))
    local.close()

    urls, procs = servers(2)
    fleet = engines.load(tiny_q4, EngineConfig(n_ctx=512, server=",".join(urls)))
    got, killed = {}, False
    for pos, rec in fleet.each(range(len(unlabeled)), one):
        got[pos] = rec
        if len(got) == len(unlabeled) // 3 and not killed:
            procs[0].send_signal(signal.SIGKILL)
            killed = True
    assert killed and sorted(got) == list(range(len(unlabeled)))
    assert not fleet.servers[0].alive and fleet.servers[1].alive
    for pos in want:
        assert got[pos]["pseudo_label"] == want[pos]["pseudo_label"], pos
        assert got[pos]["consistent"] == want[pos]["consistent"]
        assert abs(got[pos]["entropy"] - want[pos]["entropy"]) <= 1e-5


def test_a_run_that_loses_every_server_stops_with_one_line(tiny_q4, warm, servers):
    (url,), (proc,) = servers(1)
    fleet = engines.load(tiny_q4, EngineConfig(n_ctx=512, server=url, server_timeout=5))
    toks = fleet.tokenize("hello")
    llama_server.stop(proc)
    with pytest.raises(UserError, match="every llama-server stopped answering"):
        list(fleet.each(range(3), lambda lane, i: lane.score(toks + [i], 2), max_wait=2))


def test_a_server_with_another_model_or_without_the_adapter_is_refused(tiny_q4, warm, servers, tmp_path):
    (url,), _ = servers(1)  # serves what `auto` picked for the Q4_1 file (measured here: on a busy machine either)
    served = weights.inference_weights(tiny_q4, EngineConfig()).kind
    with pytest.raises(UserError, match="serves other weights"):  # the other of the file and its float32 copy
        engines.load(tiny_q4, EngineConfig(n_ctx=512, server=url, weights="f32" if served == "file" else "file"))
    from tinymodel import write_tiny_gguf

    other_q4 = write_tiny_gguf(tmp_path / "other-q4_1.gguf", qtype="Q4_1", seed=1)  # same shapes, other weights
    with pytest.raises(UserError, match="not the float32 copy|serves other weights"):
        engines.load(other_q4, EngineConfig(n_ctx=512, server=url))
    (q4_url,), _ = servers(1, model=tiny_q4)
    with pytest.raises(UserError, match="serves other weights"):
        engines.load(tiny_q4, EngineConfig(n_ctx=512, server=q4_url, weights="f32"))
    fleet = engines.load(tiny_q4, EngineConfig(n_ctx=512, server=url, server_timeout=1))
    other = tmp_path / "other.gguf"
    other.write_bytes(warm[0].read_bytes())
    fleet.set_adapter(other)
    with pytest.raises(UserError, match="has not loaded the adapter"):
        fleet.score(fleet.tokenize("Answer:"), 2)
    with pytest.raises(UserError, match="no llama-server answers there"):
        engines.load(tiny_q4, EngineConfig(server="http://127.0.0.1:9"))


@pytest.mark.parametrize("value, message", [("ftp://x:1", "http://HOST:PORT"), ("http://", "http://HOST:PORT")])
def test_bad_server_urls_are_one_line(tiny_q4, tiny_task, tmp_path, value, message):
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_q4), "--data", str(tiny_task), "--server", value])
    assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.stderr


def _post(url: str, path: str, body, key: str | None = None) -> int:
    """The HTTP status of a POST to a server, with or without `Authorization: Bearer key`."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_serve_then_eval_through_it_equals_eval_in_process(server_bin, tiny_q4, warm, tmp_path, monkeypatch):
    """`semievol serve --run` as a user starts it, `semievol eval --server` against it, Ctrl-C stops it; and
    it restarts with an adapter the run finishes while it serves. With no key anywhere, serve generates one
    (mode 0600, in the cache) that eval on the same machine finds; requests without it are refused, and a
    wrong key ends eval with one line."""
    from semievol_local.core import apikey

    adapter, task = warm
    run = tmp_path / "run"
    (run / "warmup").mkdir(parents=True)
    cache = tmp_path / "cache"  # the key's cache (the binary comes from $SEMIEVOL_LLAMA_SERVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "XDG_CACHE_HOME": str(cache),
           "SEMIEVOL_LLAMA_SERVER": str(server_bin)}
    env.pop(apikey.ENV, None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv(apikey.ENV, raising=False)
    serve = subprocess.Popen([sys.executable, "-m", "semievol_local.cli", "serve", "--model", str(tiny_q4),
                              "--run", str(run), "--n-ctx", "512", "--n-threads", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = serve.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), serve.stderr.read() if serve.poll() is not None else url
        key_path = cache / "semievol" / "api-key"
        assert oct(key_path.stat().st_mode & 0o777) == oct(0o600)
        key = key_path.read_text().strip()
        assert _post(url, "/lora-adapters", [{"id": 0, "scale": 7.5}]) == 401
        assert _post(url, "/completion", {"prompt": [1, 2], "n_predict": 1}) == 401
        assert _post(url, "/completion", {"prompt": [1, 2], "n_predict": 1}, key="not-" + key) == 401
        assert _post(url, "/completion", {"prompt": [1, 2], "n_predict": 1}, key=key) == 200
        import urllib.request
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            assert r.status == 200  # open: clients and `serve` itself wait on it
        # the run finishes its warm-up: the server restarts with that adapter, and eval through it waits for it
        (run / "warmup" / "adapter.gguf").write_bytes(adapter.read_bytes())
        runner = CliRunner()
        a = runner.invoke(app, ["eval", "--model", str(tiny_q4), "--data", str(task), "--n-ctx", "512",
                                "--adapter", str(run / "warmup" / "adapter.gguf"), "--json", str(tmp_path / "a.json")])
        b = runner.invoke(app, ["eval", "--model", str(tiny_q4), "--data", str(task), "--n-ctx", "512",
                                "--adapter", str(run / "warmup" / "adapter.gguf"), "--server", url,
                                "--json", str(tmp_path / "b.json")])
        assert a.exit_code == 0 and b.exit_code == 0, (a.stderr, b.stderr)
        wrong = tmp_path / "wrong.key"
        wrong.write_text("not-the-key\n")
        wrong.chmod(0o600)
        tic = time.monotonic()
        c = runner.invoke(app, ["eval", "--model", str(tiny_q4), "--data", str(task), "--n-ctx", "512",
                                "--server", url, "--api-key-file", str(wrong)])
        assert c.exit_code == 2 and "HTTP 401" in c.stderr and str(wrong) in c.stderr, c.stderr
        assert len(c.stderr.strip().splitlines()) == 1 and url in c.stderr and "not-the-key" not in c.stderr
        assert time.monotonic() - tic < 30  # refused at once, not retried as a server that is down
        pa, pb = (json.loads((tmp_path / f).read_text())["predictions"] for f in ("a.json", "b.json"))
        assert [p["predicted"] for p in pa] == [p["predicted"] for p in pb]
        np.testing.assert_allclose([p["probs"] for p in pb], [p["probs"] for p in pa], rtol=1e-5, atol=1e-7)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
    out, err = serve.stdout.read(), serve.stderr.read()
    assert serve.returncode == 0, err
    assert str(key_path) in err and key not in out + err  # where the key is, never the key
    time.sleep(0.5)
    with pytest.raises(OSError):  # the servers went with it
        import urllib.request
        urllib.request.urlopen(url + "/health", timeout=2)


def test_a_whole_run_through_a_served_fleet_equals_the_run_in_process(server_bin, tiny_q4, tmp_path):
    """What a user does: `semievol serve --run RUN` in one terminal, `semievol run --server URL --out RUN` in
    another. The servers restart with each adapter the run trains; every pseudo-label, selection and test
    prediction equals an in-process run's."""
    from conftest import write_task

    task = write_task(tmp_path / "task")
    key = "fleet-" + os.urandom(16).hex()
    key_file = tmp_path / "fleet.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    logs = tmp_path / "tmp"  # where serve's llama-servers write their logs
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TMPDIR": str(logs)}
    common = ["run", "--model", str(tiny_q4), "--data", str(task), "--epochs", "1", "--batch-size", "4",
              "--min-letter-mass", "0", "--n-ctx", "512", "--force"]
    local = subprocess.run([sys.executable, "-m", "semievol_local.cli", *common, "--out", str(tmp_path / "local")],
                           capture_output=True, text=True, env=env, timeout=900)
    assert local.returncode == 0, local.stderr
    run = tmp_path / "served"
    run.mkdir()
    serve = subprocess.Popen([sys.executable, "-m", "semievol_local.cli", "serve", "--model", str(tiny_q4), "--run",
                              str(run), "--n-ctx", "512", "--n-threads", "1", "--servers", "2",
                              "--api-key-file", str(key_file)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        urls = [serve.stdout.readline().strip() for _ in range(2)]
        assert all(u.startswith("http://") for u in urls), urls
        assert all(_post(u, "/completion", {"prompt": [1], "n_predict": 1}) == 401 for u in urls)
        served = subprocess.run([sys.executable, "-m", "semievol_local.cli", *common, "--out", str(run),
                                 "--server", ",".join(urls), "--api-key-file", str(key_file)],
                                capture_output=True, text=True, env=env, timeout=900)
        assert served.returncode == 0, served.stderr
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(30)
    # the key is in no file of the run folder, no server log and nothing either command printed
    files = [f for f in [*run.rglob("*"), *logs.rglob("*")] if f.is_file()]
    assert any(f.name.startswith("semievol-llama-server-") for f in files)  # the logs were looked at
    assert not [f for f in files if key.encode() in f.read_bytes()]
    assert key not in served.stdout + served.stderr + serve.stdout.read() + serve.stderr.read()

    def read(folder, name):
        return [json.loads(x) for x in (folder / name).read_text().splitlines()]

    a = read(tmp_path / "local" / "round1" / "selection", "pseudo_labels.jsonl")
    b = read(run / "round1" / "selection", "pseudo_labels.jsonl")
    assert [r["pseudo_label"] for r in a] == [r["pseudo_label"] for r in b]
    assert [r["selected"] for r in a] == [r["selected"] for r in b]
    np.testing.assert_allclose([r["entropy"] for r in b], [r["entropy"] for r in a], rtol=1e-5, atol=1e-6)
    for stage in ("eval/vanilla", "eval/sft", "round1/eval"):
        pa = json.loads((tmp_path / "local" / stage / "eval.json").read_text())["predictions"]
        pb = json.loads((run / stage / "eval.json").read_text())["predictions"]
        assert [p["predicted"] for p in pa] == [p["predicted"] for p in pb], stage

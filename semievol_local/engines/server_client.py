"""One llama-server over HTTP: what it serves (slots, context per slot, adapters, the model file), probed at
start; requests with the API key; and what a failure means. `ServerDown` (refused, reset, timed out, HTTP
5xx) sends the question to another server; a 401 or another 4xx is the user's to fix and ends the run with
one line. The fleet that spreads questions over servers is `server_engine`'s.
"""
from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from ..core import apikey
from ..core.errors import UserError

log = logging.getLogger(__name__)


class ServerDown(Exception):
    """A server did not answer (refused, reset, timed out, or an HTTP 5xx)."""


class Server:
    """One llama-server: what it serves (slots, context per slot, adapters), probed at start."""

    def __init__(self, url: str, timeout: float, key=None):
        self.url, self.timeout, self.key = url, timeout, key  # key: an `apikey.Key`, sent with every request
        self.alive = True
        self._lock = threading.Lock()
        props = self.request("GET", "/props", timeout=min(timeout, 10))
        self.slots = int(props.get("total_slots", 1))
        self.model_file = Path(str(props.get("model_path") or "")).name  # the GGUF it was started with
        gen = props.get("default_generation_settings", {})
        self.n_ctx = int(gen.get("n_ctx") or props.get("n_ctx") or 0)
        self.refresh()
        models = self.request("GET", "/v1/models", timeout=min(timeout, 10)).get("data") or [{}]
        self.meta = models[0].get("meta") or {}

    def refresh(self) -> None:
        """What the server has loaded now (a `semievol serve --run` restarts it when the run trains an adapter)."""
        self.adapters = {str(Path(a["path"]).resolve()): int(a["id"])
                         for a in self.request("GET", "/lora-adapters", timeout=min(self.timeout, 10))}

    def wait_for_adapter(self, key: str) -> None:
        """Until the server has the adapter `key` loaded: a `semievol serve --run` server restarts with each
        adapter the run trains. Gives up after the timeout with a line saying how to load it."""
        deadline, wait, told = time.monotonic() + self.timeout, 0.5, False
        with self._lock:
            while True:
                try:
                    self.refresh()
                    if key in self.adapters:
                        return
                except ServerDown:
                    pass  # restarting
                if time.monotonic() > deadline:
                    raise UserError(f"{self.url} has not loaded the adapter {key}; serve with `semievol serve --run "
                                    f"RUN` (it loads each adapter the run trains) or restart it with `--lora {key}`, "
                                    "then run the same command again: finished work is kept")
                if not told:
                    log.warning("waiting for %s to load %s", self.url, key)
                    told = True
                time.sleep(wait)
                wait = min(wait * 2, 10.0)

    def request(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None,
                conn: http.client.HTTPConnection | None = None):
        parts = urlsplit(self.url)
        own = conn is None
        c = conn or http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout or self.timeout)
        try:
            headers = {"Content-Type": "application/json"}
            if self.key is not None:
                headers["Authorization"] = f"Bearer {self.key.value}"
            c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            r = c.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException) as e:
            c.close()
            raise ServerDown(f"{self.url}: {type(e).__name__}: {e}") from None
        finally:
            if own:
                c.close()
        if r.status >= 500:
            raise ServerDown(f"{self.url}{path}: HTTP {r.status}: {data[:200]!r}")
        if r.status == 401:  # a wrong key is the user's to fix: never retried elsewhere as if the server were down
            said = (f"the API key from {self.key.source} is not its key" if self.key is not None
                    else "it needs an API key and none was found")
            raise UserError(f"--server {self.url} refused the request (HTTP 401): {said}; {apikey.HOW} (`semievol serve` "
                            "printed where the servers' key is)")
        if r.status >= 400:
            raise UserError(f"{self.url}{path}: the server refused the request (HTTP {r.status}): "
                            f"{data[:300].decode(errors='replace')}")
        return json.loads(data)

"""SIGTERM: stop accepting, finish what runs, end what outlasts the grace period with an error (never
silently), exit 0."""
from __future__ import annotations

import json
import threading

import pytest
import requests

from .conftest import Server


def _stream(url, body, out: list, started: threading.Event):
    with requests.post(url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line == b"data: [DONE]":
                out.append("DONE")
            elif line.startswith(b"data: "):
                out.append(json.loads(line[6:]))
                started.set()


def _plain(url, body, out: list):
    r = requests.post(url + "/v1/completions", json=body, timeout=60)
    out.append((r.status_code, r.json()))


@pytest.mark.parametrize("extra", [[], ["--api-workers", "2"]], ids=["one-process", "api-workers"])
def test_sigterm_finishes_running_requests_ends_the_rest_and_exits_0(extra):
    s = Server("--preset", "debug", "--device", "cpu", "--max-slots", "4", "--grace", "2", *extra)
    try:
        short, long_, plain = [], [], []
        started = [threading.Event(), threading.Event()]
        threads = [
            threading.Thread(target=_stream, args=(s.url, {"prompt": "ab", "max_tokens": 40}, short, started[0])),
            threading.Thread(target=_stream, args=(s.url, {"prompt": "cd", "max_tokens": 10**7}, long_, started[1])),
            threading.Thread(target=_plain, args=(s.url, {"prompt": "ef", "max_tokens": 10**7}, plain)),
        ]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(30)
        s.proc.terminate()
        for t in threads:
            t.join(60)
        assert s.proc.wait(60) == 0
        try:
            refused = requests.post(s.url + "/v1/completions", json={"prompt": "a"}, timeout=5).status_code != 200
        except requests.ConnectionError:
            refused = True
        assert refused
    finally:
        s.stop()
    # The short stream completed normally; the long ones ended with an error, not a silent cut.
    assert short[-1] == "DONE"
    assert [c["choices"][0]["finish_reason"] for c in short[:-1] if c["choices"]][-1] == "length"
    assert sum(c["usage"]["completion_tokens"] for c in short[:-1] if c.get("usage")) == 40
    errors = [c for c in long_ if c != "DONE" and "error" in c]
    assert errors and "shut down" in errors[0]["error"]["message"]
    assert plain[0][0] == 503 and "shut down" in plain[0][1]["error"]["message"]

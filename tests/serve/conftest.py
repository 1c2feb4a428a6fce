"""A `based serve` process on a free port, and the model it serves (a tiny saved checkpoint)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests
import torch

from based.bench.serve import free_port

# A debug-preset model whose larger initial weights make greedy text depend on the whole prompt: with the
# preset's 0.02 its tied embeddings just repeat the last byte, which any routing bug would reproduce too.
INIT_RANGE = 0.3


def save_model(path) -> None:
    from based import BasedConfig, BasedForCausalLM

    torch.manual_seed(0)
    BasedForCausalLM(BasedConfig.from_preset("debug", initializer_range=INIT_RANGE)).save_pretrained(path)


def stream_completion(url: str, body: dict) -> tuple[str, str | None, dict | None]:
    """Text, finish reason and usage of one raw SSE completion stream (no error chunk allowed)."""
    import json

    text, reason, usage = [], None, None
    with requests.post(url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                text.append(c["text"])
                reason = c["finish_reason"] or reason
    return "".join(text), reason, usage


def check_disconnect_frees_the_slot(server) -> dict[str, float]:
    """A stream dropped after a few chunks: its request was running in one slot, then nothing runs. Returns
    /metrics afterwards."""
    server.wait_idle()
    body = {"prompt": "Hello", "max_tokens": 100000, "temperature": 0, "stream": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        during = server.metrics()
    assert during["based_requests_running"] == 1 and during["based_slots_used"] == 1
    after = server.wait_idle()
    assert after["based_requests_running"] == 0 and after["based_slots_used"] == 0
    return after


def check_queue_full_gets_429(server, holders: int, waiting: int) -> None:
    """`holders` long streams fill the slots and `waiting` of them the queue: one more request gets 429 with
    Retry-After and an OpenAI rate_limit_error; once they go, nothing runs or waits."""
    import threading

    server.wait_idle()
    stop = threading.Event()

    def hold():  # a long stream that occupies a slot or a place in the queue until told to go
        with requests.post(server.url + "/v1/completions", stream=True, timeout=60,
                           json={"prompt": "z", "max_tokens": 100000, "stream": True}) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=hold) for _ in range(holders)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.metrics()["based_requests_waiting"] < waiting and time.monotonic() < deadline:
        time.sleep(0.1)
    r = requests.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=10)
    stop.set()
    for t in threads:
        t.join(60)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    after = server.wait_idle(30)
    assert after["based_requests_running"] == 0 and after["based_requests_waiting"] == 0


class Server:
    def __init__(self, *args: str, timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "based.cli", "serve", "--port", str(self.port), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"based serve exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("based serve did not come up")
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(requests.get(self.url + "/metrics", timeout=10).text):
            for s in family.samples:
                if not s.labels:
                    out[s.name] = s.value
        return out

    def wait_idle(self, timeout: float = 20.0) -> dict[str, float]:
        """/metrics once no request runs or waits (the engine frees slots between steps)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["based_requests_running"] == 0 and m["based_requests_waiting"] == 0 and m["based_slots_used"] == 0:
                return m
            if time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-model")
    save_model(path)
    return path


@pytest.fixture(scope="package")
def server(checkpoint):
    """One server shared by the default tests: 8 slots, so 32 clients queue for them."""
    s = Server("--checkpoint", str(checkpoint), "--max-slots", "8", "--max-waiting", "48", "--prefill-chunk", "24",
               "--model-name", "tiny")
    yield s
    s.stop()


@pytest.fixture(scope="package")
def model(checkpoint):
    from based import BasedForCausalLM

    return BasedForCausalLM.from_pretrained(checkpoint).eval()


def greedy_text(model, prompt: str, max_tokens: int) -> str:
    """What based.generation.generate continues `prompt` with, alone, as text (byte tokens)."""
    from based.generation import generate
    from based.serve.text import ByteTokenizer

    tok = ByteTokenizer()
    ids = generate(model, torch.tensor([tok.encode(prompt)]), max_tokens)[0].tolist()
    return tok.decode_batch([ids])[0]

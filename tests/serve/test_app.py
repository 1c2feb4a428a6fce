"""The app in-process (starlette's TestClient): a full-attention model's positional limit."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from based import BasedConfig, BasedForCausalLM  # noqa: E402
from based.generation.state import full_attention_limit  # noqa: E402
from based.serve.app import create_app  # noqa: E402
from based.serve.scheduler import Scheduler  # noqa: E402
from based.serve.text import ByteTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def transformer_client():
    model = BasedForCausalLM(BasedConfig.from_preset("transformer-debug")).eval()
    scheduler = Scheduler(model, ByteTokenizer(), max_slots=2, max_waiting=4, prefill_chunk=256)
    with TestClient(create_app(scheduler, "t", full_attention_limit(model))) as client:
        yield client


def test_prompt_over_the_full_attention_limit_gets_400(transformer_client):
    r = transformer_client.post("/v1/completions", json={"prompt": "x" * 600, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "512" in r.json()["error"]["message"]
    r = transformer_client.post("/v1/completions", json={"prompt": "x" * 500, "max_tokens": 20})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    # At the limit exactly, and prefilled in two pieces (prefill_chunk 256): served.
    r = transformer_client.post("/v1/completions", json={"prompt": "x" * 500, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12

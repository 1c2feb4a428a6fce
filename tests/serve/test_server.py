"""`based serve` against the official openai client and raw HTTP, one server process for the module."""
from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

openai = pytest.importorskip("openai")

from based.serve.text import default_chat_template, render_chat  # noqa: E402

from .conftest import greedy_text  # noqa: E402
from .conftest import check_disconnect_frees_the_slot, check_queue_full_gets_429  # noqa: E402
from .conftest import stream_completion as _stream  # noqa: E402

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog", "a", "def f(x):\n    return",
           "Return the value of x and keep it for later use in the next function call"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_completion_greedy_equals_generate(server, client, model):
    for prompt in PROMPTS[:3]:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == greedy_text(model, prompt, 12)
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(prompt.encode()) and out.usage.completion_tokens == 12
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completion_renders_the_default_template(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = render_chat(default_chat_template(), messages, None, None)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == greedy_text(model, prompt, 10)
    assert out.usage.prompt_tokens == len(prompt.encode())
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []


def test_streaming_equals_plain(client, model):
    prompt = PROMPTS[1]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True))
    assert len([c for c in chunks if c.choices]) > 2  # arrived in pieces
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy_text(model, prompt, 20)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == len(prompt)


def test_stop_strings_across_token_boundaries(client, model):
    prompt = PROMPTS[3]
    full = greedy_text(model, prompt, 30)
    stop = full[9:12]  # three byte tokens: matched across boundaries
    expected = full[: full.index(stop)]
    for stream in (False, True):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0,
                                        stop=["\x00never", stop], stream=stream)
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert (text, reason) == (expected, "stop")


def test_n_and_seeded_sampling(client):
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    a = client.completions.create(n=3, **kwargs)
    b = client.completions.create(n=3, **kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3  # choice i draws with seed + i
    assert a.usage.completion_tokens == 48 and a.usage.prompt_tokens == len(PROMPTS[0])  # the prompt once
    top = client.completions.create(model="tiny", prompt="ab", max_tokens=2, seed=2**63 - 1, n=2)
    assert len(top.choices) == 2  # seed + 1 wraps around instead of overflowing
    other = client.completions.create(n=1, **{**kwargs, "seed": 99}).choices[0].text
    assert other != texts[0]


def test_32_concurrent_streams_with_different_parameters(server, model):
    rng = random.Random(0)
    bodies = []
    for i in range(32):
        prompt = PROMPTS[i % len(PROMPTS)] + f" #{i}"
        if i % 2 == 0:  # greedy, whatever top_p / top_k say
            bodies.append({"prompt": prompt, "max_tokens": rng.randint(4, 24), "temperature": 0,
                           "top_p": rng.choice([1.0, 0.5]), "top_k": rng.choice([0, 5])})
        else:
            bodies.append({"prompt": prompt, "max_tokens": rng.randint(4, 24), "temperature": rng.uniform(0.3, 1.5),
                           "top_p": rng.uniform(0.5, 1.0), "top_k": rng.choice([0, 3, 50]), "seed": i})
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda b: _stream(server.url, b), bodies))
    for body, (text, reason, usage) in zip(bodies, together):
        assert reason == "length" and usage["completion_tokens"] == body["max_tokens"]
        if body["temperature"] == 0:
            assert text == greedy_text(model, body["prompt"], body["max_tokens"])
    # A seeded request draws the same text alone as in the crowd (another slot, other neighbours).
    for body, (text, _, _) in list(zip(bodies, together))[1:12:2]:
        assert _stream(server.url, body)[0] == text


def test_disconnect_frees_the_slot(server):
    assert check_disconnect_frees_the_slot(server)["based_state_memory_bytes"] == 0


def test_plain_request_disconnect_frees_the_slot(server):
    server.wait_idle()
    try:
        requests.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 100000}, timeout=1.5)
    except requests.Timeout:
        pass
    after = server.wait_idle()
    assert after["based_requests_running"] == 0 and after["based_slots_used"] == 0


BAD = [
    ({"prompt": "a", "foo": 1}, "foo"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "temperature": 2.5}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_k": -2}, "top_k"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "stop": 3}, "stop"),
    ({"prompt": "a", "seed": "1"}, "seed"),
    ({"prompt": "a", "logprobs": 2}, "logprobs"),
    ({"prompt": "a", "logprobs": 0}, "logprobs"),  # before: a 200 without the chosen tokens' logprobs it asks for
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    # Before: a 500 (UnicodeEncodeError in the tokenizer), a 503 (int64 overflow in the scheduler), and NaN
    # refused as "should be less than or equal to 2".
    ({"prompt": "a\ud800"}, "prompt"),
    ({"prompt": "a", "max_tokens": 2**63}, "max_tokens"),
    ({"prompt": "a", "temperature": float("nan")}, "temperature"),
    ({"prompt": "a", "top_p": float("nan")}, "top_p"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_malformed_completion_gets_400_naming_the_field(server, body, param):
    # json.dumps rather than json=: requests refuses to send NaN, which Python clients' JSON does send.
    r = requests.post(server.url + "/v1/completions", data=json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"
    if any(v != v for v in body.values() if isinstance(v, float)):
        assert "finite" in error["message"], error


def test_malformed_chat_and_body(server):
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "bot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "\udfff"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = requests.post(server.url + "/v1/completions", data=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert requests.get(server.url + "/v1/nothing").status_code == 404


def test_token_id_prompts_are_refused_as_such(server):
    """OpenAI takes token ids as prompt; before, they got "prompt: Input should be a valid string"."""
    for prompt in ([1, 2, 3], [[1, 2], [3]], ["a", 7]):
        r = requests.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=10)
        error = _openai_error(r, 400)
        assert error["param"] == "prompt" and "token ids are not supported" in error["message"], error


def test_chat_content_as_text_parts(client):
    """OpenAI's content parts (many clients send them): text parts are their texts joined by newlines (as vLLM);
    before, any list was a 400. Other parts are refused by name."""
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}]
    a, b = (client.chat.completions.create(model="tiny", messages=m, max_tokens=8, temperature=0) for m in (parts, plain))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    for content in ([{"type": "image_url", "image_url": {"url": "data:,"}}], ["Hi"], [{"type": "text"}]):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=2)
        assert e.value.param == "messages.0.content" and "text part" in e.value.message


def test_more_sequences_than_the_server_holds_gets_400_not_429(server):
    """Before: prompts x n beyond the slots and the queue (8 + 48 here) got a 429 "retry later", forever."""
    for body, param in (({"prompt": ["a", "b"], "n": 29}, "n"), ({"prompt": ["a"] * 57}, "prompt")):
        r = requests.post(server.url + "/v1/completions", json={**body, "max_tokens": 1}, timeout=10)
        error = _openai_error(r, 400)
        count = len(body["prompt"]) * body.get("n", 1)
        assert error["param"] == param and f"= {count} sequences" in error["message"], error
    r = requests.post(server.url + "/v1/completions", json={"prompt": ["a"] * 8, "n": 6, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 48


def _openai_error(r, status: int) -> dict:
    """The error of a response that must be OpenAI's shape, exactly: {"error": {message, type, param, code}}."""
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_framework_errors_use_the_openai_error_shape(server, client):
    """Before: Starlette's and FastAPI's own answers ({"detail": "Not Found"}) for unknown routes and methods."""
    url = server.url
    for method in ("get", "post"):
        error = _openai_error(requests.request(method, url + "/v1/nothing", timeout=10), 404)
        assert f"{method.upper()} /v1/nothing" in error["message"] and "POST /v1/completions" in error["message"]
        assert error["type"] == "invalid_request_error"
    r = requests.get(url + "/v1/completions", timeout=10)
    error = _openai_error(r, 405)
    assert r.headers["allow"] == "POST" and "takes POST" in error["message"]
    assert "takes GET" in _openai_error(requests.delete(url + "/v1/models", timeout=10), 405)["message"]
    json_headers = {"content-type": "application/json"}
    error = _openai_error(requests.post(url + "/v1/completions", data=b'{"prompt": "a",}', headers=json_headers), 400)
    assert "not valid JSON" in error["message"] and "character" in error["message"]
    assert "empty" in _openai_error(requests.post(url + "/v1/completions", data=b"", headers=json_headers),
                                    400)["message"]
    for data, headers in ((b"[1, 2]", json_headers), (b'{"prompt": "a"}', {"content-type": "text/plain"})):
        error = _openai_error(requests.post(url + "/v1/chat/completions", data=data, headers=headers), 400)
        assert "JSON object" in error["message"]
    error = _openai_error(requests.post(url + "/v1/completions", json={"prompt": "a", "n": "2"}), 400)
    assert error["param"] == "n" and error["message"].startswith("n: ")
    # The openai client reads type, param and code out of these bodies (None had they another shape).
    with pytest.raises(openai.NotFoundError) as e:
        client.get("/nothing", cast_to=object)
    assert e.value.type == "invalid_request_error" and "Invalid URL (GET /v1/nothing)" in e.value.message


def test_unknown_model_gets_404_model_not_found(server, client):
    messages = [{"role": "user", "content": "Hi"}]
    for stream in (False, True):
        for create in (lambda **k: client.completions.create(prompt="a", max_tokens=2, **k),
                       lambda **k: client.chat.completions.create(messages=messages, max_tokens=2, **k)):
            with pytest.raises(openai.NotFoundError) as e:
                create(model="gpt-4o", stream=stream)
            assert (e.value.code, e.value.param, e.value.type) == ("model_not_found", "model", "invalid_request_error")
            assert "The model `gpt-4o` does not exist" in e.value.message and "`tiny`" in e.value.message
    # The id /v1/models lists is served, and so is a request with no model or an empty one (as vLLM does).
    served = client.models.list().data[0].id
    for extra in ({"model": served}, {}, {"model": ""}):
        r = requests.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, **extra}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny", r.text


def test_metrics_parse(server):
    from prometheus_client.parser import text_string_to_metric_families

    # A request of its own (run alone, the test must still see tokens): two tokens, so one inter-token gap.
    assert requests.post(server.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 3}).status_code == 200

    families = {f.name: f for f in text_string_to_metric_families(requests.get(server.url + "/metrics").text)}
    for name in ("based_requests_running", "based_requests_waiting", "based_slots_used", "based_slots_total",
                 "based_generation_tokens_per_second", "based_state_memory_bytes", "process_cpu_seconds"):
        assert name in families, name
    for name in ("based_time_to_first_token_seconds", "based_inter_token_latency_seconds"):
        assert families[name].type == "histogram"
        count = [s.value for s in families[name].samples if s.name == name + "_count"][0]
        assert count > 0
    assert [s.value for s in families["based_slots_total"].samples] == [8]
    # The engine loop's wall time by phase: every phase reported, prefill and step took time (requests ran).
    phases = {s.labels["phase"]: s.value for s in families["based_engine_phase_seconds"].samples
              if s.name == "based_engine_phase_seconds_total"}
    assert set(phases) == {"idle", "admit", "prefill", "step", "wait", "deliver"}
    assert phases["prefill"] > 0 and phases["step"] > 0 and phases["idle"] > 0


def test_queue_full_gets_429_with_retry_after(server):
    check_queue_full_gets_429(server, 8 + 48, 48)


@pytest.mark.parametrize("count", [200, pytest.param(2000, marks=pytest.mark.slow)])
def test_random_requests_with_disconnects_leave_it_healthy(server, count):
    rng = random.Random(count)

    def one(i):
        body = {"prompt": rng.choice(PROMPTS)[: rng.randint(1, 40)], "max_tokens": rng.randint(1, 40),
                "temperature": rng.choice([0, 0.7, 1.3]), "top_p": rng.uniform(0.2, 1), "top_k": rng.randint(0, 9),
                "n": rng.choice([1, 1, 2]), "stop": rng.choice([None, "e", ["a", "\n"]]), "stream": rng.random() < 0.5}
        if rng.random() < 0.3:  # leave mid-way
            try:
                with requests.post(server.url + "/v1/completions", json={**body, "stream": True}, stream=True,
                                   timeout=30) as r:
                    for _, _ in zip(range(rng.randint(1, 4)), r.iter_lines()):
                        pass
            except requests.RequestException:
                pass
            return None
        r = requests.post(server.url + "/v1/completions", json=body, timeout=60)
        return r.status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(count)))
    assert all(c in (None, 200) for c in codes), codes
    after = server.wait_idle(30)
    assert after["based_requests_running"] == 0 and after["based_slots_used"] == 0
    health = requests.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["slots_free"] == health["slots"] == 8
    # Still serving correctly afterwards.
    assert _stream(server.url, {"prompt": "a", "max_tokens": 3, "temperature": 0})[1] == "length"

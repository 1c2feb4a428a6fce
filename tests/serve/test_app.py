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


def _greedy(model, prompt: bytes, n: int) -> list[int]:
    from based.generation import generate

    return generate(model, torch.tensor([list(prompt)]), n)[0].tolist()


class EosBytes(ByteTokenizer):
    def __init__(self, eos: int):
        self.eos_token_id = eos


def test_eos_ends_a_sequence_unless_ignore_eos():
    from .conftest import INIT_RANGE

    torch.manual_seed(0)
    model = BasedForCausalLM(BasedConfig.from_preset("debug", initializer_range=INIT_RANGE)).eval()
    ids = _greedy(model, b"Hello there", 12)
    eos = ids[4]
    cut = ids.index(eos)
    scheduler = Scheduler(model, EosBytes(eos), max_slots=2, max_waiting=4, prefill_chunk=64)
    with TestClient(create_app(scheduler, "m")) as client:
        body = {"prompt": "Hello there", "max_tokens": 12, "temperature": 0}
        out = client.post("/v1/completions", json=body).json()
        assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == cut
        assert out["choices"][0]["text"] == bytes(ids[:cut]).decode("utf-8", "replace")
        out = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 12


def test_checkpoint_tokenizer_and_its_chat_template(tmp_path):
    from based.data.tokenizer import train_tokenizer
    from based.serve.text import load_tokenizer

    tok = train_tokenizer(["some text to learn a few merges from, some text again"] * 50, 300, tmp_path)
    tok.chat_template = "[{{ messages[0]['content'] }}]"
    tok.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.chat_template == "[{{ messages[0]['content'] }}]" and tokenizer.eos_token == "<|endoftext|>"
    model = BasedForCausalLM(BasedConfig.from_preset("debug", vocab_size=320)).eval()
    scheduler = Scheduler(model, tokenizer, max_slots=2, max_waiting=4, prefill_chunk=64)
    with TestClient(create_app(scheduler, "m")) as client:
        out = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "some text"}],
                                                        "max_tokens": 5, "temperature": 0, "ignore_eos": True}).json()
        assert out["usage"]["prompt_tokens"] == len(tokenizer.encode("[some text]"))
        assert out["usage"]["completion_tokens"] == 5 and isinstance(out["choices"][0]["message"]["content"], str)


@pytest.mark.parametrize("argv,message", [
    (["--preset", "debug", "--max-slots", "0"], "--max-slots must be >= 1"),
    (["--preset", "debug", "--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
    (["--preset", "debug", "--memory-fraction", "1.5"], "--memory-fraction must be in (0, 1]"),
    (["--preset", "debug", "--prefill-wait-ms", "nan"], "--prefill-wait-ms must be >= 0 and finite"),
    (["--preset", "debug", "--prefill-wait-ms", "-1"], "--prefill-wait-ms must be >= 0 and finite"),
    (["--preset", "debug", "--api-workers", "-1"], "--api-workers must be >= 0"),
    (["--checkpoint", "/nonexistent/model"], "/nonexistent/model"),
    (["--preset", "debug", "--port", "{taken}"], "--port {taken}: cannot listen"),
    (["--preset", "debug", "--port", "99999"], "--port must be <= 65535"),
    (["--preset", "debug", "--port", "-1"], "--port must be >= 0"),
    (["--preset", "debug", "--max-slots", "100000000000"], "lower --max-slots"),
    (["--preset", "debug", "--grace", "nan"], "--grace must be >= 0 and finite"),
    (["--preset", "debug", "--grace", "-1"], "--grace must be >= 0 and finite"),
    (["--preset", "debug", "--device", "nope"], "--device 'nope' is not a torch device"),
    (["--preset", "debug", "--device", "meta"], "--device meta: meta devices are not supported"),
    (["--preset", "debug", "--max-prompt-tokens", "0"], "--max-prompt-tokens must be >= 1"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    import socket

    from based.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        argv = [a.replace("{taken}", port) for a in argv]
        message = message.replace("{taken}", port)
        assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("based serve: error:") and message in err[0]


def test_max_seq_len_sizes_the_kv_cache_and_the_limit():
    from based.cli import build_parser
    from based.commands.serve import build

    args = build_parser().parse_args(["serve", "--preset", "transformer-debug", "--max-seq-len", "100",
                                      "--max-slots", "2", "--device", "cpu"])
    server = build(args)
    assert server.scheduler.decoder.state.max_seq_len == 100
    with TestClient(server.server.config.app) as client:
        r = client.post("/v1/completions", json={"prompt": "x" * 90, "max_tokens": 20})
        assert r.status_code == 400 and "100 positions" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "x" * 90, "max_tokens": 10}).status_code == 200


def test_max_prompt_tokens_refuses_long_prompts_before_the_engine(monkeypatch):
    model = BasedForCausalLM(BasedConfig.from_preset("debug")).eval()
    scheduler = Scheduler(model, ByteTokenizer(), max_slots=2, max_waiting=4, prefill_chunk=64)
    submitted = []
    real = scheduler.submit
    monkeypatch.setattr(scheduler, "submit", lambda seqs: submitted.append(seqs) or real(seqs))
    with TestClient(create_app(scheduler, "m", None, 50)) as client:
        for prompt in ("x" * 51, ["ok", "y" * 300]):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "prompt", r.text
            assert f"{len(prompt) if isinstance(prompt, str) else 300} tokens" in error["message"]
            assert "limit of 50" in error["message"] and "--max-prompt-tokens" in error["message"]
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "z" * 60}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert submitted == []  # none reached the engine
        r = client.post("/v1/completions", json={"prompt": "x" * 50, "max_tokens": 1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 50 and len(submitted) == 1


@pytest.mark.parametrize("flags,cap", [([], 32768), (["--max-prompt-tokens", "8"], 8)])
def test_max_prompt_tokens_flag_and_its_default_for_a_state_model(flags, cap):
    from based.cli import build_parser
    from based.commands.serve import build

    args = build_parser().parse_args(["serve", "--preset", "debug", "--max-slots", "2", "--device", "cpu",
                                      "--port", "0", *flags])
    with TestClient(build(args).server.config.app) as client:
        r = client.post("/v1/completions", json={"prompt": "x" * (cap + 1), "max_tokens": 1})
        assert r.status_code == 400 and f"{cap + 1} tokens" in r.json()["error"]["message"], r.text
        assert f"limit of {cap} " in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "x" * 8, "max_tokens": 1}).status_code == 200


def test_max_prompt_tokens_default_leaves_full_attention_to_its_positions():
    from based.cli import build_parser
    from based.commands.serve import MAX_PROMPT_TOKENS, prompt_cap

    parse = build_parser().parse_args
    assert prompt_cap(parse(["serve", "--preset", "transformer-debug"]), 512) is None
    assert prompt_cap(parse(["serve", "--preset", "debug"]), None) == MAX_PROMPT_TOKENS
    assert prompt_cap(parse(["serve", "--preset", "transformer-debug", "--max-prompt-tokens", "100"]), 512) == 100


def test_an_unexpected_error_is_a_500_in_the_openai_shape():
    class Crashing(ByteTokenizer):
        def encode(self, text):
            raise RuntimeError("a bug")

    model = BasedForCausalLM(BasedConfig.from_preset("debug")).eval()
    scheduler = Scheduler(model, Crashing(), max_slots=2, max_waiting=4, prefill_chunk=64)
    with TestClient(create_app(scheduler, "m"), raise_server_exceptions=False) as client:
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert r.status_code == 500 and r.json() == {"error": {"message": "internal error (see the server log)",
                                                               "type": "server_error", "param": None, "code": None}}


def test_a_failing_prefill_ends_only_its_own_request(monkeypatch):
    from based.serve import scheduler as scheduler_module

    model = BasedForCausalLM(BasedConfig.from_preset("debug")).eval()
    scheduler = Scheduler(model, ByteTokenizer(), max_slots=4, max_waiting=8, prefill_chunk=8)
    real = scheduler_module.prefill_chunk

    def broken(model, layers, ids, offset):  # the long prompt's pieces fail, whole short prompts do not
        if b"BOOM" in bytes(ids[0].tolist()):
            raise RuntimeError("boom")
        return real(model, layers, ids, offset)

    monkeypatch.setattr(scheduler_module, "prefill_chunk", broken)
    with TestClient(create_app(scheduler, "m")) as client:
        import threading

        other = {}
        running = threading.Thread(target=lambda: other.update(r=client.post(
            "/v1/completions", json={"prompt": "abc", "max_tokens": 400, "temperature": 0})))
        running.start()
        while scheduler.counts()["running"] == 0:
            pass
        r = client.post("/v1/completions", json={"prompt": "xxBOOMxxxxxxxxxxxxxx", "max_tokens": 3})
        assert r.status_code == 503 and "prefilling" in r.json()["error"]["message"]
        running.join()
        # The request running meanwhile was not disturbed.
        assert other["r"].status_code == 200 and other["r"].json()["usage"]["completion_tokens"] == 400
        r = client.post("/v1/completions", json={"prompt": "fine", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert client.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0, "slots_free": 4,
                                                "slots": 4}


def test_stream_interval_sends_fewer_chunks_with_the_same_text():
    import json

    torch.manual_seed(0)
    model = BasedForCausalLM(BasedConfig.from_preset("debug", initializer_range=0.3)).eval()
    texts = {}
    for interval in (1, 5):
        scheduler = Scheduler(model, ByteTokenizer(), max_slots=2, max_waiting=4, prefill_chunk=64,
                              stream_interval=interval)
        with TestClient(create_app(scheduler, "m")) as client:
            body = {"prompt": "Hello", "max_tokens": 23, "temperature": 0, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
        pieces = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        texts[interval] = ("".join(pieces), len(pieces))
    assert texts[1][0] == texts[5][0]
    assert texts[5][1] <= 2 + 23 // 5 < texts[1][1]  # the first token, one chunk per 5 tokens, the end


def test_mailbox_hands_over_everything_that_came_in_one_take():
    import asyncio

    from based.serve.app import Mailbox

    async def main():
        box = Mailbox()
        box.put((0, "a"))
        box.put((1, "b"))
        assert await box.take() == [(0, "a"), (1, "b")]
        waiting = asyncio.create_task(box.take())
        await asyncio.sleep(0)
        assert not waiting.done()  # nothing came: it waits
        box.put((0, "c"))
        box.put((0, "d"))  # before the waiter runs: the same take gets both
        assert await waiting == [(0, "c"), (0, "d")]

    asyncio.run(main())


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_events_are_the_json_of_their_chunks(path):
    """Events built from a per-choice template are exactly json.dumps of the chunk (field order, spacing,
    escapes), and carry the text the plain response gives."""
    import json

    torch.manual_seed(0)
    model = BasedForCausalLM(BasedConfig.from_preset("debug", initializer_range=0.3)).eval()
    scheduler = Scheduler(model, ByteTokenizer(), max_slots=2, max_waiting=4, prefill_chunk=64)
    body = {"max_tokens": 40, "temperature": 0, "n": 2}
    body |= {"messages": [{"role": "user", "content": 'say "hi"\n'}]} if "chat" in path else {"prompt": 'A "q"\n\\'}
    with TestClient(create_app(scheduler, "m")) as client:
        plain = client.post(path, json=body).json()
        with client.stream("POST", path, json=body | {"stream": True}) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    texts = {0: "", 1: ""}
    for line in lines:
        chunk = json.loads(line)
        assert line == json.dumps(chunk)
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"] if "text" in c else c["delta"].get("content", "")
    for c in plain["choices"]:
        assert texts[c["index"]] == (c["text"] if "text" in c else c["message"]["content"])


def test_api_workers_default_by_device(monkeypatch):
    """None on the command line: HTTP in the engine's process on a CPU; on CUDA up to 4 worker processes, a
    quarter of the cores (a 2-core machine keeps one process)."""
    import os

    from based.commands.serve import default_api_workers

    assert default_api_workers("cpu") == 0
    for cores, workers in ((16, 4), (64, 4), (8, 2), (2, 0)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        assert default_api_workers("cuda") == workers


def test_an_engine_profile_path_that_cannot_be_written_is_refused_at_start(tmp_path, monkeypatch, capsys):
    # BASED_ENGINE_PROFILE: a traceback in the engine thread once the whole run was over (the profile lost).
    from based.cli import main

    monkeypatch.setenv("BASED_ENGINE_PROFILE", str(tmp_path / "missing" / "engine.prof"))
    assert main(["serve", "--preset", "debug"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BASED_ENGINE_PROFILE=" in err[0] and "cannot be written" in err[0]

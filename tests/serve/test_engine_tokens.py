"""The engine loop in-process: token ids out (Scheduler.emit, as behind --api-workers) turned into text by a
worker's RemoteScheduler, against generate alone; and the prefill policy (--prefill-wait-ms)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from based import BasedConfig, BasedForCausalLM
from based.serve.scheduler import EOS, GOING, LENGTH, Scheduler, Sequence
from based.serve.text import ByteTokenizer

from .conftest import INIT_RANGE

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BasedForCausalLM(BasedConfig.from_preset("debug", initializer_range=INIT_RANGE)).eval()


def greedy(model, prompt: bytes, n: int) -> list[int]:
    from based.generation import generate

    return generate(model, torch.tensor([list(prompt)]), n)[0].tolist()


class EosBytes(ByteTokenizer):
    def __init__(self, eos):
        self.eos_token_id = eos


class _Now:
    """A RemoteScheduler's event loop, here: what it schedules runs at once (on the engine thread)."""

    @staticmethod
    def call_soon_threadsafe(fn, *args):
        fn(*args)


def serve_emitted(model, tokenizer, requests: list[dict], slots: int = 2, **kwargs):
    """requests through a Scheduler with emit -> a worker's RemoteScheduler._tokens, the worker's cancels back
    into the Scheduler; returns each request's final Output, the texts it was sent in, and the Scheduler."""
    from based.serve.workers import RemoteScheduler

    scheduler = Scheduler(model, tokenizer, slots, 16, 64, max_seq_len=64, **kwargs)
    remote = RemoteScheduler(None, tokenizer, slots)
    remote.loop = _Now()
    engine_seqs, ends, pieces, done = {}, {}, {}, threading.Event()

    def to_engine(message):  # the Pipe, worker -> engine: only cancels here
        kind, sids, reason = message
        assert kind == "cancel" and reason == "stop"
        for sid in sids:
            scheduler.cancel(engine_seqs[sid], reason)

    def post(items):
        for seq, out in items:
            pieces.setdefault(seq.tag, []).append(out.text)
            if out.finish_reason is not None:
                ends[seq.tag] = out
        if len(ends) == len(requests):
            done.set()

    remote._send, remote.post = to_engine, post
    scheduler.emit = lambda batches: remote._tokens(*batches[0])
    for sid, r in enumerate(requests):
        ours = Sequence(r["prompt"], r["max_tokens"], deliver=None, stop=r.get("stop", []),
                        incremental=r.get("incremental", True), tag=sid)
        remote.seqs[sid] = ours
        engine_seqs[sid] = Sequence(r["prompt"], r["max_tokens"], deliver=None, tag=(0, sid))
    scheduler.start()
    try:
        scheduler.submit(list(engine_seqs.values()))
        assert done.wait(60)
        deadline = time.monotonic() + 10
        while not scheduler.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop(10)
    return ends, {sid: "".join(p) for sid, p in pieces.items()}, scheduler


def test_emitted_tokens_make_the_text_of_generate_with_eos_length_and_stop(model):
    prompt = b"Hello there"
    ids = greedy(model, prompt, 40)
    eos = ids[6]
    cut = ids.index(eos)  # greedy decoding ends at the first eos
    text = ByteTokenizer().decode_batch([ids])[0]
    stop = text[12:15]  # a few characters past the start, matched across token boundaries
    at = text.index(stop)
    # The fewest tokens whose text holds the stop string: the worker finishes there (usage counts them).
    used = next(k for k in range(1, 41) if stop in ByteTokenizer().decode_batch([ids[:k]])[0])
    plain = ByteTokenizer()
    ends, texts, scheduler = serve_emitted(model, plain, [
        {"prompt": list(prompt), "max_tokens": 9},
        {"prompt": list(prompt), "max_tokens": 100000, "stop": ["\x00never", stop]},
        {"prompt": list(prompt), "max_tokens": 20, "incremental": False},
    ])
    assert (texts[0], ends[0].finish_reason, ends[0].completion_tokens) == (plain.decode_batch([ids[:9]])[0], "length", 9)
    assert (texts[1], ends[1].finish_reason, ends[1].completion_tokens) == (text[:at], "stop", used)
    assert (texts[2], ends[2].finish_reason, ends[2].completion_tokens) == (plain.decode_batch([ids[:20]])[0], "length", 20)
    assert all(e.prompt_tokens == len(prompt) for e in ends.values())
    # The stop string's sequence was cancelled in the engine: its slot is free long before 100000 tokens.
    assert scheduler.counts()["slots_free"] == 2 and not scheduler.live.any()
    assert scheduler.metrics.finished.labels("stop")._value.get() == 1

    ends, texts, scheduler = serve_emitted(model, EosBytes(eos), [{"prompt": list(prompt), "max_tokens": 30}])
    assert (ends[0].finish_reason, ends[0].completion_tokens) == ("stop", cut)
    assert texts[0] == plain.decode_batch([ids[:cut]])[0]
    assert scheduler.counts()["slots_free"] == 2


def test_emit_codes_and_counts_of_a_scheduler(model):
    """The engine's side alone: every token of generate, in order, the eos one marked and not counted."""
    prompt = b"abc"
    ids = greedy(model, prompt, 12)
    eos = ids[5]
    scheduler = Scheduler(model, EosBytes(eos), 3, 8, 64, max_seq_len=64)
    got, done = {}, threading.Event()

    def emit(batches):
        for w, (sids, tokens, codes) in batches.items():
            assert sids.dtype.kind == "i" and tokens.dtype.name == "int32" and codes.dtype.name == "int8"
            for sid, token, code in zip(sids.tolist(), tokens.tolist(), codes.tolist()):
                got.setdefault((w, sid), []).append((token, code))
        if sum(1 for v in got.values() if v[-1][1] != GOING) == 3:
            done.set()

    scheduler.emit = emit
    seqs = [Sequence(list(prompt), 4, None, tag=(0, 7)), Sequence(list(prompt), 12, None, tag=(1, 7)),
            Sequence(list(prompt), 12, None, ignore_eos=True, tag=(1, 9))]
    scheduler.start()
    try:
        scheduler.submit(seqs)
        assert done.wait(60)
    finally:
        scheduler.stop(10)
    cut = ids.index(eos)
    assert got[(0, 7)] == [(t, GOING) for t in ids[:3]] + [(ids[3], LENGTH)]
    assert got[(1, 7)] == [(t, GOING) for t in ids[:cut]] + [(eos, EOS)]
    assert got[(1, 9)] == [(t, GOING) for t in ids[:11]] + [(ids[11], LENGTH)]
    assert scheduler.metrics.generated._value.get() == 4 + cut + 12


def _first_token_after(model, prefill_wait: float, prefill_chunk: int, busy: bool, prompt_len: int = 4) -> float:
    """Seconds from submitting one sequence to its first token, with another one decoding meanwhile or not."""
    scheduler = Scheduler(model, ByteTokenizer(), 2, 8, prefill_chunk, max_seq_len=64, prefill_wait=prefill_wait)
    first, started = {}, threading.Event()

    def emit(batches):
        now = time.monotonic()
        for sids, _, _ in batches.values():
            for sid in sids.tolist():
                first.setdefault(sid, now)
        if 0 in first:
            started.set()

    scheduler.emit = emit
    scheduler.start()
    try:
        if busy:
            scheduler.submit([Sequence([1, 2, 3], 100000, None, ignore_eos=True, tag=(0, 0))])
            assert started.wait(30)
            time.sleep(0.05)
        t = time.monotonic()
        scheduler.submit([Sequence(list(range(5, 5 + prompt_len)), 2, None, tag=(0, 1))])
        deadline = time.monotonic() + 10
        while 1 not in first and time.monotonic() < deadline:
            time.sleep(0.002)
        return first[1] - t
    finally:
        scheduler.abort("the test is over")
        scheduler.stop(10)


def test_prefill_waits_only_while_others_decode(model):
    wait = 0.3
    assert _first_token_after(model, wait, 2048, busy=False) < wait / 2  # nothing decodes: prefilled at once
    assert wait - 0.01 <= _first_token_after(model, wait, 2048, busy=True) < wait + 0.3
    # As many prompt tokens as a chunk waiting: one large prefill is worth it now.
    assert _first_token_after(model, wait, 8, busy=True, prompt_len=8) < wait / 2
    assert _first_token_after(model, 0.0, 2048, busy=True) < wait / 2  # 0: every pass prefills


def test_engine_profile_is_written_when_the_loop_ends(model, tmp_path, monkeypatch):
    # BASED_ENGINE_PROFILE: the engine thread's cProfile, for where a GPU serving loop's passes spend their time.
    import pstats

    path = tmp_path / "engine.prof"
    monkeypatch.setenv("BASED_ENGINE_PROFILE", str(path))
    ends, _, _ = serve_emitted(model, ByteTokenizer(), [{"prompt": list(b"Hello"), "max_tokens": 4}])
    assert ends[0].finish_reason == "length"
    functions = {name for _, _, name in pstats.Stats(str(path)).stats}
    assert {"_pass", "_emit_pending", "_prefill"} <= functions


def test_an_engine_profile_path_that_cannot_be_written_fails_the_start(model, tmp_path, monkeypatch):
    monkeypatch.setenv("BASED_ENGINE_PROFILE", str(tmp_path / "missing" / "engine.prof"))
    scheduler = Scheduler(model, ByteTokenizer(), 2, 16, 64, max_seq_len=64)
    with pytest.raises(ValueError, match="BASED_ENGINE_PROFILE=.* cannot be written"):
        scheduler.start()
    assert not scheduler.thread.is_alive()

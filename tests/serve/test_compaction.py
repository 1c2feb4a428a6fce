"""Slot compaction (Scheduler._compact, Decoder.move): as a batch drains, the sequences left move down into the
lowest slots so that steps take fewer rows, and every token comes out as if nothing had moved."""
from __future__ import annotations

import pytest
import torch

from based import BasedConfig, BasedForCausalLM
from based.generation import generate
from based.serve.scheduler import GOING, Scheduler, Sequence
from based.serve.text import ByteTokenizer

from .conftest import INIT_RANGE

pytest.importorskip("fastapi")

# 10 requests on 8 slots. Slots 0-5 end first and two late requests take slots 0 and 1, so the long requests
# of slots 6 and 7 move down to 3 and 2 (4 sequences: bucket 4), then, once the late ones end, to 0 and 1, and
# the longest, left alone, to 0: 5 moves.
MAX_TOKENS = [4, 4, 4, 4, 4, 4, 20, 25, 7, 7]
SAMPLED = 7  # this one samples with a seed: its text must not depend on the slots it went through


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BasedForCausalLM(BasedConfig.from_preset("debug", initializer_range=INIT_RANGE)).eval()


def prompt(i: int) -> list[int]:
    return [10 + i, 20 + 3 * i, 7, 40 + i]


def sequence(i: int, max_tokens: int, tag=None) -> Sequence:
    params = dict(temperature=0.9, top_k=20, seed=5) if i == SAMPLED else {}
    return Sequence(prompt(i), max_tokens, deliver=None, ignore_eos=True, tag=tag, **params)


def run(model, indices: list[int], emit: bool, slots: int = 8):
    """The requests through a Scheduler driven pass by pass: each one's output, the rows of every step, and
    the Scheduler. emit: token ids read back as numbers (as behind --api-workers); else text (Outputs)."""
    tokenizer = ByteTokenizer()
    got: dict[int, list] = {i: [] for i in indices}
    scheduler = Scheduler(model, tokenizer, slots, 16, 64, max_seq_len=64,
                          post=lambda items: [got[s.tag].append(o) for s, o in items if not emit])
    if emit:
        scheduler.emit = lambda batches: [got[sid].extend(zip(t.tolist(), c.tolist()))
                                          for sids, tokens, codes in batches.values()
                                          for sid, t, c in zip(sids.tolist(), tokens.reshape(-1, 1), codes.reshape(-1, 1))]
    rows, step = [], scheduler.decoder.step

    def counted_step(rows: int | None = None):
        steps.append(rows)
        return step(rows)

    steps = rows
    scheduler.decoder.step = counted_step
    seqs = [sequence(i, MAX_TOKENS[i], tag=(0, i) if emit else i) for i in indices]
    scheduler.waiting.extend(seqs)
    while not all(s.done for s in seqs) or scheduler.pending is not None:
        scheduler._pass()
    if emit:
        assert all(got[i][-1][1] != GOING for i in indices)
        return {i: [t for t, _ in got[i]] for i in indices}, rows, scheduler
    return {i: "".join(o.text for o in got[i]) for i in indices}, rows, scheduler


@pytest.mark.parametrize("emit", [False, True], ids=["text", "token-ids"])
def test_drained_sequences_move_down_and_decode_as_if_alone(model, emit):
    out, rows, scheduler = run(model, list(range(len(MAX_TOKENS))), emit)
    for i, n in enumerate(MAX_TOKENS):
        if i != SAMPLED:
            ids = generate(model, torch.tensor([prompt(i)]), n)[0].tolist()
            assert out[i] == (ids if emit else ByteTokenizer().decode_batch([ids])[0]), i
    # The sampled one alone in slot 0 (nothing ever moves): the same tokens.
    alone, _, quiet = run(model, [SAMPLED], emit)
    assert out[SAMPLED] == alone[SAMPLED] and len(set(alone[SAMPLED])) > 1
    assert quiet.metrics.moves._value.get() == 0
    # The steps shrink with the batch: 8 rows, then 4, 2 and 1, not 8 to the end.
    assert scheduler.metrics.moves._value.get() == 5
    assert rows[0] == 8 and rows[-1] == 1 and 4 in rows and 2 in rows
    assert rows == sorted(rows, reverse=True)
    assert sorted(scheduler.free) == list(range(8)) and not scheduler.live.any()
    assert scheduler.decoder.active.sum().item() == 0 and not scheduler.decoder.slots.any_random


def test_compaction_off_for_a_b_timing(model, monkeypatch):
    """BASED_SLOT_COMPACTION=0 (benchmarks/serve_engine.sh's nocompact): nothing moves, the same tokens."""
    monkeypatch.setenv("BASED_SLOT_COMPACTION", "0")
    out, rows, scheduler = run(model, list(range(len(MAX_TOKENS))), emit=True)
    assert scheduler.metrics.moves._value.get() == 0 and set(rows) == {8}
    monkeypatch.delenv("BASED_SLOT_COMPACTION")
    assert run(model, list(range(len(MAX_TOKENS))), emit=True)[0] == out


# Seeds 6 and 11 fail with per-slot serial counters, as the scheduler had before moves: a token read back for a
# sequence that left a slot passed for the one moved into it, whose counter had the same value.
@pytest.mark.parametrize("emit,seed", [(False, 3), (True, 3), (True, 6), (True, 11)])
def test_random_arrivals_and_cancels_while_slots_move(model, emit, seed):
    """40 requests arriving at random passes, some cancelled at random (waiting, prefilling or running), on 8
    slots that compact as they drain: each finished stream is generate's output, each cancelled one a prefix of
    it (token ids), and the engine ends with every slot free."""
    import random

    rng = random.Random(seed)
    tokenizer = ByteTokenizer()
    n = 40
    prompts = [[rng.randrange(1, 256) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    lengths = [rng.randint(1, 20) for _ in range(n)]
    got: dict[int, list] = {i: [] for i in range(n)}
    scheduler = Scheduler(model, tokenizer, 8, 64, 64, max_seq_len=64,
                          post=lambda items: [got[s.tag].append(o) for s, o in items if not emit])
    if emit:
        scheduler.emit = lambda batches: [got[sid].append(t) for sids, tokens, _ in batches.values()
                                          for sid, t in zip(sids.tolist(), tokens.tolist())]
    seqs = [Sequence(prompts[i], lengths[i], deliver=None, ignore_eos=True, tag=(0, i) if emit else i)
            for i in range(n)]
    queue, cancelled = list(seqs), set()
    while queue or not all(s.done for s in seqs) or scheduler.pending is not None:
        if queue and rng.random() < 0.5:
            k = rng.randint(1, 4)
            scheduler.waiting.extend(queue[:k])  # (submit wants the engine thread; here the test runs the passes)
            queue = queue[k:]
        if rng.random() < 0.15:
            live = [i for i, s in enumerate(seqs) if s not in queue and not s.done]
            if live:
                i = rng.choice(live)
                scheduler.cancel(seqs[i])
                cancelled.add(i)
        if scheduler.waiting or scheduler.prefilling or scheduler.running or scheduler.cancels or scheduler.pending:
            scheduler._pass()  # (with nothing to do it would wait for a submit)
    assert scheduler.metrics.moves._value.get() > 0
    assert sorted(scheduler.free) == list(range(8)) and not scheduler.running and not scheduler.live.any()
    assert 0 < len(cancelled) < n // 2
    for i in range(n):
        ids = generate(model, torch.tensor([prompts[i]]), lengths[i])[0].tolist()
        if emit:
            assert got[i] == ids[:len(got[i])] if i in cancelled else got[i] == ids, i
        elif i not in cancelled:
            assert "".join(o.text for o in got[i]) == tokenizer.decode_batch([ids])[0], i


def test_no_compaction_where_the_state_grows_with_the_context():
    """A KV cache is max_seq_len positions a slot to copy per move, and a step's empty rows cost it little."""
    torch.manual_seed(0)
    transformer = BasedForCausalLM(BasedConfig.from_preset("transformer-debug", initializer_range=INIT_RANGE)).eval()
    out, rows, scheduler = run(transformer, list(range(len(MAX_TOKENS))), emit=True)
    assert not scheduler.compaction and scheduler.metrics.moves._value.get() == 0 and set(rows) == {8}
    assert out[0] == generate(transformer, torch.tensor([prompt(0)]), MAX_TOKENS[0])[0].tolist()


def test_a_failing_move_turns_compaction_off_and_loses_nothing(model, monkeypatch, caplog):
    """Decoder.move raising (out of memory for its copies, say): logged once, compaction off, every sequence
    where it was and its tokens intact."""
    from based.generation.engine import Decoder

    calls = []

    def broken(self, src, dst):
        calls.append(src)
        raise torch.OutOfMemoryError("CUDA out of memory (a test)")

    monkeypatch.setattr(Decoder, "move", broken)
    with caplog.at_level("ERROR", logger="based.serve"):
        out, rows, scheduler = run(model, list(range(len(MAX_TOKENS))), emit=True)
    assert len(calls) == 1 and not scheduler.compaction and set(rows) == {8}
    assert "slot compaction failed, turned off" in caplog.text
    monkeypatch.undo()
    assert out == run(model, list(range(len(MAX_TOKENS))), emit=True)[0]

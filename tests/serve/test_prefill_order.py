"""The order in which prompts take a pass's prefill budget (Scheduler._prefill): whole prompts that fit first,
then pieces of the others, with a share of every pass for the oldest long prompt. The engine's passes are driven
here one by one on the test's thread (no engine thread, no clock)."""
from __future__ import annotations

import pytest
import torch

from based import BasedConfig, BasedForCausalLM
from based.serve.scheduler import Scheduler, Sequence
from based.serve.text import ByteTokenizer

from .conftest import INIT_RANGE

CHUNK = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BasedForCausalLM(BasedConfig.from_preset("debug", initializer_range=INIT_RANGE)).eval()


def make_scheduler(model, slots: int = 8) -> Scheduler:
    return Scheduler(model, ByteTokenizer(), slots, 64, CHUNK, max_seq_len=2048)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def seq(tokens: list[int], max_tokens: int = 1) -> Sequence:
    return Sequence(tokens, max_tokens, deliver=lambda out: None, ignore_eos=True)


def first_token_passes(scheduler: Scheduler, s: Sequence, limit: int = 100) -> int:
    """Passes until `s` has its first token (read back the pass after its prefill)."""
    for k in range(1, limit + 1):
        scheduler._pass()
        if s.ids:
            return k
    raise AssertionError(f"no first token in {limit} passes")


@pytest.mark.parametrize("length", [4, CHUNK + 40])
def test_a_prompt_after_a_long_one_is_not_held_back_until_it_is_done(model, length):
    """A 1500-token prompt takes ~24 passes of 64; a prompt that comes once its pieces have started (a short
    one, or one longer than a chunk) has its first token within a few passes, the long one still unfinished."""
    scheduler = make_scheduler(model)
    long = seq(prompt(1500, 1))
    scheduler.waiting.append(long)
    for _ in range(3):
        scheduler._pass()
    assert 0 < long.prefilled < len(long.prompt)
    late = seq(prompt(length, 2))
    scheduler.waiting.append(late)
    # Whole: prefilled in the next pass, read back in the one after. Longer than a chunk: in pieces of 48 (the
    # budget less the long prompt's quarter).
    assert first_token_passes(scheduler, late) <= 2 + (length - 1) // (CHUNK - CHUNK // 4)
    assert long.prefilled < len(long.prompt) - 10 * CHUNK and not long.ids


def test_the_long_prompt_progresses_every_pass_while_short_ones_keep_coming(model):
    """Every pass 4 new 16-token prompts, more than the budget holds: the long prompt still gets its quarter of
    every pass, and the short ones the rest, 3 whole prompts a pass, in the order they came."""
    scheduler = make_scheduler(model, slots=40)
    long = seq(prompt(600, 1))
    scheduler.waiting.append(long)
    scheduler._pass()
    shorts = []
    for k in range(8):
        before = long.prefilled
        shorts += [seq(prompt(16, 100 + 4 * k + i)) for i in range(4)]
        scheduler.waiting.extend(shorts[-4:])
        scheduler._pass()
        assert long.prefilled - before >= CHUNK // 4
        served = 3 * (k + 1)
        assert [s.prefilled for s in shorts] == [16] * served + [0] * (len(shorts) - served)
    assert all(s.ids for s in shorts[:21])  # those prefilled before the last pass: read back by now
    while not all(s.ids for s in [long, *shorts]):
        scheduler._pass()


def test_greedy_tokens_are_those_of_each_prompt_alone(model):
    """Prompts of all sizes coming at different passes, several in pieces at once: whatever order their
    pieces take, each generates what generate gives its prompt alone."""
    from based.generation import generate

    scheduler = make_scheduler(model, slots=6)
    arrivals = {0: [700, 5], 2: [300, 90], 3: [12, 64, 40], 5: [150, 1], 9: [33]}
    seqs, k = [], 0
    while k <= max(arrivals) or not all(s.done for s in seqs):
        new = [seq(prompt(n, 10 * k + i), max_tokens=6) for i, n in enumerate(arrivals.get(k, []))]
        scheduler.waiting.extend(new)
        seqs.extend(new)
        if scheduler.waiting or scheduler.prefilling or scheduler.running or scheduler.pending:
            scheduler._pass()  # (with nothing to do, a pass would wait for work)
        k += 1
        assert k < 200
    assert not scheduler.running and not scheduler.prefilling and len(scheduler.free) == 6
    for s in seqs:
        alone = generate(model, torch.tensor([s.prompt]), 6)[0].tolist()
        assert s.ids == alone, len(s.prompt)

"""Per-slot sampling (based.generation.batch_sampling) and the Decoder's slot-sampling mode."""
from __future__ import annotations

import pytest
import torch

from based import BasedConfig, BasedForCausalLM
from based.generation import generate
from based.generation.batch_sampling import counter_uniform, sample_slots
from based.generation.engine import Decoder, _buckets, prefill


def _params(B, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    full = lambda v, dtype: torch.full((B,), v, dtype=dtype)  # noqa: E731
    return full(temperature, torch.float32), full(top_k, torch.long), full(top_p, torch.float32), full(seed, torch.long)


def test_counter_uniform_is_a_function_of_seed_position_and_token():
    seed = torch.tensor([1, 2, 1, -5, 2**40 + 1])
    pos = torch.tensor([7, 7, 8, 7, 7])
    u = counter_uniform(seed, pos, 300)
    assert u.shape == (5, 300) and bool(((u > 0) & (u < 1)).all())
    # Row 0 again, alone and in another batch position: the same numbers.
    assert torch.equal(counter_uniform(seed[[0]], pos[[0]], 300)[0], u[0])
    assert torch.equal(counter_uniform(seed[[3, 0]], pos[[3, 0]], 300)[1], u[0])
    for a, b in ((0, 1), (0, 2), (0, 3), (0, 4)):  # another seed or position: other numbers
        assert not torch.equal(u[a], u[b])
    big = counter_uniform(torch.arange(64), torch.zeros(64, dtype=torch.long), 1024)
    assert abs(big.mean().item() - 0.5) < 0.01 and abs(big.var().item() - 1 / 12) < 0.005


def test_greedy_rows_and_tiny_temperatures_take_the_argmax_without_nan():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 1e4  # logits / 1e-6 would overflow to inf and give NaN probabilities
    t, k, p, s = _params(6)
    t[:] = torch.tensor([0.0, 1e-7, 9e-6, 1.0, 1.0, 1.0])
    k[4] = 1  # top_k 1: the argmax whatever the temperature
    p[5] = 1e-6  # a nucleus of one token
    tokens = sample_slots(logits, t, k, p, s, torch.arange(6))
    best = logits.argmax(-1)
    assert torch.equal(tokens[[0, 1, 2, 4, 5]], best[[0, 1, 2, 4, 5]])


def test_samples_follow_softmax_with_top_k_and_top_p():
    V, N = 8, 6000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -9.0]]).expand(N, V)
    pos = torch.arange(N)
    t, k, p, s = _params(N, temperature=0.7, seed=3)
    draws = sample_slots(logits, t, k, p, s, pos)
    freq = torch.bincount(draws, minlength=V).float() / N
    expected = (logits[0] / 0.7).softmax(-1)
    assert (freq - expected).abs().max() < 0.025
    k[:] = 3  # only the 3 most likely
    draws = sample_slots(logits, t, k, p, s, pos)
    assert int(draws.max()) <= 2
    expected = (logits[0, :3] / 0.7).softmax(-1)
    assert (torch.bincount(draws, minlength=3).float() / N - expected).abs().max() < 0.025
    k[:], p[:] = 0, 0.6  # nucleus: the smallest set holding 0.6 of the mass
    draws = sample_slots(logits, t, k, p, s, pos)
    probs = (logits[0] / 0.7).softmax(-1)
    keep = int(((probs.cumsum(0) - probs) < 0.6).sum())
    assert int(draws.max()) == keep - 1


def test_a_row_draws_the_same_whatever_its_neighbours():
    torch.manual_seed(1)
    logits = torch.randn(5, 40)
    t, k, p, s = _params(5, temperature=1.0)
    s[:] = torch.tensor([11, 12, 13, 14, 15])
    t[1], k[2], p[3] = 0.5, 4, 0.8
    pos = torch.tensor([3, 9, 4, 4, 100])
    batch = sample_slots(logits, t, k, p, s, pos)
    for i in range(5):
        alone = sample_slots(logits[[i]], t[[i]], k[[i]], p[[i]], s[[i]], pos[[i]])
        assert alone.item() == batch[i].item()


def test_buckets():
    assert _buckets(1) == [1]
    assert _buckets(8) == [1, 2, 3, 4, 6, 8]
    assert _buckets(100) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 100]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BasedForCausalLM(BasedConfig.from_preset("debug", initializer_range=0.3)).eval()


def _join(decoder, model, slot, prompt, **params):
    p = torch.tensor([prompt])
    logits = prefill(model, decoder.state, p, slots=[slot])
    defaults = dict(temperature=0.0, top_k=0, top_p=1.0, seed=0)
    defaults.update(params)
    return decoder.admit([slot], [len(prompt)], logits, **{k: [v] for k, v in defaults.items()})


def _greedy_joins_and_leaves(model):
    """Two greedy prompts join at different steps beside a sampled one; each equals generate() alone."""
    device = model.device
    a, b = [5, 6, 7, 8, 9, 10, 11], [100, 3]
    decoder = Decoder(model, 6, slot_sampling=True)
    out = {2: [_join(decoder, model, 2, a).item()]}
    for _ in range(3):
        out[2].append(decoder.step(rows=3)[2].item())
    out[0] = [_join(decoder, model, 0, b).item()]
    _join(decoder, model, 1, [9, 9], temperature=1.1, seed=3)
    for _ in range(8):
        tokens = decoder.step(rows=3)
        out[2].append(tokens[2].item())
        out[0].append(tokens[0].item())
    assert out[2] == generate(model, torch.tensor([a], device=device), 12)[0].tolist()
    assert out[0] == generate(model, torch.tensor([b], device=device), 9)[0].tolist()
    return decoder, len(b) + 11


def _seeded(model, slot, neighbours):
    """A seeded request's tokens in `slot`, after neighbours (other seeds and temperatures) have joined."""
    decoder = Decoder(model, 5, slot_sampling=True)
    for i, other in enumerate(neighbours):
        _join(decoder, model, i + 3 if slot < 3 else i, other, temperature=1.3, seed=i)
        decoder.step()
    tokens = [_join(decoder, model, slot, [40, 41, 42, 43], temperature=0.9, top_p=0.95, top_k=20, seed=77).item()]
    for _ in range(10):
        tokens.append(decoder.step()[slot].item())
    return tokens


def test_slot_decoder_greedy_joins_and_leaves_match_generate_alone(model):
    decoder, b_len = _greedy_joins_and_leaves(model)
    decoder.free([2])
    for _ in range(3):
        decoder.step()
    assert decoder.state.seqlen_offset[2].item() == 0 and decoder.state.seqlen_offset[0].item() == b_len


def test_slot_decoder_seeded_sampling_ignores_slot_and_neighbours(model):
    alone = _seeded(model, 0, [])
    assert _seeded(model, 4, [[1, 2], [9]]) == alone
    assert _seeded(model, 1, [[7, 7, 7]]) == alone
    assert len(set(alone)) > 1


def test_moved_slots_decode_as_if_they_had_stayed(model):
    """Decoder.move mid-way (a greedy and a seeded sampled sequence, slots 4 and 5 -> 1 and 0): the same tokens
    as without the move, the old slots free, the sampler's host state moved along."""

    def decode(move: bool):
        decoder = Decoder(model, 6, slot_sampling=True)
        a = [_join(decoder, model, 4, [5, 6, 7, 8]).item()]
        b = [_join(decoder, model, 5, [9, 9, 3], temperature=0.9, top_k=20, seed=11).item()]
        at = (4, 5)
        for i in range(8):
            if move and i == 3:
                decoder.move([5, 4], [0, 1])
                at = (1, 0)
            tokens = decoder.step(rows=max(at) + 1)
            a.append(tokens[at[0]].item())
            b.append(tokens[at[1]].item())
        return a, b, decoder

    a, b, _ = decode(False)
    a_moved, b_moved, decoder = decode(True)
    assert (a_moved, b_moved) == (a, b) and len(set(b)) > 1
    assert a == generate(model, torch.tensor([[5, 6, 7, 8]]), 9)[0].tolist()
    assert decoder.active.tolist() == [1, 1, 0, 0, 0, 0] and decoder.slots._random == {0}
    assert decoder.state.seqlen_offset.tolist() == [11, 12, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="as many source as destination"):
        decoder.move([0, 1], [2])
    with pytest.raises(ValueError, match="all different"):
        decoder.move([0], [0])
    with pytest.raises(ValueError, match=r"slots in 0 \.\. 5"):
        decoder.move([0], [6])
    with pytest.raises(ValueError, match=r"slots in 0 \.\. 5"):
        decoder.move([-1], [2])


def test_slot_sampling_in_row_blocks_equals_all_at_once(monkeypatch):
    from based.generation import batch_sampling
    from based.generation.batch_sampling import SlotSampling

    torch.manual_seed(2)
    ss = SlotSampling(7, "cpu")
    ss.set(list(range(7)), [0.0, 0.8, 1.2, 1e-7, 0.5, 1.0, 2.0], [0, 3, 0, 0, 1, 10, 0], [1.0, 1.0, 0.7, 1.0, 1.0, 0.9, 0.3],
           [5, 6, 7, 8, 9, 10, 11])
    assert ss.any_random
    logits, pos = torch.randn(7, 64), torch.arange(7) * 3
    whole = ss.sample(logits, pos)
    monkeypatch.setattr(batch_sampling, "SAMPLER_BLOCK_ELEMENTS", 64 * 2)  # blocks of 2 rows
    assert torch.equal(ss.sample(logits, pos), whole)
    assert torch.equal(ss.sample(logits[:5], pos[:5], rows=5), whole[:5])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_slot_decoder_on_cuda_graphs_matches_generate_and_keeps_seeds(model):
    # The server's step on CUDA: bucketed graphs (greedy and sampled) captured per row count.
    cuda_model = BasedForCausalLM(model.config).cuda().eval()
    cuda_model.load_state_dict(model.state_dict())
    _greedy_joins_and_leaves(cuda_model)
    alone = _seeded(cuda_model, 0, [])
    assert _seeded(cuda_model, 4, [[1, 2], [9]]) == alone and len(set(alone)) > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_joining_and_leaving_slots_never_waits_for_the_device(model):
    # The serving loop issues a pass's prefill, admissions and frees while the last decode step still runs: a
    # blocking copy among them (a list sent from pageable memory, a device tensor read back) would leave the GPU
    # idle for the host's whole pass. Sync debug mode turns any such wait into an error.
    cuda_model = BasedForCausalLM(model.config).cuda().eval()
    cuda_model.load_state_dict(model.state_dict())
    decoder = Decoder(cuda_model, 8, slot_sampling=True)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 9, 8, 7, 6]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0], [1]])).long()
    params = dict(temperature=[0.0, 0.9, 0.0], top_k=[0, 5, 0], top_p=[1.0, 0.9, 1.0], seed=[1, 2, 3])

    def one_pass():  # as the scheduler's: prefill scattered slots from host tensors, admit, step, move, free
        logits = prefill(cuda_model, decoder.state, ids, mask, [6, 1, 3])
        first = decoder.admit([6, 1, 3], [3, 5, 4], logits, **params)
        tokens = decoder.step(rows=8).clone()  # the step's buffer: the next step overwrites it
        decoder.move([6, 3], [0, 2])
        decoder.free([0, 1, 2])
        return first, tokens

    one_pass()  # capture the step's graphs and warm the allocators first
    expected = one_pass()
    torch.cuda.synchronize()
    # A GPU still busy for ~1 s: had the pass waited for the device anywhere, the sleep would be over. (Sync
    # debug mode alone missed one: `t[index] = 0` copies its 0 from pageable memory, ~a decode step's wait.)
    torch.cuda._sleep(2_000_000_000)
    busy = torch.cuda.Event()
    busy.record()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = one_pass()
        assert not busy.query(), "the pass waited for the device"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    rows = [6, 1, 3]  # the free slots' tokens are whatever their stale inputs give
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1][rows], expected[1][rows])


def test_to_device_keeps_values_and_dtypes():
    from based.generation.state import to_device

    assert torch.equal(to_device([[1, 2], [3, 4]], "cpu", torch.long), torch.tensor([[1, 2], [3, 4]]))
    assert to_device([0.5, 1.0], "cpu", torch.float32).dtype == torch.float32
    t = torch.arange(3)
    assert to_device(t, "cpu") is t  # already there: no copy
    if torch.cuda.is_available():
        moved = to_device([5, 6, 7], "cuda", torch.long)
        assert moved.device.type == "cuda" and moved.tolist() == [5, 6, 7]

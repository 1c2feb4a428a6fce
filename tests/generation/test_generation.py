"""Generation: recurrent decode == parallel forward, padding, slots, sampling, Hugging Face generate, bad input."""
import pytest
import torch

from based import BasedConfig, BasedForCausalLM
from based.generation import Decoder, InferenceState, SamplingParams, generate, prefill, sample
from based.generation.fused import MAX_ROWS, fused_step

PRESETS = ["debug", "transformer-debug"]
# Every mixer family's decode path (rwkv, lightning, mamba2, and attention inside the Mamba-2 hybrid).
DECODE_PRESETS = [*PRESETS, "rwkv-debug", "lightning-debug", "mamba2-debug", "mamba2-hybrid-debug"]
# The other fixed-state baselines (issue 8): their decode is tested in tests/layers, their compiled and
# CUDA-graph decode here.
MIXER_PRESETS = ["rwkv-debug", "lightning-debug", "mamba2-debug", "mamba2-hybrid-debug"]


def build(name="debug", **overrides):
    torch.manual_seed(0)
    return BasedForCausalLM(BasedConfig.from_preset(name, **overrides)).eval()


@pytest.fixture(params=PRESETS, scope="module")
def model(request):
    return build(request.param)


def left_pad(prompts, pad=0):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
@pytest.mark.parametrize("name", DECODE_PRESETS)
def test_teacher_forced_decode_equals_parallel_forward(name):
    """Left-padded prompts of different lengths, then token-by-token decoding over 4 windows (and past
    the chunks of the chunked mixers): every position's logits equal the parallel forward of that
    sequence alone (fp32)."""
    model = build(name)
    window = build("debug").config.window_size  # 16 (Transformer++ has none: the same lengths)
    total = 4 * window
    prompt_lens = [5, window + 3]
    seqs = prompts_of([total, total], seed=2)
    ids, mask = left_pad([s[:n] for s, n in zip(seqs, prompt_lens)])
    state = InferenceState.allocate(model, 2, max_seq_len=total)
    logits = [[row] for row in prefill(model, state, ids, mask)]
    for t in range(max(prompt_lens), total + max(prompt_lens) - min(prompt_lens)):
        # Each row feeds its own next token; a row past its sequence's end keeps decoding its last token.
        step_ids = torch.tensor([s[min(t - max(prompt_lens) + n, total - 1)] for s, n in zip(seqs, prompt_lens)])
        out = model.step(step_ids, state.layers, state.seqlen_offset)
        state.seqlen_offset += 1
        for row, n in enumerate(prompt_lens):
            if t - max(prompt_lens) + n < total:
                logits[row].append(out[row])
    for row, (s, n) in enumerate(zip(seqs, prompt_lens)):
        full = model(torch.tensor([s])).logits[0, n - 1 :]
        torch.testing.assert_close(torch.stack(logits[row]), full, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = prompts_of([3, 11, 20, 7])
    ids, mask = left_pad(prompts)
    batched = generate(model, ids, 24, attention_mask=mask)
    for row, p in enumerate(prompts):
        torch.testing.assert_close(batched[row], generate(model, torch.tensor([p]), 24)[0], rtol=0, atol=0)


def test_hf_generate_greedy_equals_our_decode_loop(model):
    prompts = prompts_of([6, 13, 9])
    ids, mask = left_pad(prompts)
    ours = generate(model, ids, 20, attention_mask=mask)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(hf[:, ids.shape[1] :], ours)


def test_hf_generate_prefills_once_then_steps(monkeypatch):
    model = build()
    calls = []
    forward = model.forward_with_cache
    def counted(ids, *args, **kwargs):
        calls.append(ids.shape[1])
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward_with_cache", counted)
    model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, do_sample=False)
    assert calls == [4] + [1] * 5


@torch.no_grad()
def test_forward_with_cache_prefills_steps_and_continues(model):
    """The cache protocol generate relies on: prefill, one-token steps, and several new tokens at once."""
    ids = torch.tensor(prompts_of([12, 12]))
    full = model(ids).logits
    cache = InferenceState.allocate(model, 2, max_seq_len=16)
    torch.testing.assert_close(model(ids[:, :5], cache=cache).logits[:, -1], full[:, 4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(ids[:, 5:6], cache=cache).logits[:, -1], full[:, 5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(ids[:, 6:12], cache=cache).logits[:, -1], full[:, 11], rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 12 and cache.seqlen_offset.tolist() == [12, 12]


def test_hf_generate_sampling_and_eos():
    model = build()
    ids = torch.tensor(prompts_of([10, 10]))
    torch.manual_seed(3)
    a = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    b = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.9)
    assert torch.equal(a, b)
    # Per-sequence early stop: with eos = row 0's third greedy token, row 0 stops there and pads.
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    eos = int(greedy[0, 12])
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=255)
    row0 = out[0, 10:].tolist()
    assert row0[: row0.index(eos) + 1] == greedy[0, 10 : 10 + row0.index(eos) + 1].tolist()
    assert all(t == 255 for t in row0[row0.index(eos) + 1 :])


@torch.no_grad()
def test_hf_generate_samples_at_any_temperature():
    # Before: transformers' warper divided the scores by 1e-39, overflowing float32 to inf, and sampling
    # raised "probability tensor contains either `inf`, `nan` or element < 0" (1e-45 .. 1e-39, 1e-300).
    model = build()
    ids = torch.tensor(prompts_of([10, 10]))
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    for temperature in (1e-300, 1e-45, 1e-39, 1e-20):
        torch.manual_seed(0)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, temperature=temperature), greedy)
    for temperature in (1.0, 1e6, 1e300):
        torch.manual_seed(0)
        out = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=temperature, top_k=50)
        assert out.shape == greedy.shape and not torch.equal(out, greedy)
    torch.manual_seed(0)
    plain = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.7)
    scores = model(ids).logits[:, -1]
    from transformers import TemperatureLogitsWarper

    from based.generation.hf import StableTemperature

    ours = StableTemperature(0.7)(ids, scores).softmax(-1)
    theirs = TemperatureLogitsWarper(0.7)(ids, scores).softmax(-1)  # the same distribution where it is finite
    assert torch.allclose(ours, theirs, atol=1e-6) and plain.shape == greedy.shape


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(model):
    ids = torch.tensor(prompts_of([9, 9]))
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    torch.manual_seed(7)
    a = generate(model, ids, 16, sampling=params)
    torch.manual_seed(7)
    b = generate(model, ids, 16, sampling=params)
    assert torch.equal(a, b)
    torch.manual_seed(8)
    assert not torch.equal(a, generate(model, ids, 16, sampling=params))
    greedy = generate(model, ids, 16)
    assert torch.equal(generate(model, ids, 16, sampling=SamplingParams(temperature=1.5, top_k=1)), greedy)
    # top_k=1 through the sampling path itself, not the greedy shortcut.
    logits = torch.randn(64, 256)
    assert torch.equal(sample(logits, SamplingParams(1.0, top_k=2, top_p=1e-6)), logits.argmax(-1))


def test_sample_follows_the_truncated_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(40_000, 4)
    torch.manual_seed(0)
    freq = lambda params: torch.bincount(sample(logits, params), minlength=4).float() / logits.shape[0]  # noqa: E731
    close = lambda got, want: torch.testing.assert_close(got, torch.tensor(want), atol=0.015, rtol=0)  # noqa: E731
    close(freq(SamplingParams(1.0)), [0.5, 0.3, 0.15, 0.05])
    close(freq(SamplingParams(1.0, top_k=2)), [0.625, 0.375, 0, 0])
    # top_p=0.7: 0.5 alone is short of it, 0.5 + 0.3 is enough.
    close(freq(SamplingParams(1.0, top_p=0.7)), [0.625, 0.375, 0, 0])
    assert freq(SamplingParams(0.05))[0] > 0.99  # a low temperature sharpens


def test_eos_stops_each_row_and_the_loop():
    model = build()
    ids = torch.tensor(prompts_of([8, 8]))
    greedy = generate(model, ids, 40)
    eos = int(greedy[0, 2])
    out = generate(model, ids, 40, eos_token_id=eos, pad_token_id=255, check_every=4)
    first = out[0].tolist().index(eos)
    assert out[0, : first + 1].tolist() == greedy[0, : first + 1].tolist()
    assert (out[0, first + 1 :] == 255).all()
    row1 = out[1].tolist()
    if eos not in row1:  # row 1 never ends: it runs to max_new_tokens
        assert out.shape[1] == 40 and row1 == greedy[1].tolist()


def test_continuous_batching_slots(model):
    """Sequences join and leave a running batch; each slot decodes exactly as the sequence would alone."""
    prompts = prompts_of([5, 12, 8])
    alone = [generate(model, torch.tensor([p]), 12)[0].tolist() for p in prompts]
    dec = Decoder(model, batch_size=2, max_seq_len=40)
    got = {0: [], 1: [], 2: []}
    got[0].append(int(dec.add(torch.tensor([prompts[0]]), slots=[0])[0]))
    for _ in range(3):
        got[0].append(int(dec.step()[0]))
    got[1].append(int(dec.add(torch.tensor([prompts[1]]), slots=[1])[0]))
    for _ in range(8):
        tokens = dec.step().tolist()
        got[0].append(tokens[0])
        got[1].append(tokens[1])
    dec.remove(0)
    assert dec.state.seqlen_offset[0] == 0 and all(t[0].abs().sum() == 0 for t in dec.state.tensors())
    got[2].append(int(dec.add(torch.tensor([prompts[2]]), slots=[0])[0]))
    for _ in range(11):
        tokens = dec.step().tolist()
        got[2].append(tokens[0])
        got[1].append(tokens[1])
    assert got[0] == alone[0] and got[1][:12] == alone[1] and got[2] == alone[2]


def test_prefill_into_scattered_slots_leaves_the_others_alone():
    model = build()
    state = InferenceState.allocate(model, 4, max_seq_len=32)
    prompts = prompts_of([6, 9])
    prefill(model, state, torch.tensor([prompts[0] * 2]), slots=[1])
    before = [t[1].clone() for t in state.tensors()]
    ids, mask = left_pad(prompts)
    prefill(model, state, ids, mask, slots=[3, 0])
    assert all(torch.equal(a, t[1]) for a, t in zip(before, state.tensors()))
    assert state.seqlen_offset.tolist() == [9, 12, 0, 6]
    assert all(t[2].abs().sum() == 0 for t in state.tensors())


def test_state_bytes_constant_for_based_linear_for_transformer():
    with torch.device("meta"):
        based, transformer = (BasedForCausalLM(BasedConfig.from_preset(n)) for n in ("1.3b", "transformer-1.3b"))
    sizes = [based.inference_state_bytes(L) for L in (1_000, 10_000, 100_000)]
    assert sizes[0] == sizes[1] == sizes[2]
    t = [transformer.inference_state_bytes(L) for L in (1_000, 10_000, 100_000)]
    assert t[1] == 10 * t[0] and t[2] == 100 * t[0]
    assert based.inference_state_bytes(1_000, batch_size=8) == 8 * sizes[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
        (dict(max_new_tokens=2**31), r"max_new_tokens must be at most 2\*\*31 - 1"),
        (dict(sampling_kw=dict(top_p=0.0)), r"top_p must be in \(0, 1\]"),
        (dict(sampling_kw=dict(top_p=1.5)), r"top_p must be in \(0, 1\]"),
        (dict(sampling_kw=dict(temperature=-0.1)), "temperature must be >= 0"),
        (dict(sampling_kw=dict(top_k=0)), "top_k must be a positive int"),
    ],
)
def test_bad_generation_arguments(kwargs, match):
    model = build()
    with pytest.raises(ValueError, match=match):
        sampling = SamplingParams(**kwargs.get("sampling_kw", {}))
        generate(model, torch.tensor([[1, 2, 3]]), kwargs.get("max_new_tokens", 4), sampling=sampling)


def test_empty_prompts_are_rejected():
    model = build()
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 4)
    ids, mask = left_pad([[1, 2], [3]])
    mask[1] = 0
    with pytest.raises(ValueError, match="row 1 of the batch is empty"):
        generate(model, ids, 4, attention_mask=mask)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, 4, attention_mask=torch.tensor([[1, 0], [1, 1]]))


def test_positional_limit_of_full_attention():
    transformer = build("transformer-debug")  # max_position_embeddings 512
    with pytest.raises(ValueError, match="prompt has 600 tokens, more than this model's max_position_embeddings=512"):
        generate(transformer, torch.ones(1, 600, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 12"):
        generate(transformer, torch.ones(1, 500, dtype=torch.long), 20)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        transformer.generate(torch.ones(1, 500, dtype=torch.long), max_new_tokens=20)
    based = build("debug")  # no positional limit: windows, linear attention and convs
    assert generate(based, torch.ones(1, 600, dtype=torch.long), 2).shape == (1, 2)


def test_batch_too_large_for_memory_names_the_fix():
    model = build()
    with pytest.raises(MemoryError, match=r"batch_size=10000000000 .* GiB is free on cpu: lower the batch size"):
        generate(model, torch.ones(1, 4, dtype=torch.long).expand(10**10, -1), 4)
    transformer = build("transformer-debug")
    with pytest.raises(MemoryError, match="or the prompt \\+ max_new_tokens length"):
        InferenceState.allocate(transformer, 10**10, max_seq_len=512)


def test_forward_without_cache_rejects_padding():
    model = build()
    ids, mask = left_pad([[1, 2, 3], [4]])
    with pytest.raises(ValueError, match="does not mask padding"):
        model(ids, attention_mask=mask)
    assert model(ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 3, 256)


@pytest.mark.parametrize("name", MIXER_PRESETS)
def test_compiled_step_makes_one_graph_per_mixer_type(name, monkeypatch):
    """Blocks share a compiled graph whatever their depth: nothing a step reads may differ per layer as an
    int (Lightning's depth-scaled decay rate is a float, which Dynamo turns into a graph input)."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager"))  # tracing only
    torch._dynamo.reset()
    counters.clear()
    model = build(name)
    ids = torch.tensor(prompts_of([10, 10]))
    assert torch.equal(generate(model, ids, 12, compile=True), generate(model, ids, 12))
    # One graph per mixer type, the logits, and one first graph specialised on a float before it is
    # seen to vary; never one per layer.
    assert counters["stats"]["unique_graphs"] <= len(set(model.config.mixer_types)) + 2
    assert not counters["graph_break"]
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS + MIXER_PRESETS)
def test_compiled_step_equals_eager(name):
    """torch.compile of each block's step (CPU inductor here: ~1 min of compiling) decodes the same tokens."""
    model = build(name)
    ids = torch.tensor(prompts_of([10, 10, 10]))
    assert torch.equal(generate(model, ids, 30, compile=True), generate(model, ids, 30))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", PRESETS + MIXER_PRESETS)
def test_cuda_graph_decode_equals_eager(name):
    model = build(name).cuda()
    ids = torch.tensor(prompts_of([10, 10]), device="cuda")
    eager = generate(model, ids, 40, cuda_graph=False, fused=False)
    assert torch.equal(generate(model, ids, 40, cuda_graph=True, fused=False), eager)
    assert torch.equal(generate(model, ids, 40, cuda_graph=True, compile=True, fused=False), eager)
    assert torch.equal(generate(model, ids, 40, cuda_graph=True, fused=True), eager)  # the default at batch 2
    assert torch.equal(eager.cpu(), generate(build(name), ids.cpu(), 40))
    params = SamplingParams(0.8, top_k=40, top_p=0.9)
    torch.manual_seed(1)
    a = generate(model, ids, 40, sampling=params)
    torch.manual_seed(1)
    assert torch.equal(a, generate(model, ids, 40, sampling=params))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hyena_cuda_graph_decode_equals_eager():
    """Hyena's step reads a cached, flipped filter (rebuilt when the parameters change): captured in a
    CUDA graph it decodes the tokens of eager decoding and of the CPU model."""
    name, overrides = "debug", dict(n_layer=2, mixer_types=["hyena", "base_conv"])
    model = build(name, **overrides).cuda()
    ids = torch.tensor(prompts_of([10, 10]), device="cuda")
    eager = generate(model, ids, 40, cuda_graph=False)
    assert torch.equal(generate(model, ids, 40, cuda_graph=True), eager)
    assert torch.equal(eager.cpu(), generate(build(name, **overrides), ids.cpu(), 40))



@torch.no_grad()
@pytest.mark.parametrize("name", DECODE_PRESETS)
def test_fused_step_equals_model_step(name):
    """based.generation.fused_step: in its PyTorch form it is the layers' own arithmetic (equal logits on the
    CPU); its Triton kernels (interpreted without CUDA) agree to fp32 rounding. Six steps, states carried."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(name).to(device)
    ids = torch.tensor(prompts_of([14, 14], seed=3), device=device)
    logits = {}
    for kind in ("eager", "torch", "triton"):
        if kind == "triton" and device == "cpu" and name not in PRESETS + ["rwkv-debug"]:
            continue  # the interpreter is slow; the other mixers take the same fallback as RWKV
        state = InferenceState.allocate(model, 2, max_seq_len=32)
        prefill(model, state, ids[:, :8])
        step = model.step if kind == "eager" else fused_step(model, backend=kind)
        out = []
        for t in range(8, 14):
            out.append(step(ids[:, t], state.layers, state.seqlen_offset))
            state.seqlen_offset += 1
        logits[kind] = torch.stack(out)
    if device == "cpu":
        assert torch.equal(logits["torch"], logits["eager"])
    else:  # the eager conv step is a Triton kernel on CUDA: a different order of fp32 sums
        torch.testing.assert_close(logits["torch"], logits["eager"], rtol=1e-5, atol=1e-5)
    if "triton" in logits:
        torch.testing.assert_close(logits["triton"], logits["eager"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("feature_map", ["performer", "cosformer"])
def test_fused_step_leaves_feature_map_ablations_their_own_step(feature_map):
    """Linear attention with another feature map (a LinearAttention subclass) keeps its own step inside
    the fused step: the same logits as model.step."""
    model = build("debug", feature_map=feature_map)
    ids = torch.tensor(prompts_of([12, 12], seed=4))
    logits = []
    for step_of in (lambda m: m.step, fused_step):
        state = InferenceState.allocate(model, 2, max_seq_len=32)
        prefill(model, state, ids[:, :8])
        step = step_of(model)
        out = []
        for t in range(8, 12):
            out.append(step(ids[:, t], state.layers, state.seqlen_offset))
            state.seqlen_offset += 1
        logits.append(torch.stack(out))
    assert torch.equal(logits[1], logits[0])


def test_decoder_fused_choice_and_limit():
    model = build()
    ids = torch.tensor(prompts_of([6, 6]))
    assert Decoder(model, 2).step_kind == "eager"  # CPU: the fused step only on request
    assert Decoder(model, 2, fused=True).step_kind == "fused"
    assert Decoder(model, 2, compile=True, fused=False).step_kind == "compiled"
    eager = generate(model, ids, 12)
    assert torch.equal(generate(model, ids, 12, fused=True), eager)
    # Greedy: the fused step's LM head writes the tokens and advances the positions itself; with an eos id
    # they pass through the finished-slot bookkeeping (the first row's first token made its eos: pad after it).
    eos = int(eager[0, 0])
    pad = (eos + 1) % model.config.vocab_size
    stopped = generate(model, ids, 12, eos_token_id=eos, pad_token_id=pad, check_every=1)
    assert stopped[0, 0] == eos and (stopped[0, 1:] == pad).all()
    assert torch.equal(generate(model, ids, 12, fused=True, eos_token_id=eos, pad_token_id=pad, check_every=1),
                       stopped)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} slots"):
        Decoder(model, MAX_ROWS + 1, fused=True)


@torch.no_grad()
@pytest.mark.parametrize("fused,sampling,eos", [
    (True, None, False),  # greedy, fused: the LM head's kernel writes tokens, positions and the log
    (True, None, True),  # greedy with eos: the log takes the tokens after the finished-slot bookkeeping
    (False, None, False),
    (False, SamplingParams(0.9, top_k=20), True),
])
def test_decoder_log_holds_each_steps_token(fused, sampling, eos):
    """Decoder(log_len=L).recent(n) returns the tokens the last n steps returned, in order, however the
    positions (which differ per slot) wrap around the log."""
    model = build()
    ids = torch.tensor(prompts_of([9, 9], seed=6))
    plain = Decoder(model, 2, fused=fused, sampling=sampling)
    plain.add(ids[:, :5])
    eos_id = int(plain.step()[0]) if eos else None  # an id that slot 0 emits (right away)
    torch.manual_seed(2)
    decoder = Decoder(model, 2, fused=fused, sampling=sampling, eos_token_id=eos_id, log_len=4)
    decoder.add(ids[:1, :5], slots=[0])
    decoder.add(ids[1:, :9], slots=[1])  # slot 1 ahead by 4 positions
    returned = [decoder.step().clone() for _ in range(7)]
    assert torch.equal(decoder.recent(4), torch.stack(returned[-4:], 1))
    assert torch.equal(decoder.recent(1), returned[-1][:, None])
    with pytest.raises(ValueError, match=r"1 <= n <= log_len=4"):
        decoder.recent(5)
    with pytest.raises(ValueError, match="log_len must be an int >= 0"):
        Decoder(model, 2, log_len=-1)
    with pytest.raises(ValueError, match=r"log_len=0"):
        Decoder(model, 2).recent(1)

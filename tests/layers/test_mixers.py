"""Every token mixer: shapes, causality, prefill + step == full forward, state sizes, bad kwargs."""
import pytest
import torch

from based.layers import Attention, BaseConv, LinearAttention, SlidingWindowAttention

D, H, WINDOW = 32, 4, 5
MIXERS = {
    "linear_attn": lambda: LinearAttention(D, feature_dim=4, num_heads=H),
    "linear_attn_full_map": lambda: LinearAttention(D, feature_dim=4, num_heads=H, head_dim=6, feature_map="full"),
    # The state written every token (no pending buffer), and folded every 3rd (default 8).
    "linear_attn_fold_every_1": lambda: LinearAttention(D, feature_dim=4, num_heads=H, fold_every=1),
    "linear_attn_fold_every_3": lambda: LinearAttention(D, feature_dim=4, num_heads=H, fold_every=3),
    "sliding_window": lambda: SlidingWindowAttention(D, H, window_size=WINDOW),
    "attention": lambda: Attention(D, H),
    # Without rotary embeddings (the MQAR models of figure 2, as Zoology's): decode must skip it too.
    "attention_no_rotary": lambda: Attention(D, H, rotary=False),
    "sliding_window_no_rotary": lambda: SlidingWindowAttention(D, H, window_size=WINDOW, rotary=False),
    "base_conv": lambda: BaseConv(D, kernel_size=3),
}
T = 4 * WINDOW + 3  # several windows long
CACHE = 64  # full-attention KV-cache length


@pytest.fixture(params=list(MIXERS))
def mixer(request):
    return MIXERS[request.param]().eval()


def test_shape_and_dtype(mixer):
    x = torch.randn(2, 7, D)
    assert mixer(x).shape == (2, 7, D)
    assert mixer.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_causal(mixer):
    x = torch.randn(2, T, D)
    t = 11
    x2 = x.clone()
    x2[:, t] += 1.0
    y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y[:, :t], y2[:, :t], rtol=0, atol=0)
    assert (y[:, t] - y2[:, t]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("prompt", [1, 3, WINDOW + 4, T - 1])
@pytest.mark.parametrize("tensor_positions", [False, True])
def test_prefill_then_step_equals_forward(mixer, prompt, tensor_positions):
    B = 2
    x = torch.randn(B, T, D)
    full = mixer(x)
    state = mixer.allocate_inference_cache(B, max_seq_len=CACHE)
    pos = (lambda t: torch.full((B,), t)) if tensor_positions else (lambda t: t)
    outs = [mixer(x[:, :prompt], state, pos(0))]
    for t in range(prompt, T):
        step_in = x[:, t] if t % 2 else x[:, t : t + 1]  # [B, D] and [B, 1, D] both accepted
        outs.append(mixer.step(step_in, state, pos(t)).reshape(B, 1, D))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_chunked_prefill_equals_forward(mixer):
    x = torch.randn(2, T, D)
    state = mixer.allocate_inference_cache(2, max_seq_len=CACHE)
    bounds = [0, 2, 2 + WINDOW + 1, T]  # second chunk longer than the window
    outs = [mixer(x[:, a:b], state, a) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(outs, 1), mixer(x), rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 4, 9])
def test_prefill_continues_after_steps(mixer, steps):
    """prefill, decode some tokens, prefill again from there (a chat's next turn) == the full forward: the
    second prefill starts from everything the steps left, pending tokens of linear attention included."""
    x = torch.randn(2, T, D)
    state = mixer.allocate_inference_cache(2, max_seq_len=CACHE)
    outs = [mixer(x[:, :3], state, 0)]
    outs += [mixer.step(x[:, t : t + 1], state, t) for t in range(3, 3 + steps)]
    outs.append(mixer(x[:, 3 + steps :], state, 3 + steps))
    torch.testing.assert_close(torch.cat(outs, 1), mixer(x), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_prefill_at_offset_zero_discards_old_state(mixer):
    x = torch.randn(1, 9, D)
    state = mixer.allocate_inference_cache(1, max_seq_len=CACHE)
    mixer(torch.randn(1, 12, D), state, 0)  # a previous occupant of the slot
    torch.testing.assert_close(mixer(x, state, 0), mixer(x))
    torch.testing.assert_close(mixer.step(x[:, 0], state, 9), mixer(torch.cat([x, x[:, :1]], 1))[:, -1])


@torch.no_grad()
def test_sequences_at_different_positions_decode_in_one_batch(mixer):
    """Per-sequence slots and a position tensor [B]: one batched step equals each sequence alone."""
    lengths = [3, WINDOW + 6]
    xs = [torch.randn(1, n + 1, D) for n in lengths]
    batch_state = None
    expected = []
    for x, n in zip(xs, lengths):
        s = mixer.allocate_inference_cache(1, max_seq_len=CACHE)
        mixer(x[:, :n], s, 0)
        batch_state = s if batch_state is None else tuple(torch.cat([a, b]) for a, b in zip(batch_state, s))
        expected.append(mixer(x)[:, n])
    step_in = torch.cat([x[:, n] for x, n in zip(xs, lengths)])
    got = mixer.step(step_in, batch_state, torch.tensor(lengths))
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-5)


def test_inference_state_bytes_is_what_allocation_takes(mixer):
    for L in (1, WINDOW, 50):
        state = mixer.allocate_inference_cache(3, dtype=torch.bfloat16, max_seq_len=L)
        assert mixer.inference_state_bytes(L, batch_size=3, dtype=torch.bfloat16) == sum(
            t.numel() * t.element_size() for t in state
        )


def test_state_sizes():
    la, swa, attn, conv = (MIXERS[k]() for k in ("linear_attn", "sliding_window", "attention", "base_conv"))
    F = 1 + 4 + 4 * 5 // 2  # compact Taylor features of a 4-wide q/k
    for L in (1, 100, 10_000):
        assert la.state_size(L) == H * (D // H) * F + H * F
        assert swa.state_size(L) == 2 * D * min(WINDOW, L)
        assert attn.state_size(L) == 2 * D * L
        assert conv.state_size(L) == 2 * D * 3  # expand 2 -> 2 * D conv channels, 3 taps
    # Decode memory: constant for the recurrent mixers and the window, linear for attention.
    assert la.inference_state_bytes(10) == la.inference_state_bytes(100_000)
    assert swa.inference_state_bytes(10) == swa.inference_state_bytes(100_000)
    assert attn.inference_state_bytes(2000) == 2 * attn.inference_state_bytes(1000)
    # Linear attention keeps fp32 state whatever the model dtype (k_sum counts tokens); its pending buffer
    # holds the projections' k and v in the model dtype, and their count.
    kv, ks, kp, vp, n = la.allocate_inference_cache(1, dtype=torch.bfloat16)
    assert kv.dtype == ks.dtype == torch.float32
    assert kp.dtype == vp.dtype == torch.bfloat16 and n.dtype == torch.int32


def test_sliding_window_sees_exactly_window_tokens():
    swa = MIXERS["sliding_window"]().eval()
    x = torch.randn(1, 20, D)
    t = 15
    y = swa(x)[:, t]
    for j, visible in ((t - WINDOW, False), (t - WINDOW + 1, True)):
        x2 = x.clone()
        x2[:, j] += 1.0
        changed = (swa(x2)[:, t] - y).abs().max() > 1e-4
        assert changed == visible, f"token {j} visible={changed} from {t} with window {WINDOW}"


def test_attention_decode_beyond_cache_raises():
    attn = MIXERS["attention"]()
    state = attn.allocate_inference_cache(1, max_seq_len=4)
    with pytest.raises(ValueError, match="do not fit the KV cache of 4"):
        attn(torch.randn(1, 5, D), state, 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        attn.allocate_inference_cache(1)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LinearAttention(30, num_heads=4), "d_model=30 is not divisible by num_heads=4"),
        (lambda: LinearAttention(32, feature_dim=0), "feature_dim must be positive, got 0"),
        (lambda: LinearAttention(32, feature_map="cubic"), "unknown feature_map 'cubic'.*compact"),
        (lambda: LinearAttention(32, num_heads=0), "num_heads must be positive"),
        (lambda: SlidingWindowAttention(32, 4, window_size=0), "window_size must be a positive int.*got 0"),
        (lambda: SlidingWindowAttention(32, 4, window_size=2.5), "window_size must be a positive int.*got 2.5"),
        (lambda: SlidingWindowAttention(30, 4, window_size=8), "d_model=30 is not divisible by num_heads=4"),
        (lambda: Attention(32, 32), "head_dim .* = 1 must be even"),
        (lambda: BaseConv(32, kernel_size=0), "kernel_size must be positive, got 0"),
        (lambda: BaseConv(32, expand=0), "expand must be positive, got 0"),
    ],
)
def test_bad_kwargs(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_linear_attention_decode_traffic_counts_the_deferred_writes():
    """Bytes a step moves (the bandwidth roofline of `based bench generate`): the state read and written
    every token without a pending buffer; with one, read every token, written every fold_every-th."""
    every_token = LinearAttention(D, feature_dim=4, num_heads=H, fold_every=1)
    assert every_token.decode_traffic_bytes() == 2 * every_token.inference_state_bytes(1)
    deferred = LinearAttention(D, feature_dim=4, num_heads=H, fold_every=8)
    fp32 = every_token.inference_state_bytes(1)
    buffered = deferred.inference_state_bytes(1) - fp32
    assert deferred.decode_traffic_bytes() == round(fp32 * 9 / 8) + buffered + buffered // 7
    with pytest.raises(ValueError, match="fold_every"):
        LinearAttention(D, feature_dim=4, num_heads=H, fold_every=0)


def test_attention_without_rotary_is_plain_causal_softmax_attention():
    """rotary=False: softmax(q k^T / sqrt(D) + causal mask) v per head, from the Wqkv split, then out_proj;
    with rotary the same inputs give another output (so the flag is not ignored)."""
    torch.manual_seed(0)
    plain, rotated = Attention(D, H, rotary=False).eval(), Attention(D, H).eval()
    rotated.load_state_dict(plain.state_dict())
    x = torch.randn(2, 9, D)
    q, k, v = plain.Wqkv(x).view(2, 9, 3, H, D // H).unbind(2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / (D // H) ** 0.5
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(2, 9, D)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), plain.out_proj(o), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(rotated(x), plain(x), atol=1e-3)

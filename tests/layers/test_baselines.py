"""The baseline mixers (Mamba, H3, Hyena, RWKV, Lightning, Mamba-2) and the linear-attention feature-map ablations: causality, decode
against the full forward, state sizes against hand counts, their ops against naive references, LM use."""
import pytest
import torch

from based import BasedConfig, BasedForCausalLM
from based.generation import InferenceState, generate, prefill
from based.layers import (
    FEATURE_MAP_ABLATIONS, H3, RWKV, Attention, BaseConv, FeatureMapLinearAttention, Hyena, LightningAttention,
    LinearAttention, Mamba, Mamba2, SlidingWindowAttention,
)
from based.ops.linear_attn import linear_attn, naive_linear_attn
from based.ops.long_conv import long_conv, naive_long_conv
from based.ops.ssm import selective_scan, selective_scan_step
from tests.conftest import rel_err

D, H, FD = 32, 4, 4  # d_model, heads, feature dim
MIXERS = {
    "mamba": lambda: Mamba(D, d_state=8),
    "h3": lambda: H3(D, d_state=8),
    "hyena": lambda: Hyena(D, max_seq_len=64, filter_order=16),
    "rwkv": lambda: RWKV(D, head_size=8),
    # Chunks of 8, so that T and the prefill below span full and partial chunks.
    "lightning": lambda: LightningAttention(D, num_heads=4, num_layers=4, layer_idx=1, chunk_size=8),
    "mamba2": lambda: Mamba2(D, d_state=8, headdim=16, chunk_size=8),
    "mamba2_groups": lambda: Mamba2(D, d_state=8, headdim=8, ngroups=2, chunk_size=8),
    **{f"la_{fm}": (lambda fm=fm: FeatureMapLinearAttention(D, fm, feature_dim=FD, num_heads=H, max_seq_len=64))
       for fm in FEATURE_MAP_ABLATIONS},
}
DECODES = list(MIXERS)
FFT = {"h3", "hyena"}  # long convolutions by FFT: earlier outputs move by float rounding only
T = 23


@pytest.fixture(params=list(MIXERS))
def mixer_name(request):
    return request.param


def test_shape_dtype_and_causality(mixer_name):
    mixer = MIXERS[mixer_name]().eval()
    x = torch.randn(2, T, D)
    t = 11
    x2 = x.clone()
    x2[:, t] += 1.0
    y, y2 = mixer(x), mixer(x2)
    assert y.shape == (2, T, D)
    atol = 1e-5 if mixer_name in FFT else 0
    torch.testing.assert_close(y[:, :t], y2[:, :t], rtol=0, atol=atol)
    assert (y[:, t] - y2[:, t]).abs().max() > 1e-3
    assert mixer.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@torch.no_grad()
@pytest.mark.parametrize("name", DECODES)
def test_prefill_then_step_equals_forward(name):
    mixer = MIXERS[name]().eval()
    B, prompt = 2, 13  # one full chunk of 8 and a partial one for the chunked mixers
    x = torch.randn(B, T, D)
    full = mixer(x)
    state = mixer.allocate_inference_cache(B, max_seq_len=64)
    outs = [mixer(x[:, :prompt], state, 0)]
    for t in range(prompt, T):
        outs.append(mixer.step(x[:, t] if t % 2 else x[:, t : t + 1], state, t).reshape(B, 1, D))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", DECODES)
def test_chunked_prefill_with_tensor_offsets_equals_forward(name):
    mixer = MIXERS[name]().eval()
    x = torch.randn(2, T, D)
    state = mixer.allocate_inference_cache(2, max_seq_len=64)
    mixer(torch.randn(2, 9, D), state, 0)  # a previous occupant: offset 0 must discard it
    bounds = [0, 7, 16, T]
    outs = [mixer(x[:, a:b], state, torch.full((2,), a)) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(outs, 1), mixer(x), rtol=1e-4, atol=1e-5)


def test_state_sizes_match_the_fields_formulas():
    """Values per sequence, per layer (REFERENCE.md): hand counts for d_model 32."""
    L = 100
    assert Attention(D, H).state_size(L) == 2 * D * L
    assert SlidingWindowAttention(D, H, window_size=8).state_size(L) == 2 * D * 8
    # Based: H * head_dim * D_feat + H * D_feat; compact Taylor features of d = 4: 1 + 4 + 10 = 15.
    assert LinearAttention(D, FD, H).state_size(L) == 4 * 8 * 15 + 4 * 15
    # The paper's 1.3B layer (one of 16 heads of 112, d = 16, full map 273): H * 112 * 273 + H * 273.
    assert LinearAttention(1792, 16, 16, feature_map="full").state_size(L) == 16 * 112 * 273 + 16 * 273
    assert Mamba(D, d_state=8).state_size(L) == 2 * D * 8
    assert H3(D, d_state=8).state_size(L) == D * 8
    assert RWKV(D, head_size=8).state_size(L) == (D // 8) * 8 * 8  # H dk dv
    assert Hyena(D).state_size(L) == D * L
    assert BaseConv(D, kernel_size=3).state_size(L) == 2 * D * 3  # d_inner = 2 * d_model channels
    widths = {"taylor": 15, "performer": 15, "cosformer": 8, "pos_elu": 4, "relu": 4}
    for fm, F in widths.items():
        assert FeatureMapLinearAttention(D, fm, FD, H).state_size(L) == H * 8 * F + H * F, fm
    assert FeatureMapLinearAttention(D, "identity", FD, H).state_size(L) == H * 8 * 4  # no normaliser
    assert FeatureMapLinearAttention(D, "performer", FD, H, num_features=32).state_size(L) == H * 8 * 32 + H * 32


def test_taylor_ablation_is_linear_attention():
    torch.manual_seed(0)
    la = LinearAttention(D, FD, H)
    torch.manual_seed(0)
    fm = FeatureMapLinearAttention(D, "taylor", FD, H)
    x = torch.randn(2, T, D)
    torch.testing.assert_close(fm(x), la(x))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("T_", [1, 63, 130])
def test_linear_attn_op_matches_naive(normalize, T_):
    q, k = torch.rand(2, T_, 3, 5), torch.rand(2, T_, 3, 5)  # positive features, as a feature map gives
    v = torch.randn(2, T_, 3, 7)
    o, (kv, ks) = linear_attn(q, k, v, normalize=normalize, output_final_state=True, chunk_size=32)
    assert rel_err(o, naive_linear_attn(q, k, v, normalize=normalize)) < 1e-5
    assert rel_err(kv, torch.einsum("bthf,bthd->bhfd", k, v)) < 1e-5
    assert rel_err(ks, k.sum(1)) < 1e-5


@pytest.mark.parametrize("T_", [1, 63, 200])
def test_long_conv_matches_naive(T_):
    u, k = torch.randn(2, T_, 6), torch.randn(6, T_ + 5)
    assert rel_err(long_conv(u, k), naive_long_conv(u, k)) < 1e-5


def test_selective_scan_matches_its_recurrence():
    B, T_, Dm, N = 2, 70, 6, 4  # longer than one discretisation chunk
    u, delta = torch.randn(B, T_, Dm), torch.rand(B, T_, Dm) * 0.5
    A = -torch.rand(Dm, N) - 0.1
    Bm, C, Dskip = torch.randn(B, T_, N), torch.randn(B, T_, N), torch.randn(Dm)
    y, h = selective_scan(u, delta, A, Bm, C, Dskip, output_final_state=True)
    state = torch.zeros(B, Dm, N)
    ref = torch.stack([selective_scan_step(u[:, t], delta[:, t], A, Bm[:, t], C[:, t], Dskip, state)
                       for t in range(T_)], 1)
    assert rel_err(y, ref) < 1e-5 and rel_err(h, state) < 1e-5

@torch.no_grad()
def test_hyena_lm_decode_equals_its_forward():
    """Through the LM: prefill of left-padded prompts (one offset per row), then teacher-forced steps, give
    the logits of the full forward of each sequence alone; generate's greedy tokens follow them."""
    config = BasedConfig.from_preset("debug", n_layer=2, mixer_types=["hyena", "base_conv"])
    torch.manual_seed(0)
    model = BasedForCausalLM(config).eval()
    seqs = torch.randint(1, config.vocab_size, (2, 16))
    lens = [3, 7]
    ids = torch.stack([torch.cat([torch.zeros(7 - n, dtype=torch.long), s[:n]]) for s, n in zip(seqs, lens)])
    mask = (torch.arange(7) >= torch.tensor([[7 - n] for n in lens])).long()
    state = InferenceState.allocate(model, 2, max_seq_len=32)
    logits = [[row] for row in prefill(model, state, ids, mask)]
    for t in range(9):
        out = model.step(torch.stack([s[n + t] for s, n in zip(seqs, lens)]), state.layers, state.seqlen_offset)
        state.seqlen_offset += 1
        for row in range(2):
            logits[row].append(out[row])
    for row, (s, n) in enumerate(zip(seqs, lens)):
        torch.testing.assert_close(torch.stack(logits[row]), model(s[None, : n + 9]).logits[0, n - 1 :],
                                   rtol=1e-5, atol=1e-5)
    new = generate(model, ids, 5, attention_mask=mask)
    for row, n in enumerate(lens):
        seq = seqs[row, :n]
        for _ in range(5):
            seq = torch.cat([seq, model(seq[None]).logits[0, -1].argmax().view(1)])
        assert torch.equal(new[row], seq[n:])


def test_hyena_decode_filter_cache_follows_parameter_updates():
    """Steps without gradient reuse a cached filter; an in-place update of any filter parameter (no_grad
    add_, optimizer step) rebuilds it: each step equals one with the filter computed afresh."""
    torch.manual_seed(0)
    m = Hyena(D, max_seq_len=64, filter_order=16)
    x = torch.randn(2, 5, D)
    state = m.allocate_inference_cache(2, max_seq_len=16)
    with torch.no_grad():
        m(x, state)
    offset = torch.tensor([5, 3])  # row 1 steps over a history that holds later inputs: they must not count

    def step(cached: bool) -> torch.Tensor:
        with torch.set_grad_enabled(not cached):  # with gradient the filter is never cached
            return m.step(x[:, 0], tuple(t.clone() for t in state), offset).detach()

    y0 = step(cached=True)
    assert m._decode_cache is not None and torch.equal(y0, step(cached=False))
    hpad = m._decode_cache[1]
    assert torch.equal(step(cached=True), y0) and m._decode_cache[1] is hpad  # reused
    with torch.no_grad():
        m.filter.mlp[1].freq.add_(1)
    y1 = step(cached=True)
    assert not torch.allclose(y1, y0) and torch.equal(y1, step(cached=False))
    opt = torch.optim.SGD(m.filter.parameters(), lr=0.1)
    m(x).square().sum().backward()
    opt.step()
    y2 = step(cached=True)
    assert not torch.allclose(y2, y1) and torch.equal(y2, step(cached=False))


@pytest.mark.parametrize(
    "mixer_types, extra",
    [(["mamba", "h3"], {}), (["hyena", "linear_attn"], {"feature_map": "performer"}), (["rwkv", "base_conv"], {}),
     (["linear_attn", "base_conv"], {"feature_map": "cosformer"})],
)
def test_usable_in_the_language_model(mixer_types, extra, tmp_path):
    config = BasedConfig.from_preset("debug", n_layer=2, mixer_types=mixer_types, **extra)
    model = BasedForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    model.save_pretrained(tmp_path)  # every parameter and constant survives a Hugging Face round trip
    with torch.no_grad():
        torch.testing.assert_close(BasedForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)
    assert model.state_size(12) == sum(b.mixer.state_size(12) for b in model.transformer.layers)
    # The Mamba step-size bias survives the LM's Linear init (it is not a Linear bias).
    for block in model.transformer.layers:
        if isinstance(block.mixer, Mamba):
            assert (torch.nn.functional.softplus(block.mixer.dt_bias) < 0.11).all()


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: FeatureMapLinearAttention(D, "cubic"), "unknown feature_map 'cubic'"),
        (lambda: H3(D, d_state=7), "d_state must be a positive even number"),
        (lambda: Mamba(D, d_state=0), "d_state must be positive"),
        (lambda: Hyena(0), "d_model and max_seq_len must be positive"),
        (lambda: Hyena(D).step(torch.zeros(1, D), Hyena(D).allocate_inference_cache(1, max_seq_len=4), 4),
         "do not fit Hyena's history of 4 tokens"),
    ],
)
def test_bad_kwargs(build, match):
    with pytest.raises((ValueError, NotImplementedError), match=match):
        build()

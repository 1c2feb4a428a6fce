"""RWKV-5: the op's chunked form against its fp32 recurrence (outputs, final state, every gradient), the
decode step, continuation, long strongly decaying sequences, input checks; the mixer's causality, prefill
+ steps against the full forward (teacher-forced LM decode: tests/generation), state size, constructor checks and LM use with save/load."""
import pytest
import torch

from based import BasedConfig, BasedForCausalLM
from based.generation import generate
from based.layers import RWKV
from based.ops.rwkv import naive_rwkv5_attn, rwkv5_attn, rwkv5_step
from tests.conftest import rel_err


def inputs(B=2, T=63, H=3, dk=5, dv=7, state=True):
    r, k = torch.randn(B, T, H, dk), torch.randn(B, T, H, dk)
    v = torch.randn(B, T, H, dv)
    # Per-channel decays from w = 0.9999 to w = exp(-20): slow and fast channels in one head.
    w_log = -torch.exp(torch.empty(H, dk).uniform_(-9, 3))
    u = torch.randn(H, dk)
    s0 = torch.randn(B, H, dk, dv) if state else None
    return r, k, v, w_log, u, s0


@pytest.mark.parametrize("chunk_size", [16, 32])
@pytest.mark.parametrize("T", [1, 63, 130])
def test_chunk_matches_naive_outputs_state_and_gradients(T, chunk_size):
    r, k, v, w_log, u, s0 = inputs(T=T)
    leaves = [t.requires_grad_() for t in (r, k, v, w_log, u, s0)]
    do, dS = torch.randn(2, T, 3, 7), torch.randn(2, 3, 5, 7)
    results = []
    for fn in (lambda: rwkv5_attn(r, k, v, w_log, u, chunk_size=chunk_size, initial_state=s0, output_final_state=True),
               lambda: naive_rwkv5_attn(r, k, v, w_log, u, initial_state=s0, output_final_state=True)):
        o, S = fn()
        grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), leaves)
        results.append((o, S, grads))
    (o, S, grads), (o_ref, S_ref, grads_ref) = results
    assert rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5
    for name, g, g_ref in zip(("r", "k", "v", "w_log", "u", "initial_state"), grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5, name


@torch.no_grad()
def test_decode_steps_match_naive():
    r, k, v, w_log, u, s0 = inputs(T=40)
    o_ref, S_ref = naive_rwkv5_attn(r, k, v, w_log, u, initial_state=s0, output_final_state=True)
    S = s0.clone()
    o = torch.stack([rwkv5_step(r[:, t], k[:, t], v[:, t], w_log, u, S) for t in range(40)], dim=1)
    assert rel_err(o, o_ref) < 1e-6 and rel_err(S, S_ref) < 1e-6


def test_two_halves_continue_the_whole():
    r, k, v, w_log, u, _ = inputs(T=100, state=False)
    o, S = rwkv5_attn(r, k, v, w_log, u, output_final_state=True)
    o1, S1 = rwkv5_attn(r[:, :45], k[:, :45], v[:, :45], w_log, u, output_final_state=True)
    o2, S2 = rwkv5_attn(r[:, 45:], k[:, 45:], v[:, 45:], w_log, u, initial_state=S1, output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-6 and rel_err(S2, S) < 1e-6
    assert rwkv5_attn(r, k, v, w_log, u)[1] is None


def test_long_sequence_with_strong_decay_stays_finite():
    """T = 4096 with w down to exp(-1000) (e^{lambda t} underflows in any factorisation that is not relative
    to the chunk) and up to 0.9999: finite, equal to the recurrence in fp64, finite gradients. (The fp32
    recurrence is 50x less accurate here than the chunked form: 4096 sequential rounded adds.)"""
    T, H, dk = 4096, 2, 4
    r, k, v = torch.randn(1, T, H, dk), torch.randn(1, T, H, dk), torch.randn(1, T, H, dk)
    w_log = torch.tensor([[-1e3, -50.0, -1.0, -1e-4], [-5.0, -20.0, -1e-2, -300.0]], requires_grad=True)
    u = torch.randn(H, dk)
    o, S = rwkv5_attn(r, k, v, w_log, u, chunk_size=64, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    with torch.no_grad():
        o_ref, S_ref = naive_rwkv5_attn(*(t.double() for t in (r, k, v, w_log, u)), output_final_state=True)
    assert rel_err(o, o_ref) < 2e-6 and rel_err(S, S_ref) < 2e-6
    (g,) = torch.autograd.grad(o.sum() + S.sum(), w_log)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(r=torch.randn(2, 8, 3)), r"r must be \[B, T, H, D\] \(4 dims\)"),
        (dict(k=torch.randn(2, 8, 3, 4)), "r and k must have the same shape"),
        (dict(v=torch.randn(2, 9, 3, 7)), r"v must be \[B, T, H, dv\] with B, T, H of r"),
        (dict(r=torch.randn(2, 0, 3, 5), k=torch.randn(2, 0, 3, 5), v=torch.randn(2, 0, 3, 7)), "at least 1"),
        (dict(w_log=torch.randn(3 * 5)), r"w_log must be \[H, dk\] = \(3, 5\)"),
        (dict(u=torch.randn(5, 3)), r"u must be \[H, dk\] = \(3, 5\)"),
        (dict(initial_state=torch.randn(2, 3, 7, 5)), r"initial_state must be \[B, H, dk, dv\] = \(2, 3, 5, 7\)"),
        (dict(chunk_size=0), "chunk_size must be a positive int, got 0"),
    ],
)
def test_bad_inputs_are_rejected(change, match):
    r, k, v, w_log, u, _ = inputs(T=8, state=False)
    args = {**dict(r=r, k=k, v=v, w_log=w_log, u=u), **change}
    with pytest.raises(ValueError, match=match):
        rwkv5_attn(**args)


def test_step_rejects_a_wrong_state():
    r, k, v, w_log, u, _ = inputs(T=1, state=False)
    with pytest.raises(ValueError, match=r"state must be \[B, H, dk, dv\] = \(2, 3, 5, 7\)"):
        rwkv5_step(r[:, 0], k[:, 0], v[:, 0], w_log, u, torch.zeros(2, 3, 7, 5))


def test_mixer_is_causal_across_chunks():
    mixer = RWKV(32, head_size=8, n_layer=4, layer_idx=2).eval()
    x = torch.randn(2, 70, 32)  # three chunks of 32
    t = 50
    x2 = x.clone()
    x2[:, t] += 1.0
    y, y2 = mixer(x), mixer(x2)
    assert y.shape == x.shape
    torch.testing.assert_close(y[:, :t], y2[:, :t], rtol=0, atol=0)
    assert (y[:, t] - y2[:, t]).abs().max() > 1e-3 and (y[:, t + 1] - y2[:, t + 1]).abs().max() > 1e-3  # shift
    assert mixer.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@torch.no_grad()
def test_mixer_prefill_then_steps_equal_forward():
    mixer = RWKV(32, head_size=8).eval()
    x = torch.randn(2, 45, 32)
    state = mixer.allocate_inference_cache(2)
    outs = [mixer(x[:, :37], state, 0)]
    outs += [mixer.step(x[:, t : t + 1], state, t) for t in range(37, 45)]
    torch.testing.assert_close(torch.cat(outs, 1), mixer(x), rtol=1e-4, atol=1e-5)


def test_state_size_by_hand():
    # d_model 64, head size 16: 4 heads of a 16 x 16 matrix; the 64-value token-shift buffer is not counted.
    mixer = RWKV(64, head_size=16)
    assert mixer.num_heads == 4 and mixer.state_size(10) == mixer.state_size(10_000) == 4 * 16 * 16 == 64 * 16
    # Bytes: the shift buffer in the model dtype plus the fp32 matrices, per sequence.
    assert mixer.inference_state_bytes(100, batch_size=3) == 3 * (64 * 4 + 4 * 16 * 16 * 4)
    assert mixer.inference_state_bytes(100, batch_size=3, dtype=torch.bfloat16) == 3 * (64 * 2 + 4 * 16 * 16 * 4)
    # Parameters: r, k, v, g, output (5 d^2), four mixes, decay, bonus, GroupNorm weight and bias (8 d).
    assert sum(p.numel() for p in mixer.parameters()) == 5 * 64**2 + 8 * 64
    assert mixer.time_decay._no_weight_decay and mixer.time_first._no_weight_decay
    assert mixer.time_decay.dim() == mixer.time_first.dim() == 1  # no weight decay by the ndim rule either


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=64, head_size=48), "head_size=48 must divide d_model=64"),
        (dict(d_model=0), "d_model must be a positive int, got 0"),
        (dict(d_model=64, head_size=-8), "head_size must be a positive int, got -8"),
        (dict(d_model=64, head_size=16.0), r"head_size must be a positive int, got 16\.0"),
        (dict(d_model=64, n_layer=0), "n_layer must be a positive int or None, got 0"),
        (dict(d_model=64, n_layer=4, layer_idx=4), r"layer_idx=4 is outside \[0, n_layer=4\)"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RWKV(**kwargs)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return BasedForCausalLM(BasedConfig.from_preset("rwkv-debug")).eval()


def test_lm_generate_hf_generate_and_save_load(lm, tmp_path):
    ids = torch.randint(1, 256, (2, 9))
    ours = generate(lm, ids, 12)
    assert torch.equal(lm.generate(ids, max_new_tokens=12, do_sample=False)[:, 9:], ours)
    lm.save_pretrained(tmp_path)
    loaded = BasedForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, lm(ids).logits, rtol=0, atol=0)
    assert loaded.config.rwkv_head_size == 16 and set(loaded.config.mixer_types) == {"rwkv"}
    assert lm.state_size(100) == 4 * 64 * 16  # 4 layers of 4 heads x 16 x 16


def test_lm_trains():
    model = BasedForCausalLM(BasedConfig.from_preset("rwkv-debug", n_layer=2, mixer_types=["rwkv", "base_conv"]))
    ids = torch.randint(0, 256, (2, 40))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    mixer = model.transformer.layers[0].mixer
    # The reference's initialisation survives the LM's: decays from w = exp(-e^-6) to exp(-e^-1).
    assert (mixer.time_decay.min().item(), mixer.time_decay.max().item()) == (-6.0, -1.0)
    for p in (mixer.time_decay, mixer.time_first, mixer.time_mix_r, mixer.receptance.weight, mixer.ln_x.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0

"""Lightning Attention and Mamba-2: the mamba_ssm path's layouts, state sizes against hand counts, decay
rates, bad arguments, generate against greedy full forwards, LM use and save/load. Causality and prefill +
step against the forward: tests/layers/test_baselines.py (MIXERS); teacher-forced decode of left-padded
batches: tests/generation."""
import pytest
import torch
import torch.nn.functional as F

from based import BasedConfig, BasedForCausalLM
from based.generation import generate
from based.layers import LightningAttention, Mamba2
from based.layers import mamba2 as mamba2_module
from based.layers.lightning import alibi_exponents
from based.ops.decay import naive_decay_linear_attn

D, T = 32, 23
PRESETS = ["lightning-debug", "mamba2-debug", "mamba2-hybrid-debug"]


def fake_mamba_chunk_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False):
    """mamba_ssm's documented contract: x [b, l, h, p], dt [b, l, h], A [h], B, C [b, l, g, n], D [h],
    states [b, h, p, n]; returns out or (out, final_states)."""
    rep = x.shape[2] // B.shape[2]
    B, C = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    init = None if initial_states is None else initial_states.transpose(-1, -2)
    y, final = naive_decay_linear_attn(C, B, x * dt.unsqueeze(-1), dt * A, initial_state=init, output_final_state=True)
    y = (y + x * D.unsqueeze(-1)).to(x.dtype)
    return (y, final.transpose(-1, -2)) if return_final_states else y


@torch.no_grad()
def test_mamba_ssm_path_plumbing(monkeypatch):
    """The layouts handed to and taken from mamba_ssm's kernel (not installed here: a reference stands in)."""
    mixer = Mamba2(D, d_state=8, headdim=8, ngroups=2, chunk_size=8).eval()
    x = torch.randn(2, T, D)
    ref = mixer(x)
    state_ref = mixer.allocate_inference_cache(2)
    mixer(x[:, :13], state_ref, 0)
    mixer(x[:, 13:], state_ref, 13)
    monkeypatch.setattr(mamba2_module, "_mamba_chunk_scan", fake_mamba_chunk_scan)
    monkeypatch.setattr(Mamba2, "_use_mamba_ssm", staticmethod(lambda x: True))
    torch.testing.assert_close(mixer(x), ref, rtol=1e-4, atol=1e-5)
    state = mixer.allocate_inference_cache(2)
    mixer(x[:, :13], state, 0)
    mixer(x[:, 13:], state, 13)
    for a, b in zip(state, state_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_state_sizes_match_hand_counts():
    L = 100
    assert LightningAttention(D, num_heads=4).state_size(L) == 4 * 8 * 8  # H * head_dim^2
    assert LightningAttention(1024, num_heads=16).state_size(L) == 16 * 64 * 64
    m = Mamba2(D, d_state=8, headdim=16)  # d_inner 64: 4 heads of 16 channels, N = 8 each
    assert m.state_size(L) == 4 * 16 * 8 == 2 * D * 8
    assert Mamba2(1024, d_state=128).state_size(L) == 32 * 64 * 128
    # inference_state_bytes counts the conv buffer too: (d_inner + 2 N) * d_conv, in the cache dtype.
    assert m.inference_state_bytes(L, dtype=torch.bfloat16) == 4 * 8 * 16 * 4 + (64 + 16) * 4 * 2
    assert LightningAttention(D, num_heads=4).inference_state_bytes(L, batch_size=3) == 3 * 4 * 8 * 8 * 4


def test_lightning_decay_rates():
    """TransNormerLLM: ALiBi slopes 2^(-8h/H), times 1 - l / (L - 1) + 1e-5 for layer l of L."""
    assert torch.equal(alibi_exponents(4), torch.tensor([2.0, 4.0, 6.0, 8.0]))
    assert torch.equal(alibi_exponents(6), torch.tensor([2.0, 4.0, 6.0, 8.0, 1.0, 3.0]))
    first = LightningAttention(D, num_heads=4, num_layers=5, layer_idx=0).log_decay()
    last = LightningAttention(D, num_heads=4, num_layers=5, layer_idx=4).log_decay()
    torch.testing.assert_close(first, -(1 + 1e-5) * torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    torch.testing.assert_close(last, -1e-5 * torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LightningAttention(30, num_heads=4), "d_model=30 is not divisible by num_heads=4"),
        (lambda: LightningAttention(D, num_heads=0), "d_model and num_heads must be positive"),
        (lambda: LightningAttention(D, num_layers=4, layer_idx=4), r"layer_idx must be in \[0, num_layers=4\)"),
        (lambda: LightningAttention(D, chunk_size=0), "chunk_size must be positive"),
        (lambda: Mamba2(D, d_state=0), "d_state must be a positive int, got 0"),
        (lambda: Mamba2(D, headdim=24), "d_inner = expand \\* d_model = 64 is not divisible by headdim=24"),
        (lambda: Mamba2(D, headdim=16, ngroups=3), "nheads = d_inner / headdim = 4 is not divisible by ngroups=3"),
        (lambda: Mamba2(D, dt_min=0.2, dt_max=0.1), "need 0 < dt_min <= dt_max"),
        (lambda: Mamba2(D, A_init_range=(0, 16)), "A_init_range must be"),
    ],
)
def test_bad_kwargs(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def build(name, **overrides):
    torch.manual_seed(0)
    return BasedForCausalLM(BasedConfig.from_preset(name, **overrides)).eval()


@torch.no_grad()
@pytest.mark.parametrize("name", PRESETS)
def test_generate_equals_greedy_full_forward(name):
    model = build(name)
    ids = torch.randint(1, 256, (2, 9))
    out = generate(model, ids, 24)
    seq = ids
    for _ in range(24):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 9:])


@pytest.mark.parametrize("mixer_types", [["lightning", "mamba2"], ["mamba2", "attention"]])
def test_usable_in_the_language_model(mixer_types, tmp_path):
    config = BasedConfig.from_preset("debug", n_layer=2, mixer_types=mixer_types, ssm_state_size=8,
                                     mamba2_headdim=16, lightning_num_heads=4)
    model = BasedForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 70))  # longer than one chunk
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(BasedForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)
    assert model.state_size(12) == sum(b.mixer.state_size(12) for b in model.transformer.layers)
    for block in model.transformer.layers:
        if isinstance(block.mixer, Mamba2):
            m = block.mixer
            # The SSM dynamics survive the LM's init (they are not Linear weights) and skip weight decay.
            assert (F.softplus(m.dt_bias) <= 0.1 + 1e-6).all() and (F.softplus(m.dt_bias) >= 1e-4 - 1e-9).all()
            assert ((-m.A_log.exp() >= -16) & (-m.A_log.exp() <= -1)).all() and torch.equal(m.D, torch.ones_like(m.D))
            assert all(p._no_weight_decay for p in (m.A_log, m.D, m.dt_bias))
            assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))

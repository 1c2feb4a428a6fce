"""Every baseline mixer against an independent statement of its published form.

Each reference below is written from the paper and the authors' reference code (H3 / S4D's SSKernelDiag
and SSKernelShift, safari's / Zoology's Hyena, mamba_ssm's selective_scan_ref and Mamba2, RWKV-LM's
RWKV_TimeMix_RWKV5, TransNormerLLM's lightning attention, the BASED paper's feature maps) as a plain loop
over time in fp64; the layer's weights are loaded into it and the outputs compared. The initialisations
are checked against the published ones by their statistics.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from based.layers import H3, RWKV, FeatureMapLinearAttention, Hyena, LightningAttention, Mamba, Mamba2

B, T = 2, 11


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float = 2e-5) -> None:
    """Relative error of the whole output (fp32 layer against the fp64 reference)."""
    err = (out.double() - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.2e}"


def _p(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def _linear(x, layer):
    return x @ _p(layer.weight).T + (0 if layer.bias is None else _p(layer.bias))


def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """nn.Conv1d(C, C, K, groups=C, padding=K - 1) truncated to the first T outputs, written as a loop:
    y_t = bias + sum_i weight[:, i] x_{t - (K - 1) + i}. x [B, T, C], weight [C, K]."""
    K = weight.shape[1]
    y = torch.zeros_like(x) + (0 if bias is None else bias)
    for t in range(x.shape[1]):
        for i in range(K):
            s = t - (K - 1) + i
            if s >= 0:
                y[:, t] += weight[:, i] * x[:, s]
    return y


def _silu(x):
    return x * torch.sigmoid(x)


# H3 ---------------------------------------------------------------------------------------------------


def h3_reference(layer: H3, x: torch.Tensor) -> torch.Tensor:
    """H3 (Fu et al., 2023, section 3.1; SSKernelShift and SSKernelDiag of the reference code).

    Shift SSM: state s_t = shift(s_{t-1}) + e_1 k_t, output C_shift . s_t + D_shift k_t, C_shift[:, l]
    weighting the key of l tokens ago. Diagonal SSM per head, N/2 complex modes, discretised by
    `layer.disc`; y_t = 2 Re(C . h_t) + D u_t for every entry u = k[i] v[j] of the head.
    """
    H, P, N = layer.num_heads, layer.head_dim, layer.d_state
    q, k, v = (_linear(x, m) for m in (layer.q_proj, layer.k_proj, layer.v_proj))
    c_shift = _p(layer.shift_kernel).flip(-1)  # ours stores the newest tap last
    s = torch.zeros(x.shape[0], layer.d_model, N, dtype=torch.float64)
    A = torch.complex(-torch.exp(_p(layer.A_log_real)), _p(layer.A_imag))
    dt = torch.exp(_p(layer.log_dt))[:, None]
    Bc = torch.complex(_p(layer.B)[..., 0], _p(layer.B)[..., 1])
    C = torch.complex(_p(layer.C)[..., 0], _p(layer.C)[..., 1])
    if layer.disc == "bilinear":
        dA, dB = (1 + dt * A / 2) / (1 - dt * A / 2), Bc * dt / (1 - dt * A / 2)
    else:
        dA, dB = torch.exp(dt * A), Bc * (torch.exp(dt * A) - 1) / A
    h = torch.zeros(x.shape[0], H, P, P, N // 2, dtype=torch.complex128)
    out = torch.zeros_like(q)
    for t in range(x.shape[1]):
        s = torch.cat([k[:, t, :, None], s[..., :-1]], dim=-1)
        kt = (c_shift * s).sum(-1) + _p(layer.shift_D) * k[:, t]
        u = kt.view(-1, H, P, 1) * v[:, t].view(-1, H, 1, P)  # [B, H, i, j]
        h = dA[:, None, None] * h + dB[:, None, None] * u[..., None]
        y = 2 * (C[:, None, None] * h).sum(-1).real + _p(layer.D)[:, None, None] * u
        out[:, t] = (q[:, t].view(-1, H, P, 1) * y).sum(-2).reshape(x.shape[0], -1)
    return _linear(out, layer.out_proj)


@pytest.mark.parametrize("head_dim,disc", [(1, "bilinear"), (2, "bilinear"), (2, "zoh"), (4, "bilinear")])
def test_h3_matches_its_reference(head_dim, disc):
    torch.manual_seed(0)
    layer = H3(8, d_state=6, head_dim=head_dim, disc=disc, dt_max=0.5)
    with torch.no_grad():  # move off the init so every parameter matters
        for p in (layer.A_log_real, layer.A_imag, layer.B, layer.C):
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(B, T, 8)
    _close(layer(x), h3_reference(layer, x.double()))


def test_h3_head_dim_decode_equals_forward():
    torch.manual_seed(0)
    layer = H3(8, d_state=4, head_dim=2)
    x = torch.randn(B, T, 8)
    state = layer.allocate_inference_cache(B)
    steps = torch.stack([layer.step(x[:, t], state) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, layer(x), atol=1e-5, rtol=1e-4)


def test_h3_init_is_s4d_lin_with_a_conv_initialised_shift():
    torch.manual_seed(0)
    d, N = 256, 16
    layer = H3(d, d_state=N, head_dim=2)
    H = d // 2
    assert torch.allclose(-torch.exp(layer.A_log_real), torch.full((H, N // 2), -0.5))
    assert torch.equal(layer.A_imag, math.pi * torch.arange(N // 2).float().expand(H, -1))
    assert torch.equal(layer.B[..., 0], torch.ones(H, N // 2)) and not layer.B[..., 1].any()
    dt = torch.exp(layer.log_dt)
    assert dt.min() >= 1e-3 and dt.max() <= 1e-1
    assert abs(layer.log_dt.mean().item() - (math.log(1e-3) + math.log(1e-1)) / 2) < 0.3  # log-uniform
    assert abs(layer.C.var().item() - 0.5) < 0.05  # C ~ CN(0, 1): real and imaginary parts of variance 1/2
    bound = 1 / math.sqrt(N)  # torch's Conv1d init of the shift SSM's taps, fan-in N
    assert layer.shift_kernel.abs().max() <= bound and layer.shift_kernel.abs().max() > 0.9 * bound
    assert abs(layer.D.std().item() - 1) < 0.2 and abs(layer.shift_D.std().item() - 1) < 0.1
    assert layer.state_size(64) == H * 2 * 2 * N


# Hyena ------------------------------------------------------------------------------------------------


def hyena_filter_reference(layer: Hyena, L: int) -> torch.Tensor:
    """Hyena's implicit filter (Poli et al., 2023, section 3.3; PositionalEmbedding, Sin,
    ExponentialModulation of the reference): positions z_i = [t_i, cos(2 pi f i / L'), -sin(2 pi f i / L')]
    with t = linspace(0, 1, L'), L' = max_seq_len; h = FFN(z) with sine activations, times
    exp(-t |delta_c|), delta from log(1e-2) / 1.5 to log(1e-2) / 0.3 over the channels. [d_model, L]."""
    f, Lp = layer.filter, layer.max_seq_len
    bands = (f.emb_dim - 1) // 2
    t = torch.linspace(0, 1, Lp, dtype=torch.float64)[:L, None]
    w = 2 * math.pi * torch.arange(L, dtype=torch.float64)[:, None] / Lp
    freqs = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None]
    z = torch.cat([t, torch.cos(freqs * w), -torch.sin(freqs * w)], dim=-1)
    lin1, sin1, lin2, sin2, lin3 = f.mlp
    h = torch.sin(_p(sin1.freq) * _linear(z, lin1))
    h = torch.sin(_p(sin2.freq) * _linear(h, lin2))
    h = _linear(h, lin3)
    deltas = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, layer.d_model, dtype=torch.float64)
    return (h * torch.exp(-t * deltas.abs())).T


def hyena_reference(layer: Hyena, x: torch.Tensor) -> torch.Tensor:
    """Order-2 Hyena as the reference writes it: [x1, x2, v] = short_conv(in_proj(u)); v = v * x1;
    v = h * v + bias * v (causal long conv); y = out_proj(v * x2). Ours orders the projections
    [x2, x1, v] (the output gate first), loaded here into the reference's order."""
    d = layer.d_model
    W, b = _p(layer.in_proj.weight), _p(layer.in_proj.bias)
    perm = torch.cat([torch.arange(d, 2 * d), torch.arange(0, d), torch.arange(2 * d, 3 * d)])
    u = x @ W[perm].T + b[perm]
    u = _causal_conv(u, _p(layer.short_filter.weight)[perm, 0], _p(layer.short_filter.bias)[perm])
    x1, x2, v = u.split(d, dim=-1)
    v = v * x1
    h = hyena_filter_reference(layer, x.shape[1])
    y = torch.zeros_like(v)
    for t in range(x.shape[1]):
        for s in range(t + 1):
            y[:, t] += h[:, t - s] * v[:, s]
    y = y + _p(layer.filter_bias) * v
    return _linear(y * x2, layer.out_proj)


def test_hyena_matches_its_reference():
    torch.manual_seed(0)
    layer = Hyena(8, max_seq_len=16, filter_order=12)
    x = torch.randn(B, T, 8)
    _close(layer(x), hyena_reference(layer, x.double()))
    _close(layer.filter(T), hyena_filter_reference(layer, T))


def test_hyena_init_is_the_references():
    torch.manual_seed(0)
    layer = Hyena(64, max_seq_len=64, filter_order=16)
    for act in (layer.filter.mlp[1], layer.filter.mlp[3]):
        assert torch.equal(act.freq, torch.ones(16))  # Sin(w=1), a learned frequency per feature
    assert layer.filter.mlp[4].bias is None
    assert abs(layer.filter_bias.std().item() - 1) < 0.25  # bias ~ N(0, 1)
    # The modulation: the fastest channel is down to 1e-2 at 30% of max_seq_len, the slowest at 150%.
    with torch.no_grad():
        layer.filter.mlp[4].weight.zero_()
        layer.filter.mlp[4].weight[:, 0] = 1.0
        layer.filter.mlp[2].weight.zero_()
        layer.filter.mlp[2].bias.fill_(math.pi / 2)  # every hidden unit sin(pi / 2) = 1: h = 1 * decay
    h = layer.filter(64)
    t = torch.linspace(0, 1, 64)
    torch.testing.assert_close(h[-1], torch.exp(t * math.log(1e-2) / 0.3), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h[0], torch.exp(t * math.log(1e-2) / 1.5), atol=1e-6, rtol=1e-5)


# Mamba ------------------------------------------------------------------------------------------------


def selective_scan_reference(u, delta, A, Bm, C, D, z):
    """mamba_ssm's selective_scan_ref semantics: u, delta, z [B, D, L]; A [D, N]; B, C [B, N, L] (one
    per token, shared by the channels); x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t;
    y_t = C_t . x_t + D u_t; out = y * silu(z)."""
    x = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[2]):
        x = torch.exp(delta[:, :, t, None] * A) * x + delta[:, :, t, None] * Bm[:, None, :, t] * u[:, :, t, None]
        ys.append((x * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) + D[:, None] * u
    return y * _silu(z)


def mamba_reference(layer: Mamba, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's Mamba.forward (slow path): in_proj -> [x, z]; x = silu(causal depthwise conv(x));
    x_proj -> [dt, B, C]; delta = softplus(dt_proj.weight @ dt + dt_proj.bias); selective scan; out_proj."""
    xz = _linear(x, layer.in_proj)
    xs, z = xz.split(layer.d_inner, dim=-1)
    xs = _silu(_causal_conv(xs, _p(layer.conv1d.weight)[:, 0], _p(layer.conv1d.bias)))
    dt, Bm, C = _linear(xs, layer.x_proj).split([layer.dt_rank, layer.d_state, layer.d_state], dim=-1)
    delta = F.softplus(dt @ _p(layer.dt_proj.weight).T + _p(layer.dt_bias))
    A = -torch.exp(_p(layer.A_log))
    y = selective_scan_reference(xs.transpose(1, 2), delta.transpose(1, 2), A, Bm.transpose(1, 2),
                                 C.transpose(1, 2), _p(layer.D), z.transpose(1, 2))
    return _linear(y.transpose(1, 2), layer.out_proj)


def test_mamba_matches_selective_scan_ref():
    torch.manual_seed(0)
    layer = Mamba(8, d_state=4, dt_max=0.5)
    x = torch.randn(B, T, 8)
    _close(layer(x), mamba_reference(layer, x.double()))


def test_mamba_init_is_mamba_ssms():
    torch.manual_seed(0)
    layer = Mamba(64, d_state=16)
    assert torch.allclose(-torch.exp(layer.A_log), -torch.arange(1, 17).float().expand(128, -1))  # S4D-real
    assert torch.equal(layer.D, torch.ones(128))
    dt = F.softplus(layer.dt_bias)  # inverse-softplus bias: softplus gives dt back
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert abs(dt.log().mean().item() - (math.log(1e-3) + math.log(1e-1)) / 2) < 0.35  # log-uniform
    bound = layer.dt_rank**-0.5
    assert layer.dt_proj.weight.abs().max() <= bound and layer.dt_proj.weight.abs().max() > 0.8 * bound
    assert layer.dt_proj.bias is None and layer.in_proj.bias is None and layer.out_proj.bias is None
    assert layer.conv1d.weight.shape == (128, 1, 4) and layer.conv1d.bias is not None


# Mamba-2 ----------------------------------------------------------------------------------------------


def mamba2_reference(layer: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's Mamba2 (ngroups 1, rmsnorm with the gate before the norm) with SSD as its recurrence:
    per head h, S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t x_t^T [N, P]; y_t = C_t^T S_t + D_h x_t."""
    H, P, N = layer.nheads, layer.headdim, layer.d_state
    zxbcdt = _linear(x, layer.in_proj)
    z, xBC, dt = zxbcdt.split([layer.d_inner, layer.conv_dim, H], dim=-1)
    xBC = _silu(_causal_conv(xBC, _p(layer.conv1d.weight)[:, 0], _p(layer.conv1d.bias)))
    xs, Bm, C = xBC.split([layer.d_inner, N, N], dim=-1)
    dt = F.softplus(dt + _p(layer.dt_bias))
    A = -torch.exp(_p(layer.A_log))
    S = torch.zeros(x.shape[0], H, N, P, dtype=torch.float64)
    ys = []
    for t in range(x.shape[1]):
        xt = xs[:, t].view(-1, H, P)
        S = torch.exp(dt[:, t, :, None, None] * A[:, None, None]) * S \
            + dt[:, t, :, None, None] * Bm[:, t, None, :, None] * xt[:, :, None, :]
        ys.append((C[:, t, None, :, None] * S).sum(-2) + _p(layer.D)[:, None] * xt)
    y = torch.stack(ys, dim=1).flatten(-2) * _silu(z)
    y = y / torch.sqrt(y.square().mean(-1, keepdim=True) + layer.norm.eps) * _p(layer.norm.weight)
    return _linear(y, layer.out_proj)


def test_mamba2_matches_ssd_recurrence():
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=4, headdim=8, chunk_size=4, dt_max=0.5)
    x = torch.randn(B, T, 16)
    _close(layer(x), mamba2_reference(layer, x.double()))


def test_mamba2_init_is_mamba_ssms():
    torch.manual_seed(0)
    layer = Mamba2(512, d_state=8, headdim=2)  # 512 heads
    A = torch.exp(layer.A_log)
    assert A.min() >= 1 and A.max() <= 16 and abs(A.mean().item() - 8.5) < 0.8  # A ~ U[1, 16], sd of mean 0.19
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert torch.equal(layer.D, torch.ones(layer.nheads))


# RWKV-5 -----------------------------------------------------------------------------------------------


def rwkv5_reference(layer: RWKV, x: torch.Tensor) -> torch.Tensor:
    """RWKV-5 time mixing (RWKV-LM RWKV_TimeMix_RWKV5): token shift xx = x_{t-1};
    x_* = x mu_* + xx (1 - mu_*); per head, o_t = r_t^T (diag(u) k_t v_t^T + S), S = diag(w) S + k_t v_t^T,
    w = exp(-exp(time_decay)); GroupNorm(x / 8) per head (eps 1e-5) times silu(gate); output."""
    H, K = layer.num_heads, layer.head_size
    xx = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    mix = lambda mu: x * _p(mu) + xx * (1 - _p(mu))
    r, k, v = (_linear(mix(mu), m) for mu, m in ((layer.time_mix_r, layer.receptance),
                                                 (layer.time_mix_k, layer.key), (layer.time_mix_v, layer.value)))
    g = _silu(_linear(mix(layer.time_mix_g), layer.gate))
    w = torch.exp(-torch.exp(_p(layer.time_decay))).view(H, K, 1)
    u = _p(layer.time_first).view(H, K, 1)
    S = torch.zeros(x.shape[0], H, K, K, dtype=torch.float64)
    outs = []
    for t in range(x.shape[1]):
        rt, kt, vt = (a[:, t].view(-1, H, K) for a in (r, k, v))
        kv = kt[..., :, None] * vt[..., None, :]
        outs.append((rt[..., :, None] * (u * kv + S)).sum(-2))
        S = w * S + kv
    o = torch.stack(outs, dim=1) / 8  # [B, T, H, K]
    o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + 1e-5)
    o = o.flatten(-2) * _p(layer.ln_x.weight) + _p(layer.ln_x.bias)
    return _linear(o * g, layer.output)


def test_rwkv5_matches_its_reference():
    torch.manual_seed(0)
    layer = RWKV(16, head_size=8, n_layer=2, layer_idx=1)
    with torch.no_grad():
        layer.ln_x.weight.add_(0.1 * torch.randn(16))
        layer.ln_x.bias.add_(0.1 * torch.randn(16))
    x = torch.randn(B, T, 16)
    _close(layer(x), rwkv5_reference(layer, x.double()), tol=5e-5)


def test_rwkv5_init_is_the_references():
    d, n_layer, i = 64, 4, 1
    layer = RWKV(d, head_size=16, n_layer=n_layer, layer_idx=i)
    r01, r10 = i / (n_layer - 1), 1 - i / n_layer
    n = torch.arange(d, dtype=torch.float64)
    ddd = n / d
    torch.testing.assert_close(_p(layer.time_mix_k), ddd ** r10, check_dtype=False)
    torch.testing.assert_close(_p(layer.time_mix_v), ddd ** r10 + 0.3 * r01, check_dtype=False)
    torch.testing.assert_close(_p(layer.time_mix_r), ddd ** (0.5 * r10), check_dtype=False)
    decay_speed = -6 + 5 * (n / (d - 1)) ** (0.7 + 1.3 * r01)
    torch.testing.assert_close(_p(layer.time_decay), decay_speed, check_dtype=False, atol=1e-6, rtol=1e-6)
    zigzag = ((n + 1) % 3 - 1) * 0.1
    torch.testing.assert_close(_p(layer.time_first), r01 * (1 - n / (d - 1)) + zigzag, check_dtype=False)


# Lightning --------------------------------------------------------------------------------------------


def lightning_reference(layer: LightningAttention, x: torch.Tensor) -> torch.Tensor:
    """TransNormerLLM's gated linear attention: q, k = silu, v, u linear; S_t = lambda_h S_{t-1} + k_t v_t^T,
    o_t = q_t^T S_t; lambda_h = exp(-2^(-8 h / H) (1 - l / (L - 1) + 1e-5)) for h = 1..H at layer l of L;
    y = out_proj(o / rms(o) * u)."""
    H, Dh = layer.num_heads, layer.head_dim
    q, k, v, u = _linear(x, layer.qkvu_proj).chunk(4, dim=-1)
    q, k = _silu(q), _silu(k)
    slopes = 2.0 ** (-8 * torch.arange(1, H + 1, dtype=torch.float64) / H)
    scale = 1.0 if layer.num_layers in (None, 1) else 1 - layer.layer_idx / (layer.num_layers - 1) + 1e-5
    lam = torch.exp(-slopes * scale)[:, None, None]
    S = torch.zeros(x.shape[0], H, Dh, Dh, dtype=torch.float64)
    outs = []
    for t in range(x.shape[1]):
        qt, kt, vt = (a[:, t].view(-1, H, Dh) for a in (q, k, v))
        S = lam * S + kt[..., :, None] * vt[..., None, :]
        outs.append((qt[..., :, None] * S).sum(-2).flatten(-2))
    o = torch.stack(outs, dim=1)
    o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + layer.eps)
    return _linear(o * u, layer.out_proj)


@pytest.mark.parametrize("layer_idx", [0, 2])
def test_lightning_matches_its_reference(layer_idx):
    torch.manual_seed(0)
    layer = LightningAttention(16, num_heads=4, num_layers=3, layer_idx=layer_idx, chunk_size=4)
    x = torch.randn(B, T, 16)
    _close(layer(x), lightning_reference(layer, x.double()))


# Feature maps -----------------------------------------------------------------------------------------


def kernel_reference(kind: str, q, k, i, j, d, M, W=None):
    """phi(q_i) . phi(k_j) for each map of the BASED paper's ablation, from its definition."""
    if kind == "taylor":
        s = (q * k).sum(-1) / math.sqrt(d)
        return 1 + s + s * s / 2
    if kind == "performer":  # FAVOR+ (Choromanski et al., 2021): E[phi(q).phi(k)] = exp(q.k / sqrt(d))
        qs, ks = q / d**0.25, k / d**0.25
        fq = torch.exp(qs @ W.T - qs.square().sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[0])
        fk = torch.exp(ks @ W.T - ks.square().sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[0])
        return (fq * fk).sum(-1)
    if kind == "cosformer":  # Qin et al., 2022: relu(q).relu(k) cos(pi (i - j) / 2M)
        return (F.relu(q) * F.relu(k)).sum(-1) * math.cos(math.pi * (i - j) / (2 * M))
    if kind == "pos_elu":
        return ((F.elu(q) + 1) * (F.elu(k) + 1)).sum(-1)
    if kind == "relu":
        return (F.relu(q) * F.relu(k)).sum(-1)
    return (q * k).sum(-1)


def feature_map_reference(layer: FeatureMapLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """y_i = sum_{j<=i} K(q_i, k_j) v_j / (sum_{j<=i} K(q_i, k_j) + eps); identity: no denominator."""
    H, d, Dv = layer.num_heads, layer.feature_dim, layer.head_dim
    q = _linear(x, layer.proj_q).unflatten(-1, (H, d))
    k = _linear(x, layer.proj_k).unflatten(-1, (H, d))
    v = _linear(x, layer.proj_v).unflatten(-1, (H, Dv))
    out = torch.zeros(x.shape[0], x.shape[1], H, Dv, dtype=torch.float64)
    for h in range(H):
        W = _p(layer.random_features[h]) if layer.kind == "performer" else None
        for i in range(x.shape[1]):
            a = torch.stack([kernel_reference(layer.kind, q[:, i, h], k[:, j, h], i, j, d, layer.max_seq_len, W)
                             for j in range(i + 1)], dim=-1)  # [B, i + 1]
            num = (a[..., None] * v[:, : i + 1, h]).sum(1)
            out[:, i, h] = num / (a.sum(-1, keepdim=True) + layer.eps) if layer.normalize else num
    return _linear(out.flatten(-2), layer.out_proj)


@pytest.mark.parametrize("kind", ["taylor", "performer", "cosformer", "pos_elu", "relu", "identity"])
def test_feature_map_matches_its_kernel(kind):
    torch.manual_seed(0)
    layer = FeatureMapLinearAttention(16, kind, feature_dim=4, num_heads=2, max_seq_len=16)
    x = torch.randn(B, T, 16)
    _close(layer(x), feature_map_reference(layer, x.double()), tol=1e-4)

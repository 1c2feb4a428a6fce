"""Mamba-2 (Dao & Gu, 2024, "Transformers are SSMs"): a gated block around SSD, the selective SSM whose
A is a scalar per head, computed in chunks by matmuls.

    [z, x, B, C, dt] = in_proj(u);   [x, B, C] = silu(conv1d([x, B, C]));   dt = softplus(dt + dt_bias)
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,   y_t = C_t^T h_t + D x_t        (per head, A = -exp(A_log))
    out = out_proj(norm(y * silu(z)))

SSD is decayed linear attention (based.ops.decay) with q = C, k = B, v = dt x and log-decay dt A; the
state h [N, P] per head (N = d_state, P = headdim). Parameter names and initialisation follow mamba_ssm's
Mamba2 (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj; A in [1, 16], dt log-uniform in
[dt_min, dt_max]); the norm is its gated RMSNorm with the gate applied before normalising. Pure
PyTorch; on CUDA, mamba_ssm's fused chunk scan is used when it is installed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import conv_state_zeros, short_conv, short_conv_step
from ..ops.decay import decay_linear_attn, decay_linear_attn_step
from ..ops.norm import gated_rms_norm
from .norm import RMSNorm
from .state import Offset, State, carried_state, state_nbytes

try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _mamba_chunk_scan
except ImportError:  # mamba-ssm is optional: based.ops.decay is the reference
    _mamba_chunk_scan = None


class GatedRMSNorm(RMSNorm):
    """y = rmsnorm(x * silu(z)) * weight, normalised over groups of `group_size` channels (mamba_ssm's
    RMSNormGated with norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__(dim, eps)
        if group_size <= 0 or dim % group_size:
            raise ValueError(f"group_size must divide dim={dim}, got {group_size}")
        self.group_size = group_size

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # fp32 math, the result in z's dtype; on CUDA with one group (ngroups 1) one fused Triton kernel each way
        # (based.ops.norm, also under vmap over stacked runs with per-run weights)
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size)


class Mamba2(nn.Module):
    """Mamba-2 mixer (SSD).

    Args:
        d_model: model width.
        d_state: N, SSM state per head and channel (128 in Mamba-2).
        d_conv: taps of the causal depthwise conv over x, B, C.
        expand: d_inner = expand * d_model channels.
        headdim: P, channels per head; nheads = d_inner / headdim.
        ngroups: groups of heads sharing B and C (1 in Mamba-2's language models).
        dt_min, dt_max, dt_init_floor: range (log-uniform) and floor of the initial step sizes.
        A_init_range: A_h = -uniform(A_init_range) at init.
        chunk_size: SSD chunk length.
        eps: the gated RMSNorm's epsilon.
        layer_idx: position in the model (bookkeeping only).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        chunk_size: int = 64,
        eps: float = 1e-5,
        layer_idx: int | None = None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                            ("headdim", headdim), ("ngroups", ngroups), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"d_inner = expand * d_model = {d_inner} is not divisible by headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"nheads = d_inner / headdim = {nheads} is not divisible by ngroups={ngroups}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must be (lo, hi) with 0 < lo <= hi, got {A_init_range}")
        self.d_model, self.d_state, self.d_conv, self.layer_idx = d_model, d_state, d_conv, layer_idx
        self.d_inner, self.headdim, self.nheads, self.ngroups, self.chunk_size = (
            d_inner, headdim, nheads, ngroups, chunk_size)
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus: softplus(bias) = dt
        self.A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(nheads))
        for p in (self.A_log, self.D, self.dt_bias):
            p._no_weight_decay = True  # decaying A_log would push the SSM towards no memory
        self.norm = GatedRMSNorm(d_inner, d_inner // ngroups, eps=eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def state_size(self, seq_len: int) -> int:
        """The field's measure, the SSM state nheads * headdim * d_state (= d_inner * d_state); the conv
        buffer (conv_dim * d_conv) is left out, as for Mamba."""
        return self.nheads * self.headdim * self.d_state

    def allocate_inference_cache(
        self, batch_size: int, dtype=None, device=None, max_seq_len: int | None = None
    ) -> State:
        """(conv_state [B, conv_dim, d_conv] in dtype, ssm_state [B, nheads, d_state, headdim] in fp32)."""
        w = self.in_proj.weight
        device = device or w.device
        return (
            conv_state_zeros(batch_size, self.conv_dim, self.d_conv, dtype or w.dtype, device),
            torch.zeros(batch_size, self.nheads, self.d_state, self.headdim, dtype=torch.float32, device=device),
        )

    def inference_state_bytes(self, seq_len: int, batch_size: int = 1, dtype=None) -> int:
        return state_nbytes(self.allocate_inference_cache(batch_size, dtype, "meta", max_seq_len=seq_len))

    def _split(self, zxbcdt: torch.Tensor):
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _ssm_inputs(self, xBC: torch.Tensor, dt: torch.Tensor):
        """xBC [..., conv_dim] (after conv and silu), dt [..., nheads] -> x [..., H, P], B, C [..., H, N]
        (each group's B, C repeated for its heads), dt [..., H] fp32, log-decay dt A [..., H] fp32."""
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        heads_per_group = self.nheads // self.ngroups
        B, C = (t.unflatten(-1, (self.ngroups, 1, self.d_state)).expand(*t.shape[:-1], -1, heads_per_group, -1)
                .flatten(-3, -2) for t in (B, C))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return x, B, C, dt, dt * -torch.exp(self.A_log.float())

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. With `state` (prefill), continues from it (empty at
        seqlen_offset 0) and leaves the state after the last token in it."""
        Bsz, T, _ = x.shape
        z, xBC, dt = self._split(self.in_proj(x))
        carried = None if state is None else carried_state(state, seqlen_offset)
        xBC, conv_final = short_conv(
            xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias,
            initial_state=None if carried is None else carried[0], output_final_state=state is not None,
            activation="silu",
        )
        xs, B, C, dt, log_decay = self._ssm_inputs(xBC, dt)
        initial = None if carried is None else carried[1]
        if self._use_mamba_ssm(x):
            y, ssm_final = self._mamba_ssm_scan(xs, dt, B, C, initial, state is not None)
        else:
            y, ssm_final = decay_linear_attn(
                C, B, xs * dt.unsqueeze(-1), log_decay, chunk_size=self.chunk_size,
                initial_state=initial, output_final_state=state is not None,
            )
            y = y + xs * self.D.unsqueeze(-1)
        if state is not None:
            state[0].copy_(conv_final)
            state[1].copy_(ssm_final)
        return self.out_proj(self.norm(y.reshape(Bsz, T, self.d_inner).to(z.dtype), z))

    @staticmethod
    def _use_mamba_ssm(x: torch.Tensor) -> bool:
        return x.is_cuda and _mamba_chunk_scan is not None

    def _mamba_ssm_scan(self, xs, dt, B, C, initial, output_final_state):
        """mamba_ssm's fused SSD, D skip included (its state layout is [B, H, P, N]; ours is [B, H, N, P])."""
        heads_per_group = self.nheads // self.ngroups
        B, C = (t[:, :, ::heads_per_group].contiguous() for t in (B, C))  # [B, T, ngroups, N]
        out = _mamba_chunk_scan(
            xs, dt, -torch.exp(self.A_log.float()), B, C,
            chunk_size=self.chunk_size, D=self.D,
            initial_states=None if initial is None else initial.transpose(-1, -2).contiguous(),
            return_final_states=output_final_state,
        )
        y, final = out if output_final_state else (out, None)
        return y, (None if final is None else final.float().transpose(-1, -2))

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset = 0) -> torch.Tensor:
        """Decode one token per sequence; updates `state` in place. x: [B, d_model] or [B, 1, d_model]."""
        Bsz = x.shape[0]
        z, xBC, dt = self._split(self.in_proj(x.reshape(Bsz, self.d_model)))
        xBC = short_conv_step(xBC, state[0], self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        xs, B, C, dt, log_decay = self._ssm_inputs(xBC.to(z.dtype), dt)
        y = decay_linear_attn_step(C, B, xs * dt.unsqueeze(-1), log_decay, state[1])
        y = y + xs * self.D.unsqueeze(-1)
        return self.out_proj(self.norm(y.reshape(Bsz, self.d_inner).to(z.dtype), z)).view_as(x)

"""H3, Hungry Hungry Hippos (Fu et al., 2023): two SSMs and two multiplicative gates.

    q, k, v = q_proj(x), k_proj(x), v_proj(x)
    y = out_proj(q * SSM_diag(SSM_shift(k) * v))

SSM_shift (A a shift matrix) is a causal depthwise conv whose N taps are the learned C, so it remembers the
last N keys; SSM_diag is a diagonal S4D-Lin SSM (A_n = -1/2 + i pi n, N/2 complex modes = N real values per
channel) run as an FFT long convolution in training and as a recurrence in decoding. Heads of size 1, the
setting whose state the paper counts as d_model * N.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import conv_state_zeros, short_conv, short_conv_step
from ..ops.long_conv import long_conv
from .state import Offset, State, carried_state, state_nbytes


class H3(nn.Module):
    """H3 mixer.

    Args:
        d_model: model width.
        d_state: N, the state per channel of each SSM (even: N/2 complex modes in the diagonal one).
        dt_min, dt_max: range of the initial step sizes of the diagonal SSM (log-uniform).
        layer_idx: position in the model (bookkeeping only).
    """

    def __init__(
        self, d_model: int, d_state: int = 64, dt_min: float = 0.001, dt_max: float = 0.1, layer_idx: int | None = None
    ):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model must be positive, got {d_model}")
        if d_state <= 0 or d_state % 2:
            raise ValueError(f"d_state must be a positive even number (N/2 complex modes), got {d_state}")
        self.d_model, self.d_state, self.layer_idx = d_model, d_state, layer_idx
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d_model, d_model) for _ in range(3))
        self.out_proj = nn.Linear(d_model, d_model)
        self.shift_kernel = nn.Parameter(torch.empty(d_model, d_state).uniform_(-1, 1) / math.sqrt(d_state))
        modes = d_state // 2
        self.log_dt = nn.Parameter(torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.A_log_real = nn.Parameter(torch.full((d_model, modes), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(d_model, 1))
        self.C = nn.Parameter(torch.randn(d_model, modes, 2) * math.sqrt(0.5))  # complex, as (real, imag)
        self.D = nn.Parameter(torch.randn(d_model))
        for p in (self.log_dt, self.A_log_real, self.A_imag, self.C, self.D):
            p._no_weight_decay = True  # the SSM's dynamics, not weights to shrink (as in S4 / H3)

    def state_size(self, seq_len: int) -> int:
        """The field's measure, the diagonal SSM's state d_model * N; the shift SSM's buffer of the last N
        keys (another d_model * N, like Mamba's conv buffer) is left out."""
        return self.d_model * self.d_state

    def allocate_inference_cache(
        self, batch_size: int, dtype=None, device=None, max_seq_len: int | None = None
    ) -> State:
        """(shift_state [B, d_model, N] in dtype, ssm_state [B, d_model, N/2, 2] fp32: complex as (re, im))."""
        w = self.q_proj.weight
        device = device or w.device
        return (
            conv_state_zeros(batch_size, self.d_model, self.d_state, dtype or w.dtype, device),
            torch.zeros(batch_size, self.d_model, self.d_state // 2, 2, dtype=torch.float32, device=device),
        )

    def inference_state_bytes(self, seq_len: int, batch_size: int = 1, dtype=None) -> int:
        return state_nbytes(self.allocate_inference_cache(batch_size, dtype, "meta", max_seq_len=seq_len))

    def _ssm(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dt*A, dB and C of the diagonal SSM, each [d_model, N/2] complex; zero-order hold with B = 1:
        dA = exp(dt A), dB = (dA - 1) / A."""
        A = torch.complex(-torch.exp(self.A_log_real.float()), self.A_imag.float())
        dtA = torch.exp(self.log_dt.float()).unsqueeze(-1) * A
        return dtA, (torch.exp(dtA) - 1) / A, torch.view_as_complex(self.C.float().contiguous())

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. With `state` (prefill), continues from it (empty at
        seqlen_offset 0) and leaves the state after the last token in it."""
        T = x.shape[1]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        carried = None if state is None else carried_state(state, seqlen_offset)
        k, shift_final = short_conv(
            k, self.shift_kernel, initial_state=None if carried is None else carried[0],
            output_final_state=state is not None,
        )
        u = (k * v).float()
        dtA, dB, C = self._ssm()
        powers = torch.exp(dtA.unsqueeze(-1) * torch.arange(T + 1, device=x.device))  # dA^0 .. dA^T
        kernel = 2 * torch.einsum("dn,dnt->dt", C * dB, powers[..., :T]).real  # y_t = sum_s kernel[t-s] u_s
        y = long_conv(u, kernel) + u * self.D.float()
        if carried is not None:
            h0 = torch.view_as_complex(carried[1].contiguous())  # reaches token t through dA^(t + 1)
            y = y + 2 * torch.einsum("dn,bdn,dnt->btd", C, h0, powers[..., 1:]).real
        if state is not None:
            # h_T = dA^T h0 + sum_s dA^(T - 1 - s) dB u_s
            h = torch.einsum("dnt,btd->bdn", dB.unsqueeze(-1) * powers[..., :T].flip(-1), u.to(C.dtype))
            if carried is not None:
                h = h + powers[..., T] * h0
            state[0].copy_(shift_final)
            state[1].copy_(torch.view_as_real(h))
        return self.out_proj((q.float() * y).to(x.dtype))

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset = 0) -> torch.Tensor:
        """Decode one token per sequence; updates `state` in place. x: [B, d_model] or [B, 1, d_model]."""
        x2 = x.reshape(x.shape[0], self.d_model)
        q, k, v = self.q_proj(x2), self.k_proj(x2), self.v_proj(x2)
        u = (short_conv_step(k, state[0], self.shift_kernel).to(v.dtype) * v).float()
        dtA, dB, C = self._ssm()
        h = torch.view_as_complex(state[1])  # a view: updated in place
        h.copy_(torch.exp(dtA) * h + dB * u.unsqueeze(-1))
        y = 2 * (C * h).sum(-1).real + u * self.D.float()
        return self.out_proj((q.float() * y).to(x.dtype)).view_as(x)

"""H3, Hungry Hungry Hippos (Fu et al., 2023): two SSMs and two multiplicative gates.

    q, k, v = q_proj(x), k_proj(x), v_proj(x)
    k = SSM_shift(k) + D_shift * k
    per head h (P = head_dim channels):  S_t[i, j] = SSM_diag(k[i] v[j])_t + D_h k_t[i] v_t[j]
    y_t[h, j] = sum_i q_t[h, i] S_t[i, j];   out = out_proj(y)

SSM_shift (A a shift matrix, B = e_1) is a causal depthwise conv whose N taps are the learned C, so it
remembers the last N keys; SSM_diag is a diagonal S4D-Lin SSM (A_n = -1/2 + i pi n, N/2 complex modes =
N real values per state entry), one per head, run as an FFT long convolution in training and as a
recurrence in decoding. With head_dim P each head keeps a P x P matrix per mode (the H3 paper's
multi-head form, a linear attention with a learned decay); P = 1 is the elementwise q * SSM(k * v).
Discretisation as the reference code's default (S4D's SSKernelDiag): bilinear, or zero-order hold.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import conv_state_zeros, short_conv, short_conv_step
from ..ops.long_conv import long_conv
from .state import Offset, State, carried_state, state_nbytes

DISCRETISATIONS = ("bilinear", "zoh")


class H3(nn.Module):
    """H3 mixer.

    Args:
        d_model: model width.
        d_state: N, the state per state entry of each SSM (even: N/2 complex modes in the diagonal one).
        head_dim: P, channels per head (d_model / P heads, each with a P x P state per mode); 1 is the
            elementwise form, 2 the setting of the BASED paper's figure 2.
        dt_min, dt_max: range of the initial step sizes of the diagonal SSM (log-uniform, one per head).
        disc: "bilinear" (the reference code's default) or "zoh" (zero-order hold).
        layer_idx: position in the model (bookkeeping only).
    """

    def __init__(
        self, d_model: int, d_state: int = 64, head_dim: int = 1, dt_min: float = 0.001, dt_max: float = 0.1,
        disc: str = "bilinear", layer_idx: int | None = None,
    ):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model must be positive, got {d_model}")
        if d_state <= 0 or d_state % 2:
            raise ValueError(f"d_state must be a positive even number (N/2 complex modes), got {d_state}")
        if head_dim <= 0 or d_model % head_dim:
            raise ValueError(f"head_dim must be a positive divisor of d_model={d_model}, got {head_dim}")
        if disc not in DISCRETISATIONS:
            raise ValueError(f"disc must be one of {DISCRETISATIONS}, got {disc!r}")
        self.d_model, self.d_state, self.head_dim, self.disc = d_model, d_state, head_dim, disc
        self.layer_idx = layer_idx
        self.num_heads = d_model // head_dim
        H, modes = self.num_heads, d_state // 2
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d_model, d_model) for _ in range(3))
        self.out_proj = nn.Linear(d_model, d_model)
        # Shift SSM: its N taps (newest last, as based.ops.short_conv) start as torch's Conv1d init.
        self.shift_kernel = nn.Parameter(torch.empty(d_model, d_state).uniform_(-1, 1) / math.sqrt(d_state))
        self.shift_D = nn.Parameter(torch.randn(d_model))
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.A_log_real = nn.Parameter(torch.full((H, modes), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(H, 1))
        # B = 1 and C ~ CN(0, 1) as S4D; kept apart (the kernel uses C * B) as in the reference.
        self.B = nn.Parameter(torch.stack([torch.ones(H, modes), torch.zeros(H, modes)], dim=-1))
        self.C = nn.Parameter(torch.randn(H, modes, 2) * math.sqrt(0.5))  # complex, as (real, imag)
        self.D = nn.Parameter(torch.randn(H))
        for p in (self.log_dt, self.A_log_real, self.A_imag, self.B, self.C, self.D, self.shift_D):
            p._no_weight_decay = True  # the SSM's dynamics, not weights to shrink (as in S4 / H3)

    @property
    def _channels(self) -> int:
        """State entries of the diagonal SSM per mode: H heads x P x P."""
        return self.num_heads * self.head_dim**2

    def state_size(self, seq_len: int) -> int:
        """The diagonal SSM's state, H * P^2 * N = d_model * head_dim * N values (d_model * N at head_dim 1,
        the field's count); the shift SSM's buffer of the last N keys (another d_model * N, like Mamba's
        conv buffer) is left out."""
        return self._channels * self.d_state

    def allocate_inference_cache(
        self, batch_size: int, dtype=None, device=None, max_seq_len: int | None = None
    ) -> State:
        """(shift_state [B, d_model, N] in dtype, ssm_state [B, H P P, N/2, 2] fp32: complex as (re, im))."""
        w = self.q_proj.weight
        device = device or w.device
        return (
            conv_state_zeros(batch_size, self.d_model, self.d_state, dtype or w.dtype, device),
            torch.zeros(batch_size, self._channels, self.d_state // 2, 2, dtype=torch.float32, device=device),
        )

    def inference_state_bytes(self, seq_len: int, batch_size: int = 1, dtype=None) -> int:
        return state_nbytes(self.allocate_inference_cache(batch_size, dtype, "meta", max_seq_len=seq_len))

    def _ssm(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log dA, dB and C of the diagonal SSM, each [H P P, N/2] complex (a head's values repeated over
        its P x P entries):
            bilinear: dA = (1 + dt A / 2) / (1 - dt A / 2), dB = dt B / (1 - dt A / 2)
            zoh:      dA = exp(dt A),                       dB = B (dA - 1) / A"""
        A = torch.complex(-torch.exp(self.A_log_real.float()), self.A_imag.float())
        dt = torch.exp(self.log_dt.float()).unsqueeze(-1)
        B = torch.view_as_complex(self.B.float().contiguous())
        if self.disc == "bilinear":
            log_dA = torch.log((1 + dt * A / 2) / (1 - dt * A / 2))
            dB = B * dt / (1 - dt * A / 2)
        else:
            log_dA = dt * A
            dB = B * (torch.exp(log_dA) - 1) / A
        C = torch.view_as_complex(self.C.float().contiguous())
        return tuple(t.repeat_interleave(self.head_dim**2, dim=0) for t in (log_dA, dB, C))

    def _outer(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """k, v [..., d_model] -> k[i] v[j] per head, [..., H P P] fp32."""
        P = self.head_dim
        k, v = k.float().unflatten(-1, (self.num_heads, P, 1)), v.float().unflatten(-1, (self.num_heads, 1, P))
        return (k * v).flatten(-3)

    def _contract_q(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """q [..., d_model], s [..., H P P] -> sum_i q[h, i] s[h, i, j], [..., d_model] (head-major)."""
        P = self.head_dim
        s = s.unflatten(-1, (self.num_heads, P, P))
        return (q.float().unflatten(-1, (self.num_heads, P, 1)) * s).sum(-2).flatten(-2)

    def _D(self) -> torch.Tensor:
        return self.D.float().repeat_interleave(self.head_dim**2)

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. With `state` (prefill), continues from it (empty at
        seqlen_offset 0) and leaves the state after the last token in it."""
        T = x.shape[1]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        carried = None if state is None else carried_state(state, seqlen_offset)
        k_shift, shift_final = short_conv(
            k, self.shift_kernel, initial_state=None if carried is None else carried[0],
            output_final_state=state is not None,
        )
        u = self._outer(k_shift.float() + k.float() * self.shift_D.float(), v)  # [B, T, H P P]
        log_dA, dB, C = self._ssm()
        powers = torch.exp(log_dA.unsqueeze(-1) * torch.arange(T + 1, device=x.device))  # dA^0 .. dA^T
        kernel = 2 * torch.einsum("cn,cnt->ct", C * dB, powers[..., :T]).real  # y_t = sum_s kernel[t-s] u_s
        y = long_conv(u, kernel) + u * self._D()
        if carried is not None:
            h0 = torch.view_as_complex(carried[1].contiguous())  # reaches token t through dA^(t + 1)
            y = y + 2 * torch.einsum("cn,bcn,cnt->btc", C, h0, powers[..., 1:]).real
        if state is not None:
            # h_T = dA^T h0 + sum_s dA^(T - 1 - s) dB u_s
            h = torch.einsum("cnt,btc->bcn", dB.unsqueeze(-1) * powers[..., :T].flip(-1), u.to(C.dtype))
            if carried is not None:
                h = h + powers[..., T] * h0
            state[0].copy_(shift_final)
            state[1].copy_(torch.view_as_real(h))
        return self.out_proj(self._contract_q(q, y).to(x.dtype))

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset = 0) -> torch.Tensor:
        """Decode one token per sequence; updates `state` in place. x: [B, d_model] or [B, 1, d_model]."""
        x2 = x.reshape(x.shape[0], self.d_model)
        q, k, v = self.q_proj(x2), self.k_proj(x2), self.v_proj(x2)
        k_shift = short_conv_step(k, state[0], self.shift_kernel)
        u = self._outer(k_shift.float() + k.float() * self.shift_D.float(), v)
        log_dA, dB, C = self._ssm()
        h = torch.view_as_complex(state[1])  # a view: updated in place
        h.copy_(torch.exp(log_dA) * h + dB * u.unsqueeze(-1))
        y = 2 * (C * h).sum(-1).real + u * self._D()
        return self.out_proj(self._contract_q(q, y).to(x.dtype)).view_as(x)

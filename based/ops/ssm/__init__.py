"""Selective scan (Mamba, Gu & Dao, 2023, algorithm 2): a diagonal SSM whose step size and B, C depend on
the input, discretised by zero-order hold on A and Euler on B:

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,    y_t = C_t . h_t + D u_t

Layout [B, T, D] for u and delta, [B, T, N] for B and C, A [D, N]; state h [B, D, N] in fp32. The PyTorch
form is a sequential loop over T (work-efficient, fine for MQAR lengths on CPU); on CUDA, mamba-ssm's fused
kernel is used when it is installed and no initial state is given.
"""
from __future__ import annotations

import torch

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan
except ImportError:  # mamba-ssm is optional: the PyTorch scan below is the reference
    _mamba_selective_scan = None

SCAN_CHUNK = 64  # steps discretised together in the PyTorch scan


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Args:
        u, delta: [B, T, D] (delta already positive, e.g. softplus'd).
        A: [D, N] (negative real parts for a decaying state).
        B, C: [B, T, N].
        D: [D] skip connection or None.
        initial_state: h [B, D, N] before the first token.
    Returns:
        y [B, T, D] in u's dtype, and h [B, D, N] (fp32) after the last token if asked.
    """
    if initial_state is None and u.is_cuda and _mamba_selective_scan is not None:
        out = _mamba_selective_scan(
            u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
            return_last_state=output_final_state,
        )
        y, h = out if output_final_state else (out, None)
        return y.transpose(1, 2), (h.float() if h is not None else None)
    Bsz, T, Dm = u.shape
    h = u.new_zeros(Bsz, Dm, A.shape[1], dtype=torch.float32) if initial_state is None else initial_state.float()
    uf, df, Bf, Cf, Af = u.float(), delta.float(), B.float(), C.float(), A.float()
    ys = []
    # Discretised a chunk of steps at a time, outside the loop: [B, T, D, N] for all T would not fit at long T,
    # and per step it would put 4 more small ops in the loop, which dominates on CPU.
    for start in range(0, T, SCAN_CHUNK):
        dt = df[:, start : start + SCAN_CHUNK].unsqueeze(-1)  # [B, t, D, 1]
        dA = torch.exp(dt * Af)  # [B, t, D, N]
        du = (df * uf)[:, start : start + SCAN_CHUNK].unsqueeze(-1)  # [B, t, D, 1]: one broadcast, not two
        dBu = du * Bf[:, start : start + SCAN_CHUNK].unsqueeze(2)  # [B, t, D, N]
        hs = []
        # unbind, not dA[:, t]: the backward of T selects would write T full-size zero gradients.
        for a, bu in zip(dA.unbind(1), dBu.unbind(1)):
            h = torch.addcmul(bu, a, h)
            hs.append(h)
        ys.append(torch.einsum("btdn,btn->btd", torch.stack(hs, dim=1), Cf[:, start : start + SCAN_CHUNK]))
    y = torch.cat(ys, dim=1)
    if D is not None:
        y = y + uf * D.float()
    return y.to(u.dtype), (h if output_final_state else None)


def selective_scan_step(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, state: torch.Tensor,
) -> torch.Tensor:
    """One token: u, delta [B, D], B, C [B, N]; updates state [B, D, N] in place, returns y [B, D]."""
    dt = delta.float().unsqueeze(-1)
    state.copy_(torch.exp(dt * A.float()) * state + dt * B.float().unsqueeze(1) * u.float().unsqueeze(-1))
    y = (state * C.float().unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + u.float() * D.float()
    return y.to(u.dtype)


__all__ = ["selective_scan", "selective_scan_step"]

"""Hyena (Poli et al., 2023), order 2: a long convolution with an implicit filter between two gates.

    [x0, x1, v] = short_conv(in_proj(x))          (depthwise, kernel 3)
    y = out_proj(x0 * (h * (x1 * v) + bias * (x1 * v)))

The filter h[c, t] = MLP(z_t)[c] * exp(-alpha_c t / (L - 1)) is a function of the position t (z_t: t/L and
sin/cos bands; sine activations), so it is defined at any length and costs O(T log T) by FFT. Decoding
needs every past input of the long conv: the state is d_model * L, the field's count for long convs. A step
writes the new input x1 * v at its position and takes the dot product of the filter with that history,
O(d_model * L) per token.

The step's weights over the history are a window of one fixed vector per channel,

    y_p = sum_s hpad[L - 1 - p + s] v_s,    hpad = [h[L-1], ..., h[0], 0 (L - 1 times)],

which gives h[p - s] at s <= p and 0 at s > p. hpad is cached between steps when no gradient is taken
(`_decode_filter`), so a step costs one gather of the window and one dot product, not the filter's MLP.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import conv_state_zeros, short_conv, short_conv_step
from ..ops.long_conv import long_conv
from .state import Offset, State, carried_state, check_fits, state_nbytes, token_positions


class Sin(nn.Module):
    """sin(freq * x) with a learned frequency per feature (Hyena's filter activation)."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """Implicit filters [d_model, T] from positions (Hyena's FFN filter with exponential modulation).

    Args:
        d_model: channels.
        filter_order: width of the filter MLP.
        emb_dim: positional features (odd: t/L plus (emb_dim - 1)/2 sin/cos bands).
        max_seq_len: L, the length positions are normalised by (longer sequences still work).
        fast_decay_pct, slow_decay_pct, target: the modulation decays to `target` after that fraction of
            L, from the fastest to the slowest channel.
    """

    def __init__(
        self, d_model: int, filter_order: int = 64, emb_dim: int = 3, max_seq_len: int = 2048,
        fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2,
    ):
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"emb_dim must be odd and >= 3, got {emb_dim}")
        self.d_model, self.emb_dim, self.max_seq_len = d_model, emb_dim, max_seq_len
        # Constants, recomputed in forward rather than kept as buffers: a Hugging Face load materialises
        # non-persistent buffers uninitialised.
        self.decay_range = (math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct)
        self.mlp = nn.Sequential(
            nn.Linear(emb_dim, filter_order), Sin(filter_order),
            nn.Linear(filter_order, filter_order), Sin(filter_order),
            nn.Linear(filter_order, d_model, bias=False),
        )

    def forward(self, seq_len: int) -> torch.Tensor:
        device = self.mlp[0].weight.device
        bands = (self.emb_dim - 1) // 2
        i = torch.arange(seq_len, device=device, dtype=torch.float32).unsqueeze(-1)  # [T, 1]
        # As the reference: t runs from 0 to 1 over the L positions (linspace), the bands' angle is 2 pi i / L.
        t = i / max(self.max_seq_len - 1, 1)
        angles = 2 * math.pi * i / self.max_seq_len * torch.linspace(1e-4, bands - 1, bands, device=device)
        z = torch.cat([t, angles.cos(), -angles.sin()], dim=-1)  # [T, emb_dim]
        decay = torch.exp(-t * torch.linspace(*self.decay_range, self.d_model, device=device).abs())
        return (self.mlp(z.to(self.mlp[0].weight.dtype)).float() * decay).transpose(0, 1)  # [d_model, T]


class Hyena(nn.Module):
    """Hyena operator of order 2.

    Args:
        d_model: model width.
        max_seq_len: L of the filter's position normalisation (and of state_size's count).
        filter_order: width of the implicit filter's MLP.
        short_kernel_size: taps of the short conv on the projections.
        layer_idx: position in the model (bookkeeping only).
    """

    # The decode state holds every past input (up to the allocated length) and a step reads all of it but
    # writes one column: a cache, like attention's, that bounds the context.
    state_is_cache = True
    state_grows_with_context = True

    def __init__(
        self, d_model: int, max_seq_len: int = 2048, filter_order: int = 64, short_kernel_size: int = 3,
        layer_idx: int | None = None,
    ):
        super().__init__()
        if d_model <= 0 or max_seq_len <= 0:
            raise ValueError(f"d_model and max_seq_len must be positive, got {d_model}, {max_seq_len}")
        self.d_model, self.max_seq_len, self.short_kernel_size, self.layer_idx = (
            d_model, max_seq_len, short_kernel_size, layer_idx
        )
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.short_filter = nn.Conv1d(3 * d_model, 3 * d_model, short_kernel_size, groups=3 * d_model)
        self.filter = HyenaFilter(d_model, filter_order, max_seq_len=max_seq_len)
        self.filter_bias = nn.Parameter(torch.randn(d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self._decode_cache: tuple[tuple, torch.Tensor] | None = None  # (key, hpad): see _decode_filter
        self._captured: list[torch.Tensor] = []  # cached hpads read by captured CUDA graphs

    def state_size(self, seq_len: int) -> int:
        """The field's measure for a long conv: every past input, d_model * L."""
        return self.d_model * seq_len

    def allocate_inference_cache(
        self, batch_size: int, dtype=None, device=None, max_seq_len: int | None = None
    ) -> State:
        """(conv_state [B, 3 d_model, short_kernel_size] in dtype, history [B, d_model, max_seq_len] fp32):
        the short conv's last inputs and every long-conv input x1 * v so far, by position. max_seq_len
        (default the filter's max_seq_len) bounds the positions a sequence can reach, as a KV cache does."""
        w = self.in_proj.weight
        device = device or w.device
        L = max_seq_len or self.max_seq_len
        return (
            conv_state_zeros(batch_size, 3 * self.d_model, self.short_kernel_size, dtype or w.dtype, device),
            torch.zeros(batch_size, self.d_model, L, dtype=torch.float32, device=device),
        )

    def inference_state_bytes(self, seq_len: int, batch_size: int = 1, dtype=None) -> int:
        return state_nbytes(self.allocate_inference_cache(batch_size, dtype, "meta", max_seq_len=seq_len))

    def _check_fits(self, state: State, seqlen_offset: Offset, T: int) -> None:
        check_fits(state[1].shape[-1], seqlen_offset, T, "Hyena's history")

    def _flipped_filter(self, L: int) -> torch.Tensor:
        h = self.filter(L)  # [d_model, L]
        return torch.cat([h.flip(-1), h.new_zeros(self.d_model, L - 1)], dim=-1)  # [d_model, 2L - 1]

    def _decode_filter(self, L: int) -> torch.Tensor:
        """hpad [d_model, 2L - 1] fp32 (module docstring), cached while no gradient flows to the filter.

        The cache is keyed on L and on each filter parameter's identity, storage and version counter, so an
        in-place update (optimizer step, load_state_dict, .to()) invalidates it. Not cached while compiling
        (the compiled step computes it) nor while capturing a CUDA graph (kernels do not run then). A graph
        captured on a cache hit reads that tensor (kept alive for it in `_captured`), so the filter as it was
        at capture: recapture after changing the filter's parameters.
        """
        params = list(self.filter.parameters())
        if (
            torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and any(p.requires_grad for p in params))
            or any(p.is_inference() for p in params)  # inference tensors keep no version counter
        ):
            return self._flipped_filter(L)
        key = (L, tuple((id(p), p.data_ptr(), p._version) for p in params))
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if self._decode_cache is not None and self._decode_cache[0] == key:
            hpad = self._decode_cache[1]
            if capturing and not any(t is hpad for t in self._captured):
                self._captured.append(hpad)
            return hpad
        hpad = self._flipped_filter(L)
        if not capturing:
            self._decode_cache = (key, hpad)
        return hpad

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. With `state` (prefill), continues from it (empty at
        seqlen_offset 0) and leaves the short-conv state and the inputs of these T positions in it."""
        B, T, _ = x.shape
        carried = None if state is None else carried_state(state[:1], seqlen_offset)
        u, conv_final = short_conv(
            self.in_proj(x), self.short_filter.weight.squeeze(1), self.short_filter.bias,
            initial_state=None if carried is None else carried[0], output_final_state=state is not None,
        )
        x0, x1, v = u.split(self.d_model, dim=-1)
        v = (x1 * v).float()
        if state is None:
            y = long_conv(v, self.filter(T))
        else:
            self._check_fits(state, seqlen_offset, T)
            # The long conv over the whole history; later positions (zeros or a previous occupant's) never
            # reach an earlier output, the conv being causal.
            pos = token_positions(seqlen_offset, B, T, x.device)  # [B, T]
            history = state[1]  # [B, d_model, L], emptied in place where a sequence starts (as carried_state)
            if isinstance(seqlen_offset, torch.Tensor):
                history.mul_((seqlen_offset.reshape(-1, 1, 1) != 0).to(history.dtype))
            elif seqlen_offset == 0:
                history.zero_()
            history.scatter_(2, pos.unsqueeze(1).expand(B, self.d_model, T), v.transpose(1, 2))
            L = history.shape[-1]
            y_all = long_conv(history.transpose(1, 2), self.filter(L))  # [B, L, d_model]
            y = y_all.gather(1, pos.unsqueeze(-1).expand(B, T, self.d_model))
            state[0].copy_(conv_final)
        y = y + v * self.filter_bias.float()
        return self.out_proj((x0.float() * y).to(x.dtype))

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset = 0) -> torch.Tensor:
        """Decode one token per sequence; updates `state` in place. x: [B, d_model] or [B, 1, d_model].

        y_p = sum_{s <= p} h[p - s] v_s over the stored inputs v_0 .. v_p (no host sync, no branch on p), as
        the dot product of the history with the window of hpad at L - 1 - p (module docstring).
        """
        B = x.shape[0]
        self._check_fits(state, seqlen_offset, 1)
        u = short_conv_step(self.in_proj(x.reshape(B, self.d_model)), state[0], self.short_filter.weight.squeeze(1),
                            self.short_filter.bias)
        x0, x1, v = u.split(self.d_model, dim=-1)
        v = (x1 * v).float()  # [B, d_model]
        history = state[1]  # [B, d_model, L]
        L = history.shape[-1]
        pos = token_positions(seqlen_offset, B, 1, x.device)  # [B, 1]
        history.scatter_(2, pos.unsqueeze(1).expand(B, self.d_model, 1), v.unsqueeze(-1))
        windows = self._decode_filter(L).unfold(1, L, 1).transpose(0, 1)  # [L, d_model, L], a view of hpad
        h = windows[L - 1 - pos[:, 0]]  # [B, d_model, L]: h[p - s], 0 for s > p
        y = torch.einsum("bdl,bdl->bd", h, history) + v * self.filter_bias.float()
        return self.out_proj((x0.float() * y).to(x.dtype)).view_as(x)

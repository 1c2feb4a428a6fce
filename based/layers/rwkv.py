"""RWKV time mixing, version 5 ("Eagle", Peng et al., 2024, "Eagle and Finch: RWKV with matrix-valued
states and dynamic recurrence", section 4): the RWKV baseline of the recall / state-size comparisons.

    x'_* = x_t * mu_* + x_{t-1} * (1 - mu_*)                    token shift, * in {r, k, v, g}
    r, k, v = receptance(x'_r), key(x'_k), value(x'_v);  g = silu(gate(x'_g))     (heads of head_size)
    S_t = diag(w) S_{t-1} + k_t v_t^T,   o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),   w = exp(-exp(time_decay))
    y = output(ln_x(o) * g)                                      ln_x: GroupNorm, one group per head

Why version 5: its state is a matrix per head (head_size x head_size), like linear attention's
phi(k) v^T, so RWKV sits on the recall vs state-size plots at a state size comparable to Based's
(H dk dv values). RWKV-4's state is a vector (a numerator and a denominator per channel, O(d) values): it
would only show that a tiny state recalls badly. RWKV-6 ("Finch") makes the decay data-dependent (a low-rank
projection of the input per token, and data-dependent token shift); it is not built here: the op's
chunked form would take a per-token decay with the same numerics, the layer would gain the LoRA mixes.

Only time mixing is built: in this library every block is mixer + SwiGLU MLP, so RWKV's channel mixing
(its squared-ReLU MLP with its own token shift) is replaced by the shared SwiGLU, as every other mixer's.

Parameter names follow the RWKV-5 reference (RWKV-LM, RWKV_TimeMix_RWKV5): time_mix_{r,k,v,g},
time_decay, receptance, key, value, gate, output, ln_x; the bonus u is `time_first` (RWKV-4's name; the
v5 reference calls it time_faaaa). Initialisation follows the reference too (layer-dependent mixes,
decays spread from w = exp(-e^-6) to exp(-e^-1) across channels, zigzag bonus); the LM's Linear init
then replaces the projection weights as for every mixer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.rwkv import rwkv5_attn, rwkv5_step
from .state import Offset, State, carried_state, state_nbytes

# RWKV-5.2 divides the GroupNorm input by head_size_divisor = 8 (eps 1e-5): the same as eps 64e-5.
LN_X_EPS = 64e-5


class RWKV(nn.Module):
    """RWKV-5 time mixing (multi-head, matrix-valued state, per-channel decay).

    Args:
        d_model: model width (also the attention width, dim_att = d_model as in the reference).
        head_size: dk = dv per head (64 in RWKV-5); must divide d_model.
        n_layer: layers of the model, for the reference's layer-dependent initialisation.
        norm_eps: eps of ln_x.
        layer_idx: position in the model (sets the initialisation; bookkeeping otherwise).
    """

    def __init__(
        self,
        d_model: int,
        head_size: int = 64,
        n_layer: int | None = None,
        norm_eps: float = LN_X_EPS,
        layer_idx: int | None = None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("head_size", head_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % head_size:
            raise ValueError(f"head_size={head_size} must divide d_model={d_model}")
        if n_layer is not None and (not isinstance(n_layer, int) or n_layer <= 0):
            raise ValueError(f"n_layer must be a positive int or None, got {n_layer!r}")
        if layer_idx is not None and n_layer is not None and not 0 <= layer_idx < n_layer:
            raise ValueError(f"layer_idx={layer_idx} is outside [0, n_layer={n_layer})")
        self.d_model, self.head_size, self.layer_idx = d_model, head_size, layer_idx
        self.num_heads = H = d_model // head_size
        n_layer = n_layer or 1
        i = layer_idx or 0
        ratio_0_to_1 = i / (n_layer - 1) if n_layer > 1 else 0.0
        ratio_1_to_almost0 = 1.0 - i / n_layer
        ddd = torch.arange(d_model, dtype=torch.float32) / d_model
        self.time_mix_k = nn.Parameter(ddd.pow(ratio_1_to_almost0))
        self.time_mix_v = nn.Parameter(ddd.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1)
        self.time_mix_r = nn.Parameter(ddd.pow(0.5 * ratio_1_to_almost0))
        self.time_mix_g = nn.Parameter(ddd.pow(0.5 * ratio_1_to_almost0))
        n = torch.arange(d_model, dtype=torch.float32) / max(d_model - 1, 1)
        # Stored flat [d_model] (the reference's [H, head_size], head-major): optimizers that decay only
        # tensors of 2+ dims leave them alone even after from_pretrained, which drops _no_weight_decay.
        self.time_decay = nn.Parameter(-6 + 5 * n.pow(0.7 + 1.3 * ratio_0_to_1))
        zigzag = ((torch.arange(d_model) + 1) % 3 - 1) * 0.1
        self.time_first = nn.Parameter(ratio_0_to_1 * (1 - n) + zigzag)
        for p in (self.time_decay, self.time_first):
            p._no_weight_decay = True  # decaying time_decay towards 0 would pull every w to exp(-1)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.output = nn.Linear(d_model, d_model, bias=False)
        self.ln_x = nn.GroupNorm(H, d_model, eps=norm_eps)

    @property
    def out_proj(self) -> nn.Linear:
        """The output projection under the name every mixer shares (the block scales its init)."""
        return self.output

    def state_size(self, seq_len: int) -> int:
        """The field's measure, the matrix state H * dk * dv (= d_model * head_size); the token-shift buffer
        (d_model values, the previous input) is left out, as Mamba's conv buffer is."""
        return self.num_heads * self.head_size * self.head_size

    def allocate_inference_cache(
        self, batch_size: int, dtype=None, device=None, max_seq_len: int | None = None
    ) -> State:
        """(last input x [B, d_model] in dtype, for the token shift; wkv state S [B, H, dk, dv] in fp32)."""
        w = self.receptance.weight
        device = device or w.device
        return (
            torch.zeros(batch_size, self.d_model, dtype=dtype or w.dtype, device=device),
            torch.zeros(batch_size, self.num_heads, self.head_size, self.head_size, dtype=torch.float32, device=device),
        )

    def inference_state_bytes(self, seq_len: int, batch_size: int = 1, dtype=None) -> int:
        return state_nbytes(self.allocate_inference_cache(batch_size, dtype, "meta", max_seq_len=seq_len))

    def _decay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_log = -exp(time_decay), u), both [H, head_size], w_log in fp32."""
        shape = (self.num_heads, self.head_size)
        return -torch.exp(self.time_decay.float()).view(shape), self.time_first.view(shape)

    def _rkvg(self, x: torch.Tensor, prev: torch.Tensor):
        """x, prev (x shifted by one token) [..., d_model] -> r, k, v [..., H, head_size], g [..., d_model]."""
        shape = (*x.shape[:-1], self.num_heads, self.head_size)
        dx = x - prev
        r = self.receptance(prev + dx * self.time_mix_r).view(shape)
        k = self.key(prev + dx * self.time_mix_k).view(shape)
        v = self.value(prev + dx * self.time_mix_v).view(shape)
        g = F.silu(self.gate(prev + dx * self.time_mix_g))
        return r, k, v, g

    def _out(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """o [..., H, head_size], g [..., d_model] -> [..., d_model]."""
        shape = g.shape
        o = self.ln_x(o.reshape(-1, self.d_model)).view(shape)
        return self.output(o * g)

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. With `state` (prefill), continues from it (empty at
        seqlen_offset 0) and leaves the state after the last token in it."""
        carried = None if state is None else carried_state(state, seqlen_offset)
        first = x.new_zeros(x.shape[0], 1, self.d_model) if carried is None else carried[0].unsqueeze(1).to(x.dtype)
        r, k, v, g = self._rkvg(x, torch.cat([first, x[:, :-1]], dim=1))
        w_log, u = self._decay()
        o, final = rwkv5_attn(
            r, k, v, w_log, u, initial_state=None if carried is None else carried[1],
            output_final_state=state is not None,
        )
        if state is not None:
            state[0].copy_(x[:, -1])
            state[1].copy_(final)
        return self._out(o, g)

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset = 0) -> torch.Tensor:
        """Decode one token per sequence; updates `state` in place. x: [B, d_model] or [B, 1, d_model]."""
        xt = x.reshape(x.shape[0], self.d_model)
        r, k, v, g = self._rkvg(xt, state[0].to(xt.dtype))
        state[0].copy_(xt)
        w_log, u = self._decay()
        o = rwkv5_step(r, k, v, w_log, u, state[1])
        return self._out(o, g).view_as(x)

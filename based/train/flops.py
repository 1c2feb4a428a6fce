"""Training FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per token = 6 N + sum over layers of the token-mixing work that no parameter accounts for
(forward + backward = 3 x forward; Kaplan et al. 2020, PaLM appendix B):
    N                     all parameters, the tied embedding once (it is the LM head's matmul)
    attention             12 * d_model * K, K = keys a query sees on average. Causal full attention:
                          K = (T + 1) / 2, the work a causal kernel does. PaLM counts K = T; multiply
                          the attention term by 2 for that convention.
    sliding window W      12 * d_model * K, K = mean over t of min(t + 1, W)
    Taylor linear attn    12 * H * D_feat * (head_dim + 1): phi(k) v^T into the state, phi(q) out of it,
                          and the normaliser's two D_feat dot products (the recurrent form's work;
                          the chunked kernels do more, which MFU does not credit)
    BaseConv              6 * kernel_size * d_inner (the depthwise conv)
    RWKV-5, Lightning     12 * d_model * head_dim: the matrix state's update and read-out, as for Taylor
    Mamba, Mamba-2        12 * d_inner * d_state: the SSM state's update and read-out
    H3, Hyena             0: FFT long convolutions, O(d log T), not credited (their MFU is a lower bound)
MFU = FLOPs per token * tokens/s / (peak FLOP/s * GPUs), peak = dense bf16 tensor-core spec.
"""
from __future__ import annotations

import torch

from ..ops import taylor_feature_dim

# Dense bf16 tensor-core peak (vendor spec, no sparsity), matched against torch.cuda.get_device_name.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "GH200": 989.4e12, "B200": 2250e12,
                   "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def mixer_flops_per_token(config, seq_len: int) -> float:
    """Token-mixing FLOPs per token (forward + backward) summed over the layers."""
    d, T = config.d_model, seq_len
    total = 0.0
    for kind in config.mixer_types:
        if kind == "attention":
            total += 12 * d * (T + 1) / 2
        elif kind == "sliding_window":
            W = min(config.window_size, T)
            keys = (W * (W + 1) / 2 + (T - W) * W) / T  # mean of min(t + 1, W) over t < T
            total += 12 * d * keys
        elif kind == "linear_attn":
            head_dim = config.la_head_dim or d // config.la_num_heads
            feats = taylor_feature_dim(config.feature_dim, config.feature_map)
            total += 12 * config.la_num_heads * feats * (head_dim + 1)
        elif kind == "base_conv":
            total += 6 * config.conv_kernel_size * config.conv_expand * d
        elif kind == "rwkv":
            total += 12 * d * config.rwkv_head_size
        elif kind == "lightning":
            total += 12 * d * (d // config.lightning_num_heads)
        elif kind in ("mamba", "mamba2"):
            total += 12 * config.ssm_expand * d * config.ssm_state_size
    return total


def flops_per_token(config, seq_len: int, num_params: int) -> float:
    """Training FLOPs per token: 6 N plus the mixers' work (see the module docstring)."""
    return 6 * num_params + mixer_flops_per_token(config, seq_len)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU; None on the CPU or an unknown GPU (MFU then stays unreported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None

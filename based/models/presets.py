"""Named configurations: the BASED reference layouts and Transformer++ baselines sized to match them.

Layer layouts come from the reference training configs (REFERENCE.md): linear attention and sliding
window at fixed layer indices, BaseConv everywhere else, SwiGLU (inner 2 * d_model) after every mixer.
Sliding windows are 128 tokens, self included; the reference's "window 256" shows each token 129 keys
(FlashAttention window (128, 0)), which is window_size=129 here.

Parameter counts (tied embeddings counted once; tests/models/test_presets.py checks them):
    debug             194,752      transformer-debug        196,020   (+0.6%)
    360m          362,655,744      transformer-360m     355,617,792   (-1.9%)
    1.3b        1,349,531,904      transformer-1.3b   1,342,607,616   (-0.5%)
                                   lightning-debug          197,184   (+1.2%)
                                   lightning-360m       362,953,728   (+0.1%)
                                   lightning-1.3b     1,361,864,448   (+0.9%)
                                   mamba2-debug             194,696   (-0.0%)
                                   mamba2-360m          360,916,224   (-0.5%)
                                   mamba2-1.3b        1,341,940,736   (-0.6%)
                                   mamba2-hybrid-debug      191,790   (-1.5%)
                                   mamba2-hybrid-360m   364,186,848   (+0.4%)
                                   mamba2-hybrid-1.3b 1,346,038,624   (-0.3%)
                                   rwkv-debug               199,232   (+2.3%)
                                   rwkv-360m            363,174,912   (+0.1%)
                                   rwkv-1.3b          1,362,380,544   (+1.0%)

Lightning (TransNormerLLM) and Mamba-2 presets keep the BASED width and change the depth to match the
parameter count; Mamba-2 uses the paper's d_state 128, headdim 64, expand 2. Mamba-2-Hybrid (Waleffe et al.,
2024, "An Empirical Study of Mamba-based Language Models") is 43% Mamba-2, 7% attention and 50% MLP layers,
an MLP after every mixer: here every block is a mixer plus an MLP, so the mixers are 6 Mamba-2 to 1
attention (86% / 14%), attention spread evenly (`spread_layout`): 360m 4 of 25 (16%), 1.3b 5 of 33 (15%),
the nearest to 1/7 within 5% of the parameters; debug has 1 of 4. Its attention keeps rotary embeddings
and full multi-head attention (the paper's hybrid has no position embedding and uses grouped-query
attention).
"""
from __future__ import annotations


def hybrid_layout(n_layer: int, linear_attn: list[int], sliding_window: list[int]) -> list[str]:
    """Mixer names per layer: linear_attn / sliding_window at the given indices, base_conv elsewhere."""
    return [
        "linear_attn" if i in linear_attn else "sliding_window" if i in sliding_window else "base_conv"
        for i in range(n_layer)
    ]


def spread_layout(n_layer: int, n_attention: int, mixer: str = "mamba2") -> list[str]:
    """`mixer` everywhere but n_attention "attention" layers spread evenly, at the middle of each of
    n_attention equal spans of layers (never the first or last layer when n_layer > n_attention)."""
    at = {int((i + 0.5) * n_layer / n_attention) for i in range(n_attention)}
    return ["attention" if i in at else mixer for i in range(n_layer)]


GPT2_VOCAB = 50257

PRESET_CONFIGS: dict[str, dict] = {
    "debug": dict(
        vocab_size=256, d_model=64, n_layer=4,
        mixer_types=["base_conv", "linear_attn", "sliding_window", "base_conv"],
        feature_dim=8, la_num_heads=4, window_size=16, swa_num_heads=4, attn_num_heads=4,
        max_position_embeddings=512,
    ),
    "360m": dict(
        vocab_size=GPT2_VOCAB, d_model=1024, n_layer=27,
        mixer_types=hybrid_layout(27, [1, 6, 11, 16, 21], [2, 7, 12, 17, 22]),
        feature_dim=16, la_num_heads=16, window_size=128, swa_num_heads=16,
    ),
    "1.3b": dict(
        vocab_size=GPT2_VOCAB, d_model=1792, n_layer=36,
        mixer_types=hybrid_layout(36, [1, 6, 11, 16, 21, 27, 33], [2, 7, 12, 17, 22, 28, 34]),
        feature_dim=16, la_num_heads=16, window_size=128, swa_num_heads=16,
    ),
    # Transformer++: every layer full attention with rotary, SwiGLU, RMSNorm; depth (and for debug the
    # width) chosen so the parameter count is within 5% of the BASED preset of the same size.
    "transformer-debug": dict(
        vocab_size=256, d_model=60, n_layer=5, mixer_types=["attention"] * 5, attn_num_heads=6,
        max_position_embeddings=512,
    ),
    "transformer-360m": dict(
        vocab_size=GPT2_VOCAB, d_model=1024, n_layer=29, mixer_types=["attention"] * 29, attn_num_heads=16,
    ),
    "transformer-1.3b": dict(
        vocab_size=GPT2_VOCAB, d_model=1792, n_layer=39, mixer_types=["attention"] * 39, attn_num_heads=14,
    ),
    "lightning-debug": dict(
        vocab_size=256, d_model=64, n_layer=4, mixer_types=["lightning"] * 4, lightning_num_heads=4,
        max_position_embeddings=512,
    ),
    "lightning-360m": dict(
        vocab_size=GPT2_VOCAB, d_model=1024, n_layer=27, mixer_types=["lightning"] * 27, lightning_num_heads=16,
    ),
    "lightning-1.3b": dict(
        vocab_size=GPT2_VOCAB, d_model=1792, n_layer=36, mixer_types=["lightning"] * 36, lightning_num_heads=16,
    ),
    "mamba2-debug": dict(
        vocab_size=256, d_model=64, n_layer=3, mixer_types=["mamba2"] * 3, ssm_state_size=64, mamba2_headdim=16,
        max_position_embeddings=512,
    ),
    "mamba2-360m": dict(
        vocab_size=GPT2_VOCAB, d_model=1024, n_layer=24, mixer_types=["mamba2"] * 24, ssm_state_size=128,
        mamba2_headdim=64,
    ),
    "mamba2-1.3b": dict(
        vocab_size=GPT2_VOCAB, d_model=1792, n_layer=32, mixer_types=["mamba2"] * 32, ssm_state_size=128,
        mamba2_headdim=64,
    ),
    "mamba2-hybrid-debug": dict(
        vocab_size=256, d_model=60, n_layer=4, mixer_types=spread_layout(4, 1), ssm_state_size=16,
        mamba2_headdim=12, attn_num_heads=6, max_position_embeddings=512,
    ),
    "mamba2-hybrid-360m": dict(
        vocab_size=GPT2_VOCAB, d_model=1024, n_layer=25, mixer_types=spread_layout(25, 4), ssm_state_size=128,
        mamba2_headdim=64, attn_num_heads=16,
    ),
    "mamba2-hybrid-1.3b": dict(
        vocab_size=GPT2_VOCAB, d_model=1792, n_layer=33, mixer_types=spread_layout(33, 5), ssm_state_size=128,
        mamba2_headdim=64, attn_num_heads=14,
    ),
    # RWKV-5 time mixing in every layer (then SwiGLU, as every block), head size 64 (16 for debug), the
    # BASED preset's width and depth: 5 d^2 + 8 d parameters per mixer.
    "rwkv-debug": dict(
        vocab_size=256, d_model=64, n_layer=4, mixer_types=["rwkv"] * 4, rwkv_head_size=16,
        max_position_embeddings=512,
    ),
    "rwkv-360m": dict(vocab_size=GPT2_VOCAB, d_model=1024, n_layer=27, mixer_types=["rwkv"] * 27, rwkv_head_size=64),
    "rwkv-1.3b": dict(vocab_size=GPT2_VOCAB, d_model=1792, n_layer=36, mixer_types=["rwkv"] * 36, rwkv_head_size=64),
}

PRESETS: tuple[str, ...] = tuple(PRESET_CONFIGS)


def debug_preset(preset: str) -> str:
    """The debug size of a preset's family (names are FAMILY-SIZE, BASED's own have no family):
    rwkv-1.3b -> rwkv-debug, mamba2-hybrid-360m -> mamba2-hybrid-debug, 1.3b -> debug."""
    family = preset.rpartition("-")[0]
    return f"{family}-debug" if family else "debug"

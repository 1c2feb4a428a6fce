"""Named configurations: the BASED reference layouts and Transformer++ baselines sized to match them.

Layer layouts come from the reference training configs (REFERENCE.md): linear attention and sliding
window at fixed layer indices, BaseConv everywhere else, SwiGLU (inner 2 * d_model) after every mixer.
Sliding windows are 128 tokens, self included; the reference's "window 256" shows each token 129 keys
(FlashAttention window (128, 0)), which is window_size=129 here.

Parameter counts (tied embeddings counted once; tests/models/test_presets.py checks them):
    debug             194,752      transformer-debug        196,020   (+0.6%)
    360m          362,655,744      transformer-360m     355,617,792   (-1.9%)
    1.3b        1,349,531,904      transformer-1.3b   1,342,607,616   (-0.5%)
"""
from __future__ import annotations


def hybrid_layout(n_layer: int, linear_attn: list[int], sliding_window: list[int]) -> list[str]:
    """Mixer names per layer: linear_attn / sliding_window at the given indices, base_conv elsewhere."""
    return [
        "linear_attn" if i in linear_attn else "sliding_window" if i in sliding_window else "base_conv"
        for i in range(n_layer)
    ]


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
}

PRESETS: tuple[str, ...] = tuple(PRESET_CONFIGS)

"""Presets and config validation. Large presets are built on the meta device: counted, never allocated."""
import pytest
import torch

from based import PRESETS, BasedConfig, BasedForCausalLM
from based.models.config import MIXER_TYPES

# Exact counts (tied embeddings counted once); the table in based/models/presets.py quotes them.
PARAMS = {
    "debug": 194_752,
    "360m": 362_655_744,
    "1.3b": 1_349_531_904,
    "transformer-debug": 196_020,
    "transformer-360m": 355_617_792,
    "transformer-1.3b": 1_342_607_616,
    "lightning-debug": 197_184,
    "lightning-360m": 362_953_728,
    "lightning-1.3b": 1_361_864_448,
    "mamba2-debug": 194_696,
    "mamba2-360m": 360_916_224,
    "mamba2-1.3b": 1_341_940_736,
    "mamba2-hybrid-debug": 191_790,
    "mamba2-hybrid-360m": 364_186_848,
    "mamba2-hybrid-1.3b": 1_346_038_624,
    "rwkv-debug": 199_232,
    "rwkv-360m": 363_174_912,
    "rwkv-1.3b": 1_362_380_544,
}


def n_params(name: str) -> int:
    with torch.device("meta"):
        return BasedForCausalLM(BasedConfig.from_preset(name)).num_parameters()


def test_every_preset_is_counted():
    assert set(PRESETS) == set(PARAMS)


@pytest.mark.parametrize("name", PRESETS)
def test_param_counts(name):
    assert n_params(name) == PARAMS[name]


@pytest.mark.parametrize("name, target", [("360m", 360e6), ("1.3b", 1.3e9)])
def test_based_presets_match_their_names(name, target):
    assert abs(n_params(name) / target - 1) < 0.05


@pytest.mark.parametrize("size", ["debug", "360m", "1.3b"])
def test_transformer_baselines_match_based_size(size):
    assert abs(n_params(f"transformer-{size}") / n_params(size) - 1) < 0.05


@pytest.mark.parametrize("size", ["debug", "360m", "1.3b"])
def test_rwkv_presets_match_based_size(size):
    assert abs(n_params(f"rwkv-{size}") / n_params(size) - 1) < 0.05
    assert set(BasedConfig.from_preset(f"rwkv-{size}").mixer_types) == {"rwkv"}


@pytest.mark.parametrize("family", ["lightning", "mamba2", "mamba2-hybrid"])
@pytest.mark.parametrize("size", ["debug", "360m", "1.3b"])
def test_decay_presets_match_based_size(family, size):
    assert abs(n_params(f"{family}-{size}") / n_params(size) - 1) < 0.05


@pytest.mark.parametrize("size, n_layer, attention", [("360m", 25, [3, 9, 15, 21]), ("1.3b", 33, [3, 9, 16, 23, 29])])
def test_mamba2_hybrid_layout(size, n_layer, attention):
    """Waleffe et al. (2024): 43% Mamba-2, 7% attention, 50% MLP layers -> mixers ~1/7 attention, spread."""
    cfg = BasedConfig.from_preset(f"mamba2-hybrid-{size}")
    assert cfg.n_layer == n_layer and set(cfg.mixer_types) == {"mamba2", "attention"}
    assert [i for i, m in enumerate(cfg.mixer_types) if m == "attention"] == attention
    assert 0.12 < len(attention) / n_layer < 0.17
    assert (cfg.ssm_state_size, cfg.mamba2_headdim, cfg.ssm_expand) == (128, 64, 2)


def test_reference_layouts():
    for name, la, swa, d, n in (
        ("360m", [1, 6, 11, 16, 21], [2, 7, 12, 17, 22], 1024, 27),
        ("1.3b", [1, 6, 11, 16, 21, 27, 33], [2, 7, 12, 17, 22, 28, 34], 1792, 36),
    ):
        cfg = BasedConfig.from_preset(name)
        assert (cfg.d_model, cfg.hidden_size, cfg.n_layer, cfg.num_hidden_layers) == (d, d, n, n)
        assert [i for i, m in enumerate(cfg.mixer_types) if m == "linear_attn"] == la
        assert [i for i, m in enumerate(cfg.mixer_types) if m == "sliding_window"] == swa
        assert set(cfg.mixer_types) == {"base_conv", "linear_attn", "sliding_window"}
        assert (cfg.feature_dim, cfg.la_num_heads, cfg.swa_num_heads, cfg.window_size) == (16, 16, 16, 128)
        assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.mlp_inner) == (50257, 50264, 2 * d)
        assert cfg.tie_word_embeddings
    debug = BasedConfig.from_preset("debug")
    assert {"base_conv", "linear_attn", "sliding_window"} <= set(debug.mixer_types)
    assert set(BasedConfig.from_preset("transformer-360m").mixer_types) == {"attention"}


def test_preset_overrides_and_unknown_preset():
    assert BasedConfig.from_preset("debug", window_size=4).window_size == 4
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*debug, 360m, 1.3b, transformer-debug"):
        BasedConfig.from_preset("gpt5")


def test_unknown_preset_override_is_an_error_naming_the_field():
    # PretrainedConfig keeps unknown keywords as attributes nothing reads: the window would stay 16.
    with pytest.raises(ValueError, match=r"unknown field 'windw_size' \(did you mean 'window_size'\?\); valid fields: .*"
                                         r"d_model, .*window_size"):
        BasedConfig.from_preset("debug", windw_size=64)
    assert BasedConfig.from_preset("debug", hidden_size=32, num_hidden_layers=4).d_model == 32  # aliases pass


def test_default_config_is_360m():
    assert BasedConfig().to_dict()["mixer_types"] == BasedConfig.from_preset("360m").mixer_types


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(mixer_types=["base_conv", "xlstm", "linear_attn", "base_conv"]), r"unknown mixer type\(s\) \['xlstm'\]"),
        (dict(attn_rotary="no"), "attn_rotary must be true or false, got 'no'"),
        (dict(mixer_types=["base_conv", "h3", "linear_attn", "base_conv"], h3_state_size=7), "h3_state_size must be even"),
        (dict(n_layer=3), "mixer_types has 4 entries but n_layer=3"),
        (dict(d_model=66), "d_model=66 is not divisible by la_num_heads=4"),
        (dict(mixer_types=["lightning"] * 4, lightning_num_heads=3), "not divisible by lightning_num_heads=3"),
        (dict(mixer_types=["mamba2"] * 4, mamba2_headdim=48), "= 128 is not divisible by mamba2_headdim=48"),
        (dict(lightning_num_heads=0), "lightning_num_heads must be a positive int, got 0"),
        (dict(mixer_types=["rwkv"] * 4, rwkv_head_size=48), "rwkv_head_size=48 must divide d_model=64"),
        (dict(swa_num_heads=3), "swa_num_heads: d_model=64 is not divisible by num_heads=3"),
        (dict(swa_num_heads=64), r"swa_num_heads: head_dim = d_model / num_heads = 1 must be even"),
        (dict(feature_dim=0), "feature_dim must be a positive int, got 0"),
        (dict(window_size=-1), "window_size must be a positive int, got -1"),
        (dict(conv_kernel_size=0), "conv_kernel_size must be a positive int, got 0"),
        (dict(feature_map="quadratic"), "unknown feature_map 'quadratic'"),
        (dict(vocab_size=0), "vocab_size must be a positive int, got 0"),
        (dict(mlp_hidden_size=-4), "mlp_hidden_size must be a positive int, got -4"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        BasedConfig.from_preset("debug", **overrides)


def test_divisibility_checked_only_for_mixers_in_use():
    # transformer-debug has d_model 60, which 16 linear-attention heads would not divide: unused, so fine.
    cfg = BasedConfig.from_preset("transformer-debug")
    assert cfg.d_model % cfg.la_num_heads
    with pytest.raises(ValueError, match="attn_num_heads: d_model=60 is not divisible by num_heads=7"):
        BasedConfig.from_preset("transformer-debug", attn_num_heads=7)


def test_mixer_names():
    assert MIXER_TYPES == ("base_conv", "linear_attn", "sliding_window", "attention", "mamba", "h3", "hyena",
                           "lightning", "mamba2", "rwkv")

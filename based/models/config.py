"""BasedConfig: one config for any stack of BASED mixers (the layout is data: `mixer_types`)."""
from __future__ import annotations

import difflib
import math
from dataclasses import field

from transformers import PretrainedConfig

from ..layers.attention import check_heads
from ..layers.feature_maps import FEATURE_MAP_ABLATIONS
from ..ops import FEATURE_MAPS
from .presets import PRESET_CONFIGS, PRESETS

MIXER_TYPES = ("base_conv", "linear_attn", "sliding_window", "attention", "mamba", "h3", "hyena", "lightning", "mamba2",
               "rwkv")
# Taylor's two state layouts, then the other feature maps of the paper's ablation ("taylor" = "compact").
LA_FEATURE_MAPS = FEATURE_MAPS + FEATURE_MAP_ABLATIONS


def unknown_field_message(name: str, valid) -> str:
    """"unknown field 'd_modle' (did you mean 'd_model'?); valid fields: ..." for a config error."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown field {name!r}{hint}; valid fields: {', '.join(sorted(valid))}"


def _positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def _positive_int(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class BasedConfig(PretrainedConfig):
    """Configuration of BasedModel / BasedForCausalLM; the defaults are the "360m" preset.

    The per-layer mixer names live in `mixer_types`, not `layer_types`: transformers reserves
    `layer_types` for its own attention-kind names, remaps "attention" and rejects the others on save.

    Args:
        vocab_size: tokens (the embedding is padded up to a multiple of pad_vocab_size_multiple).
        d_model: width (alias hidden_size).
        n_layer: blocks (alias num_hidden_layers).
        mixer_types: one of MIXER_TYPES per layer ("mamba", "h3", "hyena" are the paper's baselines).
        feature_dim, feature_map, la_num_heads, la_head_dim, la_eps: linear attention; feature_map is
            "compact" or "full" (Taylor) or an ablation map (see based.layers.feature_maps).
        la_num_features: random features of the "performer" map (default: Taylor's width).
        la_fold_every: Taylor decoding writes its fp32 state once every this many tokens, keeping the
            tokens between in a small pending buffer (based/ops/taylor/pending.py); 1 writes every token.
        window_size, swa_num_heads: sliding-window attention (window counts tokens, self included).
        attn_num_heads: full attention (Transformer++).
        rotary_base: RoPE base of both softmax attentions.
        attn_rotary: whether both softmax attentions rotate q and k (RoPE); False in the MQAR models of
            figure 2, as in Zoology's (positions come from the BaseConv before them).
        conv_kernel_size, conv_expand: BaseConv.
        ssm_state_size, ssm_expand: Mamba's d_state and expand (also Mamba-2's). h3_state_size: H3's N (even).
        lightning_num_heads: Lightning Attention heads (head_dim = d_model / heads, state per head head_dim^2).
        mamba2_headdim: Mamba-2's P, channels per head (nheads = ssm_expand * d_model / P).
        rwkv_head_size: RWKV-5's head size (dk = dv; heads = d_model / head size, state per head head size^2).
        hyena_filter_order: width of Hyena's implicit filter MLP (positions are normalised by
            max_position_embeddings, which is also the cosformer map's M).
        mlp_hidden_size: SwiGLU inner size (default 2 * d_model).
        max_position_embeddings: default KV-cache length of full attention at decode time.
    """

    model_type = "based"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer"}

    vocab_size: int = 50257
    d_model: int = 1024
    n_layer: int = 27
    mixer_types: list[str] = field(default_factory=lambda: list(PRESET_CONFIGS["360m"]["mixer_types"]))
    feature_dim: int = 16
    feature_map: str = "compact"
    la_num_heads: int = 16
    la_head_dim: int | None = None
    la_eps: float = 1e-6
    la_fold_every: int = 8
    window_size: int = 128
    swa_num_heads: int = 16
    attn_num_heads: int = 16
    rotary_base: float = 10000.0
    attn_rotary: bool = True
    conv_kernel_size: int = 3
    conv_expand: int = 2
    la_num_features: int | None = None
    ssm_state_size: int = 16
    ssm_expand: int = 2
    h3_state_size: int = 64
    hyena_filter_order: int = 64
    lightning_num_heads: int = 16
    mamba2_headdim: int = 64
    rwkv_head_size: int = 64
    mlp_hidden_size: int | None = None
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    pad_vocab_size_multiple: int = 8

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        _positive_int(
            vocab_size=self.vocab_size, d_model=self.d_model, n_layer=self.n_layer, feature_dim=self.feature_dim,
            la_num_heads=self.la_num_heads, window_size=self.window_size, swa_num_heads=self.swa_num_heads,
            attn_num_heads=self.attn_num_heads, conv_kernel_size=self.conv_kernel_size,
            conv_expand=self.conv_expand, max_position_embeddings=self.max_position_embeddings,
            pad_vocab_size_multiple=self.pad_vocab_size_multiple, ssm_state_size=self.ssm_state_size,
            ssm_expand=self.ssm_expand, h3_state_size=self.h3_state_size, hyena_filter_order=self.hyena_filter_order,
            lightning_num_heads=self.lightning_num_heads, mamba2_headdim=self.mamba2_headdim,
            rwkv_head_size=self.rwkv_head_size, la_fold_every=self.la_fold_every,
        )
        _positive(rms_norm_eps=self.rms_norm_eps, la_eps=self.la_eps, rotary_base=self.rotary_base,
                  initializer_range=self.initializer_range)
        if not isinstance(self.attn_rotary, bool):
            raise ValueError(f"attn_rotary must be true or false, got {self.attn_rotary!r}")
        for name in ("la_head_dim", "mlp_hidden_size", "la_num_features"):
            if getattr(self, name) is not None:
                _positive_int(**{name: getattr(self, name)})
        if self.feature_map not in LA_FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {self.feature_map!r}: use one of {LA_FEATURE_MAPS}")
        if not isinstance(self.mixer_types, (list, tuple)):
            raise ValueError(f"mixer_types must be a list with one mixer name per layer, got {self.mixer_types!r}")
        unknown = sorted({m for m in self.mixer_types if m not in MIXER_TYPES}, key=str)
        if unknown:
            raise ValueError(f"unknown mixer type(s) {unknown} in mixer_types: use {MIXER_TYPES}")
        if len(self.mixer_types) != self.n_layer:
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries but n_layer={self.n_layer}: give one per layer"
            )
        used = set(self.mixer_types)
        if "linear_attn" in used and self.la_head_dim is None and self.d_model % self.la_num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by la_num_heads={self.la_num_heads}; set la_head_dim"
            )
        if "lightning" in used and self.d_model % self.lightning_num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by lightning_num_heads={self.lightning_num_heads}"
            )
        if "mamba2" in used and (self.ssm_expand * self.d_model) % self.mamba2_headdim:
            raise ValueError(
                f"ssm_expand * d_model = {self.ssm_expand * self.d_model} is not divisible by "
                f"mamba2_headdim={self.mamba2_headdim}"
            )
        if "rwkv" in used and self.d_model % self.rwkv_head_size:
            raise ValueError(f"rwkv_head_size={self.rwkv_head_size} must divide d_model={self.d_model}")
        if "h3" in used and self.h3_state_size % 2:
            raise ValueError(f"h3_state_size must be even (N/2 complex modes), got {self.h3_state_size}")
        for kind, heads in (("sliding_window", "swa_num_heads"), ("attention", "attn_num_heads")):
            if kind in used:
                try:
                    check_heads(self.d_model, getattr(self, heads))
                except ValueError as e:
                    raise ValueError(f"{heads}: {e}") from None

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding: vocab_size rounded up to pad_vocab_size_multiple (tensor-core friendly)."""
        m = self.pad_vocab_size_multiple
        return math.ceil(self.vocab_size / m) * m

    @property
    def mlp_inner(self) -> int:
        return self.mlp_hidden_size or 2 * self.d_model

    @classmethod
    def field_names(cls) -> set[str]:
        """What a preset override may set: the model's fields, their transformers aliases (hidden_size, ...)
        and the special-token ids training writes. PretrainedConfig keeps any other keyword as an attribute
        nothing reads, so a misspelt field would otherwise be dropped without a word."""
        return set(cls.__annotations__) | set(cls.attribute_map) | {"bos_token_id", "eos_token_id", "pad_token_id"}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BasedConfig":
        """A named configuration (see based.models.PRESETS), with any field overridden."""
        if name not in PRESET_CONFIGS:
            raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
        for key in overrides:
            if key not in cls.field_names():
                raise ValueError(f"preset override: {unknown_field_message(key, cls.field_names())}")
        return cls(**{**PRESET_CONFIGS[name], **overrides})

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        # transformers only warns when a config.json of another model type is loaded into this class.
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        found = config_dict.get("model_type")
        if found != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a config.json with model_type={found!r}, not "
                f"{cls.model_type!r}: it is not a BASED checkpoint (convert reference checkpoints first)"
            )
        return config_dict, kwargs

    def to_diff_dict(self) -> dict:
        # Save every field, so a checkpoint does not silently change if a default changes later.
        return self.to_dict()

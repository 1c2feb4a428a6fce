"""HazyResearch/based checkpoints (hazyresearch/based-360m, based-1b) to and from this package.

Their model is flash-attn's GPT with a GPT-2-style config. Fields read from their config.json (defaults
are theirs where they have one):
    n_embd (hidden_size), n_layer, n_head, vocab_size, pad_vocab_size_multiple (1), n_inner,
    layer_norm_epsilon (1e-5), rms_norm (must be true), activation_function (must be "swiglu"),
    tie_word_embeddings (true), max_position_embeddings (must be 0: no learned positions),
    n_positions (sizes nothing here; kept as max_position_embeddings),
    alt_mixer_layers -> linear attention: alt_mixer.{feature_dim (16), num_heads (16), head_dim
        (n_embd / num_heads), eps (1e-12), feature_map.input_dim (must equal feature_dim)};
    alt_mixer_2_layers -> sliding window: alt_mixer_2.window_size (128); heads are n_head (their
        builder overrides alt_mixer_2.num_heads with it); rotary_emb_fraction (must be 1),
        rotary_emb_base (10000), rotary_emb_interleaved (false), rotary_emb_scale_base (none),
        n_head_kv (none), scale_attn_weights (true), scale_attn_by_inverse_layer_idx (false);
    every other layer -> BaseConv: mixer.{expand_proj (2; in_proj d -> expand_proj*d), kernel_size,
        else kernel_sizes, else 3}.
Ignored: dropout, fused-kernel and initialisation flags, residual_in_fp32 (fp32 runs match exactly).

Semantics that differ in name only:
    - their sliding window W goes to FlashAttention as (W // 2, 0): W // 2 keys back plus the query,
      which is window_size = W // 2 + 1 here (256 -> 129);
    - their Taylor map is the full 1 + d + d^2 one: converted models use feature_map="full" (the
      compact map gives the same kernel values, hence the same outputs);
    - their linear-attention normaliser adds eps = 1e-12: kept as la_eps.
fixed_decay (based-1b's config): their GPTModel then holds a buffer transformer.decay.decay [n_head],
log(1 - 2^(decay_const - h)), computed from the config, and passes the mask built from it as `decay=` to
every mixer; BaseConv, LinearAttention and SlidingAttention take it in **kwargs and never read it (their
recurrent_forward has a decay argument that forward never passes). So the buffer changes no output: its
shape is checked and it is dropped (decay_const and decay_denom are ignored with it).
Biases: their BaseConv conv has none unless trained with the causal-conv1d kernel, and in_proj/out_proj
have none when use_bias is false: ours are set to zero then. Other biases (Wqkv, attention out_proj,
MLP) are not supported and are reported as unexpected keys.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from ..models import BasedConfig, BasedForCausalLM
from ..ops import FEATURE_MAPS

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Buffers or bookkeeping that some of their checkpoints hold and that carry no weights: rotary tables and
# the torchmetrics counters their Lightning module saves beside its `model.` ("train_metrics.num-tokens.count").
_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq$|^(train|val|test)_metrics\.)")
DECAY_KEY = "transformer.decay.decay"


class ConversionError(ValueError):
    """A checkpoint or config this converter cannot map."""


def _require(cfg: dict, name: str, ok, expected: str, default=None):
    value = cfg.get(name, default)
    if not ok(value):
        raise ConversionError(f"config field {name}={value!r} is not supported: expected {expected}")
    return value


def _is_int(value) -> bool:
    """An int of their JSON, not a bool (True is an int to isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _section(cfg: dict, name: str, parent: str = "") -> dict:
    """A nested object of their config ({} when absent)."""
    value = cfg.get(name) or {}
    if not isinstance(value, dict):
        raise ConversionError(f"config field {parent}{name} must be an object, got {value!r}")
    return value


def _layers(cfg: dict, name: str) -> list[int]:
    value = cfg.get(name) or []
    if not isinstance(value, list) or not all(_is_int(i) for i in value):
        raise ConversionError(f"config field {name} must be a list of layer indices, got {value!r}")
    return value


def config_from_hazyresearch(cfg: dict) -> BasedConfig:
    """Our BasedConfig for their config.json dict (the fields read are listed in the module doc)."""
    if not isinstance(cfg, dict):
        raise ConversionError(f"the config must be a JSON object of fields, not a {type(cfg).__name__}")

    def get(name, *aliases, default=None):
        for key in (name, *aliases):
            if cfg.get(key) is not None:
                return cfg[key]
        if default is None:
            raise ConversionError(f"config has no {name!r} field")
        return default

    d_model, n_layer, n_head = get("n_embd", "hidden_size"), get("n_layer", "num_hidden_layers"), get("n_head")
    for name, value in (("n_embd", d_model), ("n_layer", n_layer), ("n_head", n_head)):
        if not _is_int(value) or value < 1:
            raise ConversionError(f"config field {name}={value!r} is not supported: expected a positive int")
    _require(cfg, "rms_norm", lambda v: v is True, "true (RMSNorm)")
    _require(cfg, "activation_function", lambda v: v == "swiglu", '"swiglu"')
    _require(cfg, "max_position_embeddings", lambda v: not v, "0 (no learned position embeddings)", 0)
    linear, sliding = _layers(cfg, "alt_mixer_layers"), _layers(cfg, "alt_mixer_2_layers")
    if any(not 0 <= i < n_layer for i in linear + sliding):  # were ignored: those layers became BaseConv
        raise ConversionError(f"config fields alt_mixer_layers={linear} and alt_mixer_2_layers={sliding} must "
                              f"index layers 0 .. n_layer - 1 = {n_layer - 1}")
    mixer_types = [
        "sliding_window" if i in sliding else "linear_attn" if i in linear else "base_conv" for i in range(n_layer)
    ]
    fields = dict(
        vocab_size=get("vocab_size", default=50257), d_model=d_model, n_layer=n_layer, mixer_types=mixer_types,
        pad_vocab_size_multiple=get("pad_vocab_size_multiple", default=1), mlp_hidden_size=get("n_inner"),
        rms_norm_eps=get("layer_norm_epsilon", default=1e-5), tie_word_embeddings=True,
        max_position_embeddings=get("n_positions", default=2048), feature_map="full",
    )
    _require(cfg, "tie_word_embeddings", lambda v: v is not False, "true (tied lm_head)")
    if "base_conv" in mixer_types:
        conv = _section(cfg, "mixer")
        if "BaseConv" not in str(conv.get("_target_", "BaseConv")):
            raise ConversionError(f"mixer._target_={conv.get('_target_')!r}: only BaseConv layers convert")
        expand = conv.get("expand_proj", 2)
        if not _is_int(expand) or expand < 2 or expand % 2:
            raise ConversionError(f"mixer.expand_proj={expand!r} is not supported: it must be an even int >= 2")
        kernel = conv.get("kernel_size") or conv.get("kernel_sizes") or 3
        fields.update(conv_expand=expand // 2, conv_kernel_size=kernel[0] if isinstance(kernel, list) else kernel)
    if linear:
        la = _section(cfg, "alt_mixer")
        if "LinearAttention" not in str(la.get("_target_", "LinearAttention")):
            raise ConversionError(f"alt_mixer._target_={la.get('_target_')!r}: expected their LinearAttention")
        feature_dim = la.get("feature_dim", 16)
        fmap = _section(la, "feature_map", "alt_mixer.")
        taylor = "TaylorExp" in str(fmap.get("_target_", "TaylorExp"))
        if not taylor or fmap.get("input_dim", feature_dim) != feature_dim:
            raise ConversionError(f"alt_mixer.feature_map={fmap!r}: expected TaylorExp with input_dim = feature_dim")
        fields.update(
            feature_dim=feature_dim, la_num_heads=la.get("num_heads", 16), la_head_dim=la.get("head_dim"),
            la_eps=la.get("eps", 1e-12),
        )
    if sliding:
        swa = _section(cfg, "alt_mixer_2")
        if "Slid" not in str(swa.get("_target_", "Slid")):
            raise ConversionError(f"alt_mixer_2._target_={swa.get('_target_')!r}: expected their SlidingAttention")
        _require(cfg, "rotary_emb_fraction", lambda v: v == 1, "1 (rotary over the whole head)", 0.0)
        _require(cfg, "rotary_emb_interleaved", lambda v: not v, "false", False)
        _require(cfg, "rotary_emb_scale_base", lambda v: v is None, "none", None)
        _require(cfg, "n_head_kv", lambda v: v in (None, n_head), f"none or n_head={n_head}", None)
        _require(cfg, "scale_attn_weights", lambda v: v is True, "true", True)
        _require(cfg, "scale_attn_by_inverse_layer_idx", lambda v: not v, "false", False)
        window = swa.get("window_size", 128)
        if not _is_int(window) or window < 0:
            raise ConversionError(f"alt_mixer_2.window_size={window!r} is not supported: it must be an int >= 0")
        fields.update(
            window_size=window // 2 + 1, swa_num_heads=n_head, rotary_base=cfg.get("rotary_emb_base", 10000.0)
        )
    return BasedConfig(**fields)


def config_to_hazyresearch(config: BasedConfig) -> dict:
    """Their config.json dict for our config (the inverse of config_from_hazyresearch)."""
    kinds = set(config.mixer_types)
    if not kinds <= {"base_conv", "linear_attn", "sliding_window"}:
        raise ConversionError(f"mixer types {sorted(kinds)}: only base_conv, linear_attn, sliding_window export")
    if "linear_attn" in kinds and config.feature_map not in FEATURE_MAPS:
        raise ConversionError(f"feature_map={config.feature_map!r}: only the Taylor maps {FEATURE_MAPS} export")
    if not config.tie_word_embeddings:
        raise ConversionError("their model ties lm_head to the embeddings: untied models do not export")
    layers = lambda kind: [i for i, m in enumerate(config.mixer_types) if m == kind]  # noqa: E731
    return {
        "_target_": "based.models.gpt.GPT2MixerConfig",
        "n_embd": config.d_model, "n_layer": config.n_layer, "n_head": config.swa_num_heads,
        "n_inner": config.mlp_inner, "vocab_size": config.vocab_size,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple, "layer_norm_epsilon": config.rms_norm_eps,
        "n_positions": config.max_position_embeddings, "max_position_embeddings": 0,
        "rms_norm": True, "activation_function": "swiglu", "tie_word_embeddings": True,
        "mlp_fc1_bias": False, "mlp_fc2_bias": False, "qkv_proj_bias": False, "out_proj_bias": False,
        "rotary_emb_fraction": 1, "rotary_emb_base": config.rotary_base, "rotary_emb_interleaved": False,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "alt_mixer_layers": layers("linear_attn"), "alt_mixer_2_layers": layers("sliding_window"),
        "mixer": {
            "_target_": "based.models.mixers.convolution.BaseConv", "expand_proj": 2 * config.conv_expand,
            "kernel_size": config.conv_kernel_size, "use_bias": True,
        },
        "alt_mixer": {
            "_target_": "based.models.mixers.linear_attention.LinearAttention",
            "feature_map": {
                "_target_": "based.models.mixers.linear_attention.TaylorExp", "input_dim": config.feature_dim
            },
            "feature_dim": config.feature_dim, "num_heads": config.la_num_heads, "eps": config.la_eps,
            **({"head_dim": config.la_head_dim} if config.la_head_dim else {}),
        },
        "alt_mixer_2": {
            "_target_": "based.models.mixers.slide_attention.SlidingAttention",
            # Their window W shows W // 2 keys back plus the query.
            "window_size": 2 * (config.window_size - 1), "num_heads": config.swa_num_heads, "causal": True,
        },
    }


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch pickle (read with weights_only=True). Lightning-style
    {"state_dict": ...} wrappers, a leading "model." on any key and then metric counters are removed, as
    their own loader does (the counters carry no "model." prefix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(path)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types, and OSError)
            raise ConversionError(f"{path} is not a readable safetensors file (truncated or empty?): {e}") from None
    else:
        if path.stat().st_size == 0:  # torch.load says only "EOFError"
            raise ConversionError(f"{path} is empty, not a PyTorch checkpoint: copy the checkpoint again")
        try:
            with warnings.catch_warnings():  # garbage draws pickle-protocol warnings before the error
                warnings.simplefilter("ignore")
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (pickle errors have no common base class)
            raise ConversionError(f"{path} is not a PyTorch checkpoint (torch.load: {_load_error(e)}): pass their "
                                  f"pytorch_model.bin or model.safetensors") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    stripped = {k.removeprefix("model."): v for k, v in sd.items()}
    if len(stripped) != len(sd):
        twice = sorted(k for k in sd if k.startswith("model.") and k.removeprefix("model.") in sd)
        raise ConversionError(f"{path} holds keys both with and without the model. prefix: {_describe(twice)}")
    return {k: v for k, v in stripped.items() if not _IGNORED.search(k)}


def _load_error(error: Exception) -> str:
    """torch.load's error in one line: its weights-only message is a dozen lines around the cause (and
    suggests weights_only=False, which would run the file's code), a zip error a paragraph."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def drop_fixed_decay(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Their state dict less the fixed_decay buffer, which no mixer we convert reads (module doc); without
    fixed_decay in the config the buffer is left in, to be reported as an unexpected key."""
    if not cfg.get("fixed_decay") or DECAY_KEY not in sd:
        return sd
    sd = dict(sd)
    decay, n_head = sd.pop(DECAY_KEY), cfg.get("n_head")
    if tuple(decay.shape) != (n_head,):
        raise ConversionError(f"{DECAY_KEY} has shape {tuple(decay.shape)}: expected [n_head] = [{n_head}]")
    return sd


def _describe(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def state_dict_from_hazyresearch(sd: dict[str, torch.Tensor], config: BasedConfig) -> dict[str, torch.Tensor]:
    """Our state dict for their tensors, checked against the model `config` describes: any missing,
    unexpected or mis-shaped tensor is reported by name."""
    sd = dict(sd)
    emb = "transformer.embeddings.word_embeddings.weight"
    head = sd.pop("lm_head.weight", None)
    if head is not None and emb in sd and not torch.equal(head, sd[emb]):
        raise ConversionError("lm_head.weight differs from the word embeddings: untied heads do not convert")
    out = {re.sub(r"\.mixer\.conv\.conv\.", ".mixer.conv.", k): v for k, v in sd.items()}
    with torch.device("meta"):
        expected = BasedForCausalLM(config).state_dict()
    expected.pop("lm_head.weight", None)  # tied
    for i, kind in enumerate(config.mixer_types):
        if kind == "base_conv":
            for name in ("conv.bias", "in_proj.bias", "out_proj.bias"):
                key = f"transformer.layers.{i}.mixer.{name}"
                out.setdefault(key, torch.zeros(expected[key].shape, dtype=expected[key].dtype))
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        parts = ["the checkpoint does not match a HazyResearch BASED model of this config"]
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        raise ConversionError("; ".join(parts))
    wrong = [
        f"{k} {tuple(out[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items() if out[k].shape != v.shape
    ]
    if wrong:
        raise ConversionError(f"tensor shapes do not match the config: {_describe(wrong)}")
    return out


def state_dict_to_hazyresearch(model: BasedForCausalLM) -> dict[str, torch.Tensor]:
    """Their names for our weights (a zero conv bias is left out, as their default conv has none)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith(".mixer.conv.bias") and not v.any():
            continue
        out[re.sub(r"\.mixer\.conv\.", ".mixer.conv.conv.", k)] = v.detach().clone()
    out["lm_head.weight"] = out["transformer.embeddings.word_embeddings.weight"].clone()
    return out


def _locate(checkpoint: str | Path, config: str | Path | None) -> tuple[Path, Path]:
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        found = [checkpoint / f for f in WEIGHT_FILES if (checkpoint / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{checkpoint} holds neither of {WEIGHT_FILES}")
        config = config or checkpoint / "config.json"
        checkpoint = found[0]
    elif not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {checkpoint}")
    if config is None:
        raise FileNotFoundError("pass their config.json (--config) with a checkpoint file")
    if Path(config).is_dir():
        raise FileNotFoundError(f"config {config} is a folder: pass their config.json file (--config)")
    if not Path(config).is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    return checkpoint, Path(config)


def load_hazyresearch(checkpoint: str | Path, config: str | Path | None = None) -> BasedForCausalLM:
    """Our model (fp32 unless the checkpoint is in another dtype) from their weights file and config.json;
    `checkpoint` may also be a directory holding both."""
    weights, config_path = _locate(checkpoint, config)
    try:
        cfg = json.loads(config_path.read_bytes())
    except ValueError as e:  # invalid JSON, or not UTF-8
        raise ConversionError(f"{config_path} is not valid JSON: {e}") from None
    try:
        our_config = config_from_hazyresearch(cfg)
    except (ValueError, TypeError) as e:  # ours, BasedConfig's, or a field of the wrong type
        raise ConversionError(f"{config_path}: {e}") from None
    sd = read_state_dict(weights)  # its errors name the file
    try:
        sd = state_dict_from_hazyresearch(drop_fixed_decay(sd, cfg), our_config)
    except ConversionError as e:
        raise ConversionError(f"{weights} with {config_path}: {e}") from None
    dtype = sd["transformer.embeddings.word_embeddings.weight"].dtype
    if not dtype.is_floating_point:  # the model would be cast to it: integer "weights" are no model
        raise ConversionError(f"{weights} holds {dtype} embeddings, not floating-point weights")
    model = BasedForCausalLM(our_config).to(dtype)
    model.load_state_dict({**sd, "lm_head.weight": sd["transformer.embeddings.word_embeddings.weight"]})
    return model.eval()


def save_hazyresearch(model: BasedForCausalLM, out: str | Path) -> Path:
    """Write their layout: pytorch_model.bin and config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_hazyresearch(model.config), indent=2))
    torch.save(state_dict_to_hazyresearch(model), out / "pytorch_model.bin")
    return out

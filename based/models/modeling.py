"""The BASED language model (and Transformer++, the same code with every mixer "attention").

Block i: x = x + mixer_i(norm1(x)); x = x + mlp(norm2(x)). Names follow the HazyResearch reference
(transformer.embeddings.word_embeddings, transformer.layers.{i}.{norm1, mixer, norm2, mlp}, transformer.ln_f,
tied lm_head) so its checkpoints convert by renaming a few keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from ..generation.hf import BasedGenerationMixin
from ..layers import (
    H3, RWKV, Attention, BaseConv, FeatureMapLinearAttention, Hyena, LightningAttention, LinearAttention, Mamba,
    Mamba2, RMSNorm, SlidingWindowAttention, SwiGLU,
)
from ..ops import FEATURE_MAPS
from ..layers.state import Offset, State
from .config import BasedConfig


def build_mixer(config: BasedConfig, kind: str, layer_idx: int) -> nn.Module:
    d = config.d_model
    if kind == "base_conv":
        return BaseConv(d, kernel_size=config.conv_kernel_size, expand=config.conv_expand, layer_idx=layer_idx)
    if kind == "linear_attn" and config.feature_map in FEATURE_MAPS:
        return LinearAttention(
            d, feature_dim=config.feature_dim, num_heads=config.la_num_heads, head_dim=config.la_head_dim,
            feature_map=config.feature_map, eps=config.la_eps, fold_every=config.la_fold_every, layer_idx=layer_idx,
        )
    if kind == "linear_attn":
        return FeatureMapLinearAttention(
            d, config.feature_map, feature_dim=config.feature_dim, num_heads=config.la_num_heads,
            head_dim=config.la_head_dim, num_features=config.la_num_features,
            max_seq_len=config.max_position_embeddings, eps=config.la_eps, layer_idx=layer_idx,
        )
    if kind == "sliding_window":
        return SlidingWindowAttention(
            d, config.swa_num_heads, config.window_size, rotary_base=config.rotary_base, layer_idx=layer_idx
        )
    if kind == "attention":
        return Attention(d, config.attn_num_heads, rotary_base=config.rotary_base, layer_idx=layer_idx)
    if kind == "mamba":
        return Mamba(d, d_state=config.ssm_state_size, expand=config.ssm_expand, layer_idx=layer_idx)
    if kind == "lightning":
        return LightningAttention(
            d, num_heads=config.lightning_num_heads, num_layers=config.n_layer, layer_idx=layer_idx
        )
    if kind == "mamba2":
        return Mamba2(
            d, d_state=config.ssm_state_size, expand=config.ssm_expand, headdim=config.mamba2_headdim,
            layer_idx=layer_idx,
        )
    if kind == "rwkv":
        return RWKV(d, head_size=config.rwkv_head_size, n_layer=config.n_layer, layer_idx=layer_idx)
    if kind == "h3":
        return H3(d, d_state=config.h3_state_size, layer_idx=layer_idx)
    if kind == "hyena":
        return Hyena(
            d, max_seq_len=config.max_position_embeddings, filter_order=config.hyena_filter_order, layer_idx=layer_idx
        )
    raise ValueError(f"unknown mixer type {kind!r}")


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """[B, T] integer ids, T >= 1, every id in [0, vocab_size); one device read (aminmax)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): pass at least one token")
    lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")


class BasedBlock(nn.Module):
    """Pre-norm residual block: mixer then SwiGLU."""

    def __init__(self, config: BasedConfig, layer_idx: int):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.mixer = build_mixer(config, config.mixer_types[layer_idx], layer_idx)
        self.norm2 = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_inner)
        for proj in (self.mixer.out_proj, self.mlp.fc2):
            proj.residual_projection = True  # depth-scaled at init, see BasedPreTrainedModel._init_weights

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x), state, seqlen_offset)
        return x + self.mlp(self.norm2(x))

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset) -> torch.Tensor:
        x = x + self.mixer.step(self.norm1(x), state, seqlen_offset)
        return x + self.mlp(self.norm2(x))


class BasedEmbeddings(nn.Module):
    def __init__(self, num_embeddings: int, d_model: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(num_embeddings, d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class BasedPreTrainedModel(PreTrainedModel):
    config_class = BasedConfig
    config: BasedConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["BasedBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization leaves parameters loaded from a checkpoint untouched.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):
                # GPT-2 / Megatron: a block's two residual projections start at std / sqrt(2 * n_layer),
                # so the residual stream's variance does not grow with depth.
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, nn.Conv1d):
            # The reference leaves the short conv at PyTorch's default (kaiming-uniform): a N(0, 0.02)
            # kernel of 3 taps would all but switch the gated conv path off at init.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.weight[0].numel())
            init.uniform_(module.bias, -bound, bound)

    def state_size(self, seq_len: int) -> int:
        """Decode-state values per sequence after seq_len tokens, summed over layers (the paper's measure)."""
        return sum(block.mixer.state_size(seq_len) for block in self._blocks())

    def inference_state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Bytes of decode state for batch_size sequences at context seq_len (what
        allocate_inference_cache(batch_size, dtype, max_seq_len=seq_len) takes; linear attention is fp32)."""
        return sum(b.mixer.inference_state_bytes(seq_len, batch_size, dtype) for b in self._blocks())

    def _blocks(self) -> nn.ModuleList:
        return self.base_model.layers


class BasedModel(BasedPreTrainedModel):
    """Embeddings, blocks and the final norm; returns the last hidden state."""

    def __init__(self, config: BasedConfig):
        super().__init__(config)
        self.embeddings = BasedEmbeddings(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(BasedBlock(config, i) for i in range(config.n_layer))
        self.ln_f = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def allocate_inference_cache(
        self, batch_size: int, dtype: torch.dtype | None = None, device=None, max_seq_len: int | None = None
    ) -> list[State]:
        """Per-layer decode states (see each mixer); max_seq_len (default max_position_embeddings) sizes
        only full-attention KV caches."""
        max_seq_len = max_seq_len or self.config.max_position_embeddings
        return [b.mixer.allocate_inference_cache(batch_size, dtype, device, max_seq_len) for b in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        state: list[State] | None = None,
        seqlen_offset: Offset = 0,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        """input_ids [B, T] -> last_hidden_state [B, T, d_model]. With `state` (from
        allocate_inference_cache) every layer's decode state is filled: prefill."""
        check_input_ids(input_ids, self.config.vocab_size)
        x = self.embeddings(input_ids)
        for i, block in enumerate(self.layers):
            x = block(x, None if state is None else state[i], seqlen_offset)
        x = self.ln_f(x)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return BaseModelOutput(last_hidden_state=x) if return_dict else (x,)

    def step(self, input_ids: torch.Tensor, state: list[State], seqlen_offset: Offset) -> torch.Tensor:
        """One token per sequence: input_ids [B] or [B, 1] -> hidden [B, d_model]; states updated in place.
        Ids are not checked here: that would read a value back from the device every token."""
        x = self.embeddings(input_ids.reshape(-1))
        for block, s in zip(self.layers, state):
            x = block.step(x, s, seqlen_offset)
        return self.ln_f(x)


class BasedForCausalLM(BasedPreTrainedModel, BasedGenerationMixin):
    """BasedModel plus the (tied) LM head; logits cover the vocab_size real tokens, not the padding.
    `generate` (Hugging Face) decodes with the recurrent step: see based/generation/hf.py."""

    _tied_weights_keys = {"lm_head.weight": "transformer.embeddings.word_embeddings.weight"}

    def __init__(self, config: BasedConfig):
        super().__init__(config)
        self.transformer = BasedModel(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def allocate_inference_cache(self, batch_size: int, dtype=None, device=None, max_seq_len: int | None = None):
        return self.transformer.allocate_inference_cache(batch_size, dtype, device, max_seq_len)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        state: list[State] | None = None,
        seqlen_offset: Offset = 0,
        return_dict: bool | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
    ) -> CausalLMOutput | tuple:
        """input_ids [B, T] -> logits [B, T, vocab_size]; with labels [B, T], loss = mean cross-entropy of
        logits[:, t] against labels[:, t + 1] over labels != -100 (labels are shifted here).

        With `cache` (a based.generation.InferenceState, as generate passes it) the call prefills or
        advances it and returns the last position's logits only; attention_mask marks left padding."""
        if cache is not None:
            return self.forward_with_cache(input_ids, cache, attention_mask, return_dict)
        self.check_no_padding(attention_mask)
        hidden = self.transformer(input_ids, state=state, seqlen_offset=seqlen_offset, return_dict=False)[0]
        logits = self._logits(hidden)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
                )
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutput(loss=loss, logits=logits)

    def step(self, input_ids: torch.Tensor, state: list[State], seqlen_offset: Offset) -> torch.Tensor:
        """Decode one token per sequence: input_ids [B] or [B, 1] -> logits [B, vocab_size]."""
        return self._logits(self.transformer.step(input_ids, state, seqlen_offset))

"""The BASED language model (and Transformer++, the same code with every mixer "attention").

Block i: x = x + mixer_i(norm1(x)); x = x + mlp(norm2(x)). Names follow the HazyResearch reference
(transformer.embeddings.word_embeddings, transformer.layers.{i}.{norm1, mixer, norm2, mlp}, transformer.ln_f,
tied lm_head) so its checkpoints convert by renaming a few keys.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from ..generation.hf import CACHE_KWARG, BasedGenerationMixin
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
            d, config.swa_num_heads, config.window_size, rotary_base=config.rotary_base, layer_idx=layer_idx,
            rotary=config.attn_rotary,
        )
    if kind == "attention":
        return Attention(d, config.attn_num_heads, rotary_base=config.rotary_base, layer_idx=layer_idx,
                         rotary=config.attn_rotary)
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


# Written beside the weights by save_pretrained and named in config.json's auto_map, so that
# AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) works in a process that never imported
# based: transformers imports this file, which imports the installed package (no model code is copied).
REMOTE_CODE_FILE = "modeling_based.py"
REMOTE_CODE = '''"""Model code of this checkpoint: the installed `based` package (https://pypi.org/project/based).

Written by based's save_pretrained so that transformers.AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True) loads it without `import based` first. Nothing else lives here.
"""
try:
    from based.models import BasedConfig, BasedForCausalLM, BasedModel
except ImportError as e:
    raise ImportError(
        "this checkpoint is a BASED model, whose code is the `based` package, which is not installed: "
        "pip install based (or `pip install -e .` in a clone of its repository)"
    ) from e

__all__ = ["BasedConfig", "BasedForCausalLM", "BasedModel"]
'''
AUTO_MAP = {
    name: f"{REMOTE_CODE_FILE[:-3]}.{cls}"
    for name, cls in (("AutoConfig", "BasedConfig"), ("AutoModel", "BasedModel"),
                      ("AutoModelForCausalLM", "BasedForCausalLM"))
}


def write_remote_code(directory: str | os.PathLike) -> None:
    """Make a saved model directory (config.json written) loadable with trust_remote_code and no prior
    `import based`: REMOTE_CODE_FILE beside the weights, auto_map in config.json."""
    config_file = os.path.join(directory, "config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    config["auto_map"] = AUTO_MAP
    with open(config_file, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with open(os.path.join(directory, REMOTE_CODE_FILE), "w", encoding="utf-8") as f:
        f.write(REMOTE_CODE)


class BasedPreTrainedModel(PreTrainedModel):
    config_class = BasedConfig
    config: BasedConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["BasedBlock"]
    # gradient_checkpointing_enable() (or activation_checkpointing_enable) recomputes each block in the
    # backward instead of keeping its activations: see BasedModel.forward.
    supports_gradient_checkpointing = True

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

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save_pretrained, plus REMOTE_CODE_FILE and config.json's auto_map naming it."""
        # A class loaded through trust_remote_code gets _auto_class set, and transformers would then copy
        # this module's source (relative imports that cannot work there) and point auto_map at it.
        self._auto_class = self.config._auto_class = None
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)

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

    # Set (with _gradient_checkpointing_func) by transformers' gradient_checkpointing_enable.
    gradient_checkpointing = False

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

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The block input [B, T, d_model]: exactly one of input_ids [B, T] or inputs_embeds [B, T, d_model]."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_input_ids(input_ids, self.config.vocab_size)
            return self.embeddings(input_ids)
        d = self.config.d_model
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d or 0 in inputs_embeds.shape:
            raise ValueError(f"inputs_embeds must be [batch, seq_len, {d}], got shape {tuple(inputs_embeds.shape)}")
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        state: list[State] | None = None,
        seqlen_offset: Offset = 0,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutput | tuple:
        """input_ids [B, T] (or inputs_embeds [B, T, d_model]) -> last_hidden_state [B, T, d_model]. With
        `state` (from allocate_inference_cache) every layer's decode state is filled: prefill.

        output_hidden_states: also return hidden_states, n_layer + 1 tensors as in transformers' causal
        LMs: the embeddings, each block's input after that, and last the final norm's output.
        return_dict=False gives the same fields as a tuple (those that are not None)."""
        x = self.embed(input_ids, inputs_embeds)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = ()
        # Gradient checkpointing keeps only each block's input and recomputes the block in the backward.
        # Never with a decode state: the recompute would advance the state a second time.
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and state is None
        for i, block in enumerate(self.layers):
            if output_hidden_states:
                hidden_states += (x,)
            if checkpointing:
                x = self._gradient_checkpointing_func(block.__call__, x, None, seqlen_offset)
            else:
                x = block(x, None if state is None else state[i], seqlen_offset)
        x = self.ln_f(x)
        if output_hidden_states:
            hidden_states += (x,)
        out = BaseModelOutput(last_hidden_state=x, hidden_states=hidden_states or None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()

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
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        state: list[State] | None = None,
        seqlen_offset: Offset = 0,
        return_dict: bool | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
        output_attentions: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids [B, T] (or inputs_embeds [B, T, d_model]) -> logits [B, T, vocab_size]; with labels
        [B, T], loss = mean cross-entropy of logits[:, t] against labels[:, t + 1] over labels != -100
        (labels are shifted here). Keywords follow transformers' causal LMs (LlamaForCausalLM):

        output_hidden_states: hidden_states, n_layer + 1 tensors (see BasedModel.forward).
        return_dict=False: a tuple of the fields that are not None (loss, logits, cache, hidden_states).
        use_cache=True: also return the decode state this forward filled (a based.generation.InferenceState,
            in the output's cache field); pass it back as `cache` (or past_key_values) to continue. Off by
            default (None = False): filling a state costs time and memory a training forward does not need.
        cache / past_key_values: an InferenceState (as generate passes it): the call prefills or advances it
            and returns the last position's logits only, [B, 1, vocab_size]; attention_mask marks left padding.
        output_attentions: there are no attention weights to return in most mixers: True is refused."""
        if output_attentions:
            raise ValueError("output_attentions is not supported: BASED's mixers have no attention matrix to return")
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            if inputs_embeds is not None or labels is not None or output_hidden_states:
                raise ValueError("with a cache, pass input_ids only (no inputs_embeds, labels or output_hidden_states)")
            return self.forward_with_cache(input_ids, cache, attention_mask, return_dict)
        self.check_no_padding(attention_mask)
        if use_cache:
            if state is not None:
                raise ValueError("pass either state or use_cache=True, not both")
            from ..generation.state import InferenceState

            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            cache = InferenceState.allocate(self, batch)
            state = cache.layers
        out = self.transformer(
            input_ids, state=state, seqlen_offset=seqlen_offset, return_dict=True, inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        logits = self._logits(out.last_hidden_state)
        if cache is not None:
            T = logits.shape[1]
            cache.seqlen_offset += T
            cache.columns += T
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} must equal the input's [batch, seq_len] {tuple(logits.shape[:2])}"
                )
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_KWARG: cache})
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return result if return_dict else result.to_tuple()

    def step(self, input_ids: torch.Tensor, state: list[State], seqlen_offset: Offset) -> torch.Tensor:
        """Decode one token per sequence: input_ids [B] or [B, 1] -> logits [B, vocab_size]."""
        return self._logits(self.transformer.step(input_ids, state, seqlen_offset))

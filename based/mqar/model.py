"""The 2-layer MQAR models of the BASED paper's figure 2 (Zoology's arxiv24_based_figure2 sweep).

Two layouts:

- "paper" (default), as Zoology's configs build each family:
  * Mamba, Mamba-2: two layers of the mixer in Mamba's own block, x = x + mixer(rmsnorm(x)), and its
    initialisation (torch's default for weights, Linear biases zero, out_proj kaiming-uniform / sqrt(2)).
  * H3, Hyena: two layers of the mixer itself (H3 with N = d_model / 4 and head_dim 2).
  * every other mixer (Based, attention, sliding window, ...): [BaseConv, mixer], Zoology's "Hybrid"; its
    BaseConv is Zoology's, y = conv(x) * linear(x) + x (kernel 3).
  H3, Hyena and the hybrids sit in Zoology's TransformerBlock with an identity state mixer (no MLP):
  x = x + mixer(layernorm1(x)), then x = x + layernorm2(x) (the identity "MLP" adds its normalised input
  to the residual), with every nn.Linear (the Hyena filter's MLP too) at N(0, 0.02), biases zero and the
  mixers' out_proj at N(0, 0.02 / sqrt(2 * n_layer)) (H3's output projection, `output_linear` there, is
  not rescaled). All: tied embeddings at N(0, 0.02), no position embedding, a final LayerNorm. Softmax
  attention (full and sliding-window) has no rotary embeddings either, as Zoology's MHA and SlidingAttn:
  positions reach it through the BaseConv before it.
  Zoology's embedding dropout (0.1) is left out (`embed_dropout` puts it back): stacked and separate
  training must give the same models.
- "conv_hybrid": the layout this package used before (labelled so in results): [BaseConv, mixer] for
  every mixer, the LM's BaseConv (in/out projections, SiLU), pre-norm RMSNorm residual blocks, torch's
  default init, one layer of the mixer under test.

Mixers are built by based.models.build_mixer from a BasedConfig (H3's head_dim read from the config's
`h3_head_dim`), so the mixers measured here are those of the language models.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import H3, RMSNorm
from ..models import BasedConfig
from ..models.modeling import build_mixer
from ..ops.conv import short_conv
from ..ops.norm import layer_norm, rms_norm

LAYOUTS = ("paper", "conv_hybrid")
# Zoology's figure 2 stacks two of these mixers; every other mixer follows a BaseConv.
STACKED_MIXERS = ("mamba", "mamba2", "h3", "hyena")
MAMBA_BLOCK_MIXERS = ("mamba", "mamba2")


def paper_mixer_kwargs(mixer: str, d_model: int) -> dict:
    """BasedConfig fields figure 2 sets for a mixer at this width: H3 N = d_model / 4, head_dim 2; softmax
    attention (full and sliding-window) without rotary embeddings, as Zoology's MHA and SlidingAttn."""
    if mixer == "h3":
        return {"h3_state_size": max(2, d_model // 4), "h3_head_dim": 2}
    if mixer in ("attention", "sliding_window"):
        return {"attn_rotary": False}
    return {}


def paper_mixer_types(mixer: str) -> list[str]:
    """Layer layout of figure 2's model for `mixer`."""
    return [mixer, mixer] if mixer in STACKED_MIXERS else ["base_conv", mixer]


def mqar_config(
    mixer: str, d_model: int, vocab_size: int, max_seq_len: int = 2048, layout: str = "paper", **mixer_kwargs
) -> BasedConfig:
    """BasedConfig of an MQAR model in `layout` ("paper" or "conv_hybrid", module docstring), one head
    everywhere (as in Zoology's sweep); `mixer_kwargs` any BasedConfig fields (feature_dim, window_size,
    ssm_state_size, ...), which override the paper's per-family settings."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    heads = dict(la_num_heads=1, swa_num_heads=1, attn_num_heads=1)
    if layout == "paper":
        mixer_types, defaults = paper_mixer_types(mixer), paper_mixer_kwargs(mixer, d_model)
    else:
        mixer_types, defaults = ["base_conv", mixer], {}
    return BasedConfig(
        vocab_size=vocab_size, d_model=d_model, n_layer=2, mixer_types=mixer_types, conv_kernel_size=3,
        max_position_embeddings=max_seq_len, pad_vocab_size_multiple=1, mqar_layout=layout,
        **{**heads, **defaults, **mixer_kwargs},
    )


class ZoologyBaseConv(nn.Module):
    """Zoology's BaseConv (the MQAR sweep's, not the LM's): y = conv(x) * projection(x) + x, conv a causal
    depthwise conv of kernel_size taps with bias, projection a d_model x d_model Linear with bias.

    Args:
        d_model: width; kernel_size: taps (3 in figure 2).
    """

    def __init__(self, d_model: int, kernel_size: int = 3):
        super().__init__()
        self.d_model, self.kernel_size = d_model, kernel_size
        self.projection = nn.Linear(d_model, d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Conv1d padded by K - 1 on both sides, its first T outputs kept: the causal short_conv (its fused
        # kernel on CUDA, with a vmap rule for the stacked sweep).
        u, _ = short_conv(x, self.conv.weight.squeeze(1), self.conv.bias)
        return u * self.projection(x) + x

    def state_size(self, seq_len: int) -> int:
        return self.d_model * self.kernel_size


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters) through based.ops.norm: on CUDA a fused kernel whose vmap rule keeps each
    stacked run's weight and bias inside it (PyTorch batches them as separate elementwise kernels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """x + self(x) (Zoology's identity MLP after its norm), on CUDA one fused kernel each way."""
        return layer_norm(x, self.weight, self.bias, self.eps, residual=True)


class StackableRMSNorm(RMSNorm):
    """based.layers.RMSNorm (same parameter and arithmetic) through based.ops.norm, as LayerNorm above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _layout(config: BasedConfig) -> str:
    return getattr(config, "mqar_layout", "conv_hybrid")


def _build(config: BasedConfig, kind: str, layer_idx: int) -> nn.Module:
    if kind == "base_conv" and _layout(config) == "paper":
        return ZoologyBaseConv(config.d_model, config.conv_kernel_size)
    if kind == "h3":
        return H3(config.d_model, d_state=config.h3_state_size, head_dim=getattr(config, "h3_head_dim", 1),
                  layer_idx=layer_idx)
    return build_mixer(config, kind, layer_idx)


class MQARModel(nn.Module):
    """input_ids [B, T] -> logits [B, T, vocab_size]; training and evaluation call head() on the query
    positions only (a quarter of the tokens or fewer), which at vocabulary 8192 saves most of the work.

    Args:
        config: from mqar_config (its `mqar_layout` picks the layout; a config without one is "conv_hybrid").
        embed_dropout: dropout on the embeddings in training (Zoology: 0.1; default 0, module docstring).
    """

    def __init__(self, config: BasedConfig, embed_dropout: float = 0.0):
        super().__init__()
        self.config = config
        self.layout = _layout(config)
        if self.layout not in LAYOUTS:
            raise ValueError(f"config.mqar_layout must be one of {LAYOUTS}, got {self.layout!r}")
        d = config.d_model
        self.embeddings = nn.Embedding(config.vocab_size, d)
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.mixers = nn.ModuleList(_build(config, kind, i) for i, kind in enumerate(config.mixer_types))
        # Mamba's block: rmsnorm -> mixer -> add; Zoology's TransformerBlock: layernorm -> mixer -> add, then
        # the identity state mixer adds layernorm2(x).
        self.mamba_block = self.layout == "paper" and config.mixer_types[-1] in MAMBA_BLOCK_MIXERS
        if self.layout == "conv_hybrid":
            self.norms = nn.ModuleList(StackableRMSNorm(d) for _ in config.mixer_types)
            self.ln_f = StackableRMSNorm(d)
        elif self.mamba_block:
            self.norms = nn.ModuleList(StackableRMSNorm(d, eps=1e-5) for _ in config.mixer_types)
            self.ln_f = LayerNorm(d)
        else:
            self.norms = nn.ModuleList(LayerNorm(d) for _ in config.mixer_types)
            self.norms2 = nn.ModuleList(LayerNorm(d) for _ in config.mixer_types)
            self.ln_f = LayerNorm(d)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.normal_(self.embeddings.weight, std=0.02)  # tied head: small logits at init
        if self.layout == "conv_hybrid":
            return
        n_layer = len(self.mixers)
        for mixer in self.mixers:
            out_proj = getattr(mixer, "out_proj", None)
            if self.mamba_block:
                for m in mixer.modules():
                    if isinstance(m, nn.Linear) and m.bias is not None:
                        nn.init.zeros_(m.bias)
                nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
                out_proj.weight /= math.sqrt(n_layer)
                continue
            for m in mixer.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            if isinstance(out_proj, nn.Linear) and not isinstance(mixer, H3):
                nn.init.normal_(out_proj.weight, std=0.02 / math.sqrt(2 * n_layer))

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> final hidden states [B, T, d_model]."""
        x = self.embed_dropout(self.embeddings(input_ids))
        if self.layout == "paper" and not self.mamba_block:
            for norm, mixer, norm2 in zip(self.norms, self.mixers, self.norms2):
                x = x + mixer(norm(x))
                x = norm2.residual(x)  # x + norm2(x)
        else:
            for norm, mixer in zip(self.norms, self.mixers):
                x = x + mixer(norm(x))
        return self.ln_f(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d_model] -> logits [..., vocab_size] (tied embeddings)."""
        return hidden @ self.embeddings.weight.T

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(input_ids))

    def state_size(self, seq_len: int) -> int:
        """Recurrent state per sequence, the paper's x-axis. "paper": summed over the layers, as Zoology
        counts it (two Mamba layers hold twice one's state; a hybrid adds its BaseConv's d_model * 3);
        "conv_hybrid": the mixer under test only (layer 1)."""
        if self.layout == "paper":
            return sum(m.state_size(seq_len) for m in self.mixers)
        return self.mixers[-1].state_size(seq_len)

"""The 2-layer MQAR model of Zoology and the BASED paper (section 3, figure 2).

Layer 0 is a BaseConv with kernel 3 (it lets a token see its predecessor, which recall needs: a key's
value sits one position after it); layer 1 is the mixer under test. Pre-norm residual blocks without MLPs,
no position embedding, tied input and output embeddings. Mixers are built by based.models.build_mixer from
a BasedConfig, so the mixers measured here are exactly those of the language models.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import RMSNorm
from ..models import BasedConfig
from ..models.modeling import build_mixer


def mqar_config(mixer: str, d_model: int, vocab_size: int, max_seq_len: int = 2048, **mixer_kwargs) -> BasedConfig:
    """BasedConfig of an MQAR model: ["base_conv", mixer], one head everywhere (as in Zoology's sweep),
    `mixer_kwargs` any BasedConfig fields (feature_dim, feature_map, window_size, ssm_state_size, ...)."""
    heads = dict(la_num_heads=1, swa_num_heads=1, attn_num_heads=1)
    return BasedConfig(
        vocab_size=vocab_size, d_model=d_model, n_layer=2, mixer_types=["base_conv", mixer], conv_kernel_size=3,
        max_position_embeddings=max_seq_len, pad_vocab_size_multiple=1, **{**heads, **mixer_kwargs},
    )


class MQARModel(nn.Module):
    """input_ids [B, T] -> logits [B, T, vocab_size]; training and evaluation call head() on the query
    positions only (a quarter of the tokens or fewer), which at vocabulary 8192 saves most of the work.

    Args:
        config: from mqar_config.
    """

    def __init__(self, config: BasedConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embeddings = nn.Embedding(config.vocab_size, d)
        nn.init.normal_(self.embeddings.weight, std=0.02)  # tied head: small logits at init
        self.norms = nn.ModuleList(RMSNorm(d) for _ in config.mixer_types)
        self.mixers = nn.ModuleList(build_mixer(config, kind, i) for i, kind in enumerate(config.mixer_types))
        self.ln_f = RMSNorm(d)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> final hidden states [B, T, d_model]."""
        x = self.embeddings(input_ids)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return self.ln_f(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d_model] -> logits [..., vocab_size] (tied embeddings)."""
        return hidden @ self.embeddings.weight.T

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(input_ids))

    def state_size(self, seq_len: int) -> int:
        """Recurrent state of the mixer under test (layer 1), values per sequence: the paper's x-axis."""
        return self.mixers[-1].state_size(seq_len)

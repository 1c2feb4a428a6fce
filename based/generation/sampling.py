"""Sampling from logits with tensor ops only: no value is read back to the host, so the whole decode step
(model step + sampling) can be captured in a CUDA graph (as in gpt-fast)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.argmax import argmax_rows


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Args:
        temperature: 0 = greedy (argmax); else logits / temperature, any finite value > 0: a temperature
            so small that 1 / temperature overflows float32 samples among the most likely tokens (greedy
            but for exact ties); inf is refused (it would erase the model's ranking that top-k/top-p use).
        top_k: keep the k most likely tokens (None = all).
        top_p: keep the smallest set of most likely tokens holding probability >= top_p (nucleus; 1 = all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
            self.temperature >= 0
        ):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.temperature == float("inf"):
            raise ValueError(
                "temperature must be finite, got inf: it would make every token equally likely (uniform noise); "
                "use a large finite value such as 100 for a flat distribution"
            )
        top_k = self.top_k
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row.

    Args:
        logits: [B, V]
        params: temperature, top_k, top_p.
        generator: random source (default: torch's global one, which a CUDA graph replays correctly).
    Returns:
        ids [B] (long)
    """
    if params.greedy:
        return argmax_rows(logits)  # a Triton pass over the logits at large batch on CUDA
    logits = logits.float()
    # (logits - max) / T: the best token's scaled logit is exactly 0 and the others are <= 0, so neither a
    # tiny T (whose reciprocal is capped at float32's max instead of becoming inf, and inf * 0 = NaN) nor a
    # huge one can overflow softmax; subtracting the row's max leaves softmax unchanged.
    inv_temperature = min(1 / params.temperature, torch.finfo(torch.float32).max)
    logits = (logits - logits.amax(-1, keepdim=True)) * inv_temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the more likely ones already hold top_p of the mass; the first always stays.
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # argmax(p / q) with q ~ Exp(1) draws from p (the exponential race, i.e. the Gumbel-max trick) without
    # torch.multinomial's host sync. q is kept away from 0 so that a masked token (p = 0) never gets 0/0.
    q = torch.empty_like(probs).exponential_(1, generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / q).argmax(-1)

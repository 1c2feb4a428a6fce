"""Sampling with per-slot parameters and per-slot seeds, in tensor ops only (a captured decode step can hold it).

A server runs many requests in one batch of slots, each with its own temperature, top-k, top-p and seed.
Those live here as device tensors [B] that the host writes when a request joins a slot, so one captured
step serves any mix of them. The randomness is counter-based: the noise of token v at position p of a slot
is a hash of (seed, p, v), computed on the device. A seeded request therefore draws the same tokens whatever
else shares the batch, whichever slot it lands in and however many steps ran before it joined (a generator
state shared by the batch would give each request whatever numbers the others left).
"""
from __future__ import annotations

import torch

from .state import to_device

# Temperatures below this are greedy: a tiny one overflows the scaled logits to inf (softmax then takes
# inf - inf = NaN), and below 1e-5 a draw is the argmax anyway unless two logits are within ~1e-4.
GREEDY_BELOW = 1e-5

_M32 = 0xFFFFFFFF
SAMPLER_BLOCK_ELEMENTS = 1 << 24  # logits sampled at once by SlotSampling.sample (rows x vocabulary)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32). Products may wrap past
    2^63; their low 32 bits, all that is kept, are exact either way."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def counter_uniform(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform noise in (0, 1), [B, V]: element (b, v) is a function of (seed[b], position[b], v) only.

    Args:
        seed: long [B], any 64-bit value.
        position: long [B], the position of the token being drawn.
    """
    key = _mix32((seed & _M32) ^ _mix32(((seed >> 32) & _M32) + 0x9E3779B9))
    key = _mix32(key ^ _mix32((position & _M32) + 0x7F4A7C15))  # [B]
    v = torch.arange(vocab_size, device=seed.device, dtype=torch.long)
    h = _mix32((key[:, None] + v * 0x9E3779B9) & _M32)  # [B, V]
    # 24 bits: exactly representable in fp32, so u is never 0 or 1.
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample_slots(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    position: torch.Tensor,
) -> torch.Tensor:
    """Next token per row, each row with its own parameters.

    Args:
        logits: [B, V]
        temperature: float [B]; below GREEDY_BELOW the row is greedy (argmax).
        top_k: long [B], 0 = all tokens.
        top_p: float [B] in (0, 1], 1 = all tokens.
        seed, position: long [B], the key of the row's noise (counter_uniform).
    Returns:
        ids [B] (long)
    """
    logits = logits.float()
    B, V = logits.shape
    greedy = temperature < GREEDY_BELOW
    best = logits.argmax(-1)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp_max(V), V)
    ordered = ordered.masked_fill(rank[None] >= k[:, None], float("-inf"))
    probs = ordered.softmax(-1)
    # Nucleus: drop a token once the more likely ones already hold top_p of the mass; the first always stays.
    ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], float("-inf"))
    # Gumbel-max: argmax(logit + Gumbel noise) draws from softmax(logit), with no host sync.
    gumbel = -torch.log(-torch.log(counter_uniform(seed, position, V).gather(1, order)))
    choice = (ordered + gumbel).argmax(-1, keepdim=True)
    return torch.where(greedy, best, order.gather(1, choice)[:, 0])


class SlotSampling:
    """Every slot's sampling parameters as device tensors [B], written by the host when a request joins.

    `any_random` (host side) says whether some active slot samples: a decoder can then take the plain argmax
    step while every slot is greedy.
    """

    def __init__(self, batch_size: int, device):
        self.temperature = torch.zeros(batch_size, device=device)
        self.top_k = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.top_p = torch.ones(batch_size, device=device)
        self.seed = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._random: set[int] = set()

    @property
    def any_random(self) -> bool:
        return bool(self._random)

    def set(self, slots: list[int], temperature: list[float], top_k: list[int], top_p: list[float],
            seed: list[int]) -> None:
        """Parameters of the requests joining `slots` (one value per slot; checked by the caller)."""
        index = to_device(slots, self.temperature.device, torch.long)
        for t, values in ((self.temperature, temperature), (self.top_k, top_k), (self.top_p, top_p),
                          (self.seed, seed)):
            t[index] = to_device(values, t.device, t.dtype)
        for s, temp, k in zip(slots, temperature, top_k):
            if temp >= GREEDY_BELOW and k != 1:
                self._random.add(s)
            else:
                self._random.discard(s)

    def clear(self, slots: list[int]) -> None:
        self._random.difference_update(slots)

    def move(self, src: list[int], dst: list[int]) -> None:
        """The host side of Decoder.move: which slots sample follows their sequences."""
        moved = {d for s, d in zip(src, dst) if s in self._random}
        self._random.difference_update(src)
        self._random |= moved

    def sample(self, logits: torch.Tensor, position: torch.Tensor, slots: torch.Tensor | None = None,
               rows: int | None = None) -> torch.Tensor:
        """sample_slots with the parameters of `slots` (an index), else of the first `rows` slots (default all),
        one row of logits [n, V] and one position each."""
        params = (self.temperature, self.top_k, self.top_p, self.seed)
        if slots is not None:
            params = tuple(p[slots] for p in params)
        elif rows is not None:
            params = tuple(p[:rows] for p in params)
        # In blocks of rows: the sampler's sort, indices and hashes take ~40 bytes per logit, 18 GB for 8,800
        # slots of a 50k vocabulary at once (kept reserved by a captured step's memory pool).
        n = logits.shape[0]
        block = max(1, SAMPLER_BLOCK_ELEMENTS // max(1, logits.shape[1]))
        if n <= block:
            return sample_slots(logits, *params, position)
        return torch.cat([
            sample_slots(logits[i:i + block], *(p[i:i + block] for p in params), position[i:i + block])
            for i in range(0, n, block)
        ])

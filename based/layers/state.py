"""Decode-state conventions shared by the token mixers.

A mixer's decode state is a tuple of tensors whose dim 0 is the sequence slot, so a slot can be reset,
copied or evicted the same way for every mixer (continuous batching). The position of a token comes
from the caller as `seqlen_offset`: a python int (every sequence at the same position) or a LongTensor
[B] (one position per sequence, e.g. left-padded batches). A sequence at offset 0 starts from an empty
state; at offset p > 0 the state holds its tokens 0 .. p-1.
"""
from __future__ import annotations

import torch

Offset = int | torch.Tensor
State = tuple[torch.Tensor, ...]


def token_positions(seqlen_offset: Offset, batch_size: int, seq_len: int, device) -> torch.Tensor:
    """Positions [B, T] (long) of T new tokens that start at `seqlen_offset` (for one token and a long
    offset tensor, a view of it: a decode step then launches no kernel for its positions)."""
    if isinstance(seqlen_offset, torch.Tensor):
        start = seqlen_offset.to(device=device, dtype=torch.long).reshape(-1, 1)
        if seq_len == 1:
            return start.expand(batch_size, 1)
    else:
        start = torch.full((1, 1), int(seqlen_offset), device=device, dtype=torch.long)
    return (start + torch.arange(seq_len, device=device)).expand(batch_size, seq_len)


def carried_state(state: State, seqlen_offset: Offset) -> State | None:
    """The state a prefill continues from: None (empty) at offset 0, else `state`, per sequence."""
    if not isinstance(seqlen_offset, torch.Tensor):
        return None if seqlen_offset == 0 else state
    # Masked rather than branched on, so that no value has to be read back from the device.
    keep = seqlen_offset.reshape(-1) != 0
    return tuple(s * keep.view(-1, *([1] * (s.dim() - 1))).to(s.dtype) for s in state)


def state_nbytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state)


def check_fits(cache_len: int, seqlen_offset: Offset, T: int, what: str) -> None:
    """Raises if T tokens from `seqlen_offset` reach past a preallocated state of `cache_len` positions.

    Only int offsets are checked: reading a tensor offset back would stall a captured decode step.
    """
    if isinstance(seqlen_offset, int) and seqlen_offset + T > cache_len:
        raise ValueError(
            f"positions up to {seqlen_offset + T - 1} do not fit {what} of {cache_len} tokens "
            f"(allocate_inference_cache max_seq_len)"
        )

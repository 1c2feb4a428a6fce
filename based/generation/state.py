"""InferenceState: every layer's decode state for a batch of sequence slots, plus each slot's position.

Slots are dim 0 of every state tensor (based/layers/state.py), so a sequence can join or leave a running
batch without touching the others (continuous batching): prefill into a slot, step every slot at once,
reset a slot when its sequence is done. The position of each slot's next token lives on the device
(`seqlen_offset`, LongTensor [B]) so that a captured decode step can advance it without a host sync.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..layers.state import State, state_nbytes


def to_device(values, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list or a CPU tensor) on `device` without waiting for the device.

    `torch.tensor(values, device="cuda")` copies from pageable memory, which first waits for everything queued
    on the stream: in a serving loop that is the decode step just launched, so the host would sit idle for a
    whole step at every slot that joins or leaves. From pinned memory the copy is queued behind that step
    instead (PyTorch's host allocator keeps the pinned block until the copy has run).
    """
    t = torch.as_tensor(values, dtype=dtype)
    device = torch.device(device)
    if (t.device == device or device.type != "cuda" or t.device.type != "cpu"
            or os.environ.get("BASED_BLOCKING_COPIES") == "1"):  # the old blocking copy, for A/B timing only
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def full_attention_limit(model) -> int | None:
    """max_position_embeddings if any layer's state grows with the context (its mixer's
    `state_grows_with_context`: full attention's KV cache, Hyena's history of long-conv inputs); None for
    models without such a limit (BASED: linear attention, windows, convs)."""
    for block in model.transformer.layers:
        if getattr(block.mixer, "state_grows_with_context", False):
            return model.config.max_position_embeddings
    return None


# The most tokens one generation may ask for (based serve's max_tokens, based generate's and based eval's
# --max-new-tokens): a state model has no positional bound, and past this the loops ran on without end where a
# typo asked for 10**12.
MAX_NEW_TOKENS = 2**31 - 1


def check_lengths(model, prompt_len: int, max_new_tokens: int = 0) -> None:
    """Prompt and generation lengths against the model's positional limit, where it has one."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be at most 2**31 - 1 = {MAX_NEW_TOKENS}, got {max_new_tokens}")
    if prompt_len < 1:
        raise ValueError("the prompt is empty: pass at least one token")
    limit = full_attention_limit(model)
    if limit is None:
        return
    if prompt_len > limit:
        raise ValueError(
            f"the prompt has {prompt_len} tokens, more than this model's max_position_embeddings={limit} "
            f"(full attention or Hyena): shorten the prompt"
        )
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds this model's "
            f"max_position_embeddings={limit} (full attention or Hyena): lower max_new_tokens to at most "
            f"{limit - prompt_len}"
        )


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


class InferenceState:
    """Per-layer decode states of `batch_size` slots and each slot's next position.

    Args:
        layers: one state tuple per layer (from model.allocate_inference_cache), slots in dim 0.
        seqlen_offset: LongTensor [B], the position of each slot's next token (= tokens it holds).
        max_seq_len: positions the states were sized for (full attention's KV cache length).
        dtype: dtype of the states that follow the model's (linear attention's are always fp32).
    """

    # Read by Hugging Face generate (transformers.generation.utils): this is not one of its Cache classes.
    is_compileable = False
    is_croppable = False

    def __init__(self, layers: list[State], seqlen_offset: torch.Tensor, max_seq_len: int, dtype: torch.dtype):
        self.layers = layers
        self.seqlen_offset = seqlen_offset
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        # Columns of input consumed so far, padding included (Hugging Face's get_seq_length); host-side.
        self.columns = 0

    @classmethod
    def allocate(
        cls, model, batch_size: int, dtype: torch.dtype | None = None, device=None, max_seq_len: int | None = None
    ) -> "InferenceState":
        """Zeroed states for `batch_size` slots, after checking that they fit in free memory.

        Args:
            model: a BasedForCausalLM (anything with allocate_inference_cache and inference_state_bytes).
            dtype: dtype of the non-fp32 states (default the model's); linear-attention states stay fp32.
            max_seq_len: longest context (prompt + new tokens); sizes full attention's KV cache and Hyena's
                history only.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        max_seq_len = max_seq_len or model.config.max_position_embeddings
        device = torch.device(device) if device is not None else model.device
        dtype = dtype or model.dtype
        need = model.inference_state_bytes(max_seq_len, batch_size, dtype)
        free = free_memory_bytes(device)
        hint = f"batch_size={batch_size} at max_seq_len={max_seq_len}"
        if free is not None and need > free:
            raise MemoryError(_too_big(hint, need, free, device, full_attention_limit(model) is not None))
        try:
            layers = model.allocate_inference_cache(batch_size, dtype, device, max_seq_len)
        except torch.OutOfMemoryError:
            raise MemoryError(
                _too_big(hint, need, free_memory_bytes(device), device, full_attention_limit(model) is not None)
            ) from None
        offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(layers, offsets, max_seq_len, dtype)

    @property
    def batch_size(self) -> int:
        return self.seqlen_offset.shape[0]

    @property
    def device(self) -> torch.device:
        return self.seqlen_offset.device

    @property
    def nbytes(self) -> int:
        return sum(state_nbytes(s) for s in self.layers)

    def tensors(self):
        for layer in self.layers:
            yield from layer

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> State:
        return self.layers[layer_idx]

    def __iter__(self):
        return iter(self.layers)

    def reset_slot(self, slot: int) -> None:
        """Empty one slot (its sequence left the batch); the others are untouched."""
        for t in self.tensors():
            t[slot].zero_()
        self.seqlen_offset[slot].zero_()

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()
        self.seqlen_offset.zero_()
        self.columns = 0

    def slots_view(self, slots: Sequence[int] | torch.Tensor) -> list[State] | None:
        """Per-layer views of `slots` when they are consecutive (writes go through), else None."""
        slots = [int(s) for s in slots]
        start = slots[0]
        if slots != list(range(start, start + len(slots))):
            return None
        return [tuple(t[start : start + len(slots)] for t in layer) for layer in self.layers]

    def put(self, slots: torch.Tensor, layers: list[State]) -> None:
        """Copy per-layer states of len(slots) sequences into `slots`."""
        slots = to_device(slots, self.device, torch.long)
        for mine, theirs in zip(self.layers, layers):
            for t, s in zip(mine, theirs):
                t.index_copy_(0, slots, s.to(t.dtype))

    # Hugging Face generate reads these (transformers.generation.utils); see based/generation/hf.py.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    @property
    def is_linear(self) -> list[bool]:
        # False: generate may slice off the columns already consumed when it resumes from this state.
        return [False] * len(self.layers)


def _too_big(hint: str, need: int, free: int | None, device, grows_with_context: bool) -> str:
    free_text = "unknown" if free is None else f"{free / 2**30:.2f} GiB"
    fix = "lower the batch size (--batch-size)"
    if grows_with_context:
        fix += " or the prompt + max_new_tokens length (full attention and Hyena keep every token)"
    return (
        f"the decode state for {hint} needs {need / 2**30:.2f} GiB but {free_text} is free on {device}: {fix}"
    )

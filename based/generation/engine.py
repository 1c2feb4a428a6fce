"""Prefill and one-token decode over an InferenceState; the decode step optionally captured in a CUDA graph.

Prefill runs the parallel (chunked) forward once per prompt and leaves each layer's state ready; decoding
then costs one recurrent step per token: linear attention updates its fixed-size fp32 state, sliding
window writes one row of its ring buffer, BaseConv shifts in one input. Nothing in a BASED step grows
with the context, so memory and time per token stay flat however long the generation.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..ops.argmax import argmax_rows
from .batch_sampling import SlotSampling
from .fused import FUSED_MAX_BATCH, MAX_ROWS, fused_step
from .sampling import SamplingParams, sample
from .state import InferenceState, check_lengths, full_attention_limit, to_device


def prompt_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """Real tokens per row of a left-padded batch (mask 0 = padding, all before the first real token)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if T == 0:
        raise ValueError("the prompt is empty: pass at least one token")
    if attention_mask is None:
        return [T] * B
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
        )
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(-1)
    left_padded = torch.arange(T, device=mask.device) >= (T - lengths).unsqueeze(-1)
    if not torch.equal(mask, left_padded):
        raise ValueError("attention_mask must be left-padded (zeros only before each row's first real token)")
    lengths = lengths.tolist()
    if min(lengths) == 0:
        raise ValueError(f"row {lengths.index(0)} of the batch is empty (all padding): pass at least one token")
    return lengths


@torch.no_grad()
def prefill(
    model,
    state: InferenceState,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    slots: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Run prompts through the parallel forward into fresh slots of `state`.

    Padding never enters a state: the rows of a left-padded batch are prefilled in groups of equal real
    length without their padding, so each sequence's positions start at 0 and no pad key, value or conv
    input exists anywhere (for every mixer, with no masking inside them).

    Args:
        input_ids: [n, T] prompts (left-padded if attention_mask is given).
        attention_mask: [n, T], 1 = real token, 0 = left padding.
        slots: the n slots to fill (default 0 .. n-1); whatever they held before is discarded.
    Returns:
        logits of each prompt's last token, [n, vocab_size].
    """
    lengths = prompt_lengths(input_ids, attention_mask)
    n, T = input_ids.shape
    slots = torch.arange(n) if slots is None else torch.as_tensor(slots, dtype=torch.long).reshape(-1).cpu()
    if slots.numel() != n or len(set(slots.tolist())) != n:
        raise ValueError(f"{n} prompts need {n} distinct slots, got {slots.tolist()}")
    if int(slots.min()) < 0 or int(slots.max()) >= state.batch_size:
        raise ValueError(f"slots must be in [0, {state.batch_size}), got {slots.tolist()}")
    _check_prompt(model, max(lengths), state)
    # Rows are grouped on the host and every index goes over as a queued copy (to_device): nothing here waits
    # for the device, so a server's next prefill is issued while its last decode step still runs.
    logits = None
    for L in sorted(set(lengths)):
        rows = [i for i, length in enumerate(lengths) if length == L]
        group = slots[rows]
        layers = state.slots_view(group)
        scratch = layers is None
        if scratch:  # scattered slots: prefill a scratch state, then copy it in
            layers = model.allocate_inference_cache(len(rows), state.dtype, state.device, state.max_seq_len)
        ids = to_device(input_ids[:, T - L :] if len(rows) == n else input_ids[rows, T - L :], state.device)
        hidden = model.transformer(ids, state=layers, seqlen_offset=0, return_dict=False)[0]
        group = to_device(group, state.device)
        if scratch:
            state.put(group, layers)
        state.seqlen_offset[group] = L
        out = model._logits(hidden[:, -1])
        if len(rows) == n:
            return out
        if logits is None:
            logits = out.new_empty(n, out.shape[-1])
        logits.index_copy_(0, to_device(rows, state.device, torch.long), out)
    return logits


@torch.no_grad()
def prefill_chunk(model, layers: list, input_ids: torch.Tensor, seqlen_offset: int) -> torch.Tensor:
    """Prefill the next piece of n prompts into their states, from position seqlen_offset (0 = fresh states).

    A long prompt prefilled piece by piece (into a scratch state, then `Decoder.admit`) lets a server keep
    decoding its running sequences between the pieces. The pieces give the states a prompt prefilled whole
    gives (every mixer's forward continues from the state it is handed).

    Args:
        layers: per-layer states of the n sequences (model.allocate_inference_cache(n, ...)).
        input_ids: [n, T], the tokens at positions seqlen_offset .. seqlen_offset + T - 1.
    Returns:
        logits of each piece's last token, [n, vocab_size].
    """
    hidden = model.transformer(input_ids, state=layers, seqlen_offset=seqlen_offset, return_dict=False)[0]
    return model._logits(hidden[:, -1])


def _check_prompt(model, prompt_len: int, state: InferenceState) -> None:
    check_lengths(model, prompt_len)
    if full_attention_limit(model) is not None and prompt_len > state.max_seq_len:
        raise ValueError(
            f"the prompt has {prompt_len} tokens but the state's KV cache holds {state.max_seq_len}: "
            f"allocate it with a larger max_seq_len"
        )


class Decoder:
    """Decodes a fixed batch of slots one token at a time.

    Prompts are prefilled into slots at any time (a sequence joining a running batch), every step then
    advances all slots at once, and `remove` frees a slot for the next sequence (continuous batching).
    On CUDA the step (model step, sampling, eos bookkeeping, position update) is captured once in a CUDA
    graph and replayed: a token costs one graph launch on the host instead of hundreds of kernel launches,
    and nothing is read back to the host.

    Args:
        model: a BasedForCausalLM in eval mode.
        batch_size: slots.
        max_seq_len: longest prompt + generation; sizes full attention's KV cache (default
            max_position_embeddings).
        sampling: temperature / top-k / top-p (default greedy).
        eos_token_id: int or ints; a slot that emits one is finished and emits pad_token_id after it.
        pad_token_id: what finished slots emit (default the first eos id, else 0).
        dtype: dtype of the states that follow the model's (default the model's).
        cuda_graph: capture the step in a CUDA graph (default: when the model is on CUDA).
        compile: fuse each block's step with torch.compile (see `compiled_step`); the first steps of each
            new batch size then compile (tens of seconds).
        fused: use the small-batch step of based.generation.fused (every projection one Triton kernel with
            its norm, residual, SwiGLU or short conv); default on CUDA at batch 1 (FUSED_MAX_BATCH) with the
            CUDA graph, where it is faster than `compile`, which it then replaces.
        log_len: keep each slot's last log_len tokens on the device, written by the step itself (for greedy
            decoding by the fused step's LM-head kernel), so that a caller decoding many steps takes them with
            `recent` once per block instead of copying each step's tokens (a kernel outside the graph a step).
        slot_sampling: every slot its own temperature, top-k, top-p and seed (`slots`, a
            based.generation.batch_sampling.SlotSampling; `sampling` is then unused), set by `admit`; only
            active slots advance their position (a free slot stays at 0, never past a KV cache). `step(rows)`
            then steps the first `rows` slots rounded up to a bucket, argmax while every slot is greedy, the
            per-slot sampler otherwise; on CUDA each (bucket, kind) is its own captured graph.
    """

    def __init__(
        self,
        model,
        batch_size: int,
        max_seq_len: int | None = None,
        sampling: SamplingParams | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        dtype: torch.dtype | None = None,
        cuda_graph: bool | None = None,
        compile: bool = False,
        fused: bool | None = None,
        log_len: int = 0,
        slot_sampling: bool = False,
    ):
        if isinstance(log_len, bool) or not isinstance(log_len, int) or log_len < 0:
            raise ValueError(f"log_len must be an int >= 0, got {log_len!r}")
        self.model = model
        self.sampling = sampling or SamplingParams()
        cuda = model.device.type == "cuda"
        graph = cuda_graph if cuda_graph is not None else cuda
        if fused is None:  # launched from Python, its ~170 Triton kernels a token would cost more than they save
            fused = cuda and graph and batch_size <= FUSED_MAX_BATCH
        if fused and batch_size > MAX_ROWS:
            raise ValueError(f"the fused step serves at most {MAX_ROWS} slots, got batch_size={batch_size}")
        self.step_kind = "fused" if fused else "compiled" if compile else "eager"
        self._model_step = fused_step(model) if fused else compiled_step(model) if compile else model.step
        self.state = InferenceState.allocate(model, batch_size, dtype, model.device, max_seq_len)
        device = self.state.device
        self.slots = SlotSampling(batch_size, device) if slot_sampling else None
        self.active = torch.zeros(batch_size, dtype=torch.long, device=device) if slot_sampling else None
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        vocab = model.config.vocab_size
        for name, ids in (("eos_token_id", eos), ("pad_token_id", [self.pad_token_id])):
            if any(not 0 <= i < vocab for i in ids):
                # Finished slots feed pad_token_id back into the model: it must be a real token.
                raise ValueError(f"{name} must be in [0, {vocab}), got {ids}")
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # each slot's last token
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        # The fused step takes greedy tokens in its LM-head kernel, which also advances the positions; with eos
        # ids they go to a scratch buffer first (finished slots emit pad_token_id instead).
        self._head_argmax = fused and self.sampling.greedy and not slot_sampling
        self._next = torch.zeros_like(self.tokens) if self._head_argmax and self.eos is not None else self.tokens
        self.log = torch.zeros(batch_size, log_len, dtype=torch.long, device=device) if log_len else None
        self.graph = None
        # Slot sampling: the step of the first `rows` slots, for each of `buckets` (rows grow by ~1.5x), greedy or
        # sampled; a server keeps its sequences in the lowest slots, so a step costs what its sequences need.
        self.buckets = _buckets(batch_size) if slot_sampling else []
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        if graph:
            self._capture_slots() if slot_sampling else self._capture()

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @torch.no_grad()
    def add(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        slots: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefill prompts [n, T] into `slots` (default 0 .. n-1) and sample their first new tokens [n]."""
        slots = torch.arange(input_ids.shape[0]) if slots is None else torch.as_tensor(slots).reshape(-1)
        first = sample(prefill(self.model, self.state, input_ids, attention_mask, slots), self.sampling)
        index = slots.to(self.state.device)
        self.tokens[index] = first
        self.finished[index] = torch.isin(first, self.eos) if self.eos is not None else False
        return first

    def remove(self, slot: int) -> None:
        """Free a slot: its state is cleared and it counts as finished until the next `add` into it."""
        self.state.reset_slot(slot)
        self.tokens[slot].fill_(self.pad_token_id)  # fill_: no host-to-device copy of the value (see _release)
        self.finished[slot].fill_(True)

    @torch.no_grad()
    def admit(
        self,
        slots: Sequence[int],
        lengths: Sequence[int],
        logits: torch.Tensor,
        *,
        temperature: Sequence[float],
        top_k: Sequence[int],
        top_p: Sequence[float],
        seed: Sequence[int],
        layers: list | None = None,
    ) -> torch.Tensor:
        """Start sequences in `slots` (slot_sampling only) from their prefilled prompts and sample their first
        tokens [n] with their own parameters.

        Args:
            slots: n distinct free slots.
            lengths: prompt tokens of each (the position its first new token takes).
            logits: [n, V], each prompt's last logits (from `prefill` or `prefill_chunk`).
            layers: per-layer states of the n sequences (from `prefill_chunk`) to copy into the slots; None when
                `prefill` already wrote them there.
            temperature, top_k (0 = all), top_p, seed: one value per slot (checked by the caller).
        """
        if self.slots is None:
            raise RuntimeError("admit needs a Decoder built with slot_sampling=True")
        index = to_device(list(slots), self.state.device, torch.long)
        if layers is not None:
            self.state.put(index, layers)
        positions = to_device(list(lengths), self.state.device, torch.long)
        self.state.seqlen_offset[index] = positions
        self.slots.set(list(slots), list(temperature), list(top_k), list(top_p), list(seed))
        first = self.slots.sample(logits, positions, index)
        self.tokens[index] = first
        # index_fill_, not `t[index] = 0`, which waits for the device (see _release).
        self.finished.index_fill_(0, index, False)
        self.active.index_fill_(0, index, 1)
        return first

    def free(self, slots: Sequence[int]) -> None:
        """Release slots (slot_sampling only) without clearing their states, which the next `admit`
        overwrites: two small kernels however many slots leave."""
        if not slots:
            return
        self._release(to_device(list(slots), self.state.device, torch.long))
        self.slots.clear(list(slots))

    def _release(self, index: torch.Tensor) -> None:
        """Slots `index` (a device tensor) inactive, at position 0."""
        # Not `t[index] = 0`: that sends its 0 from pageable memory, and the host waits for all queued work:
        # the decode step just launched. On an H100 free took ~19 ms a call so in the serving loop (the engine
        # profile beside benchmarks/results/serve-engine-base-h100-2026-12-08-aa2a735.json). index_fill_ takes
        # the value as an argument and queues.
        self.active.index_fill_(0, index, 0)
        self.state.seqlen_offset.index_fill_(0, index, 0)

    # Rows of a state tensor copied per index_copy_ in `move`: its gather's temporary stays ~this small
    # (a 1.3b slot holds ~15 MB of state in ~100 tensors) on a card the slots already fill.
    MOVE_BYTES = 64 << 20

    @torch.no_grad()
    def move(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Move the sequences in slots `src` to the free slots `dst` (slot_sampling only): their states,
        last tokens, positions and sampling parameters; `src` become free. A server moves its sequences into
        the lowest slots as others leave, so that its steps take the smallest bucket (`step(rows)`)."""
        if self.slots is None:
            raise RuntimeError("move needs a Decoder built with slot_sampling=True")
        src, dst = list(src), list(dst)
        if len(src) != len(dst) or len({*src, *dst}) != 2 * len(src):
            raise ValueError(f"move takes as many source as destination slots, all different: {src} -> {dst}")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < self.batch_size for s in src + dst):
            raise ValueError(f"move takes slots in 0 .. {self.batch_size - 1}: {src} -> {dst}")
        if not src:
            return
        device = self.state.device
        s, d = to_device(src, device, torch.long), to_device(dst, device, torch.long)
        per_slot = [self.tokens, self.finished, self.active, self.state.seqlen_offset, self.slots.temperature,
                    self.slots.top_k, self.slots.top_p, self.slots.seed]
        for t in [*self.state.tensors(), *per_slot, *([self.log] if self.log is not None else [])]:
            step = max(1, self.MOVE_BYTES // max(1, t[0].numel() * t.element_size()))
            for i in range(0, len(src), step):
                t.index_copy_(0, d[i:i + step], t.index_select(0, s[i:i + step]))
        self._release(s)
        self.slots.move(src, dst)

    def step(self, rows: int | None = None) -> torch.Tensor:
        """Decode one token in every slot (slot sampling: in at least the first `rows` slots, default all).
        Returns the tokens [B], a buffer the next step overwrites."""
        if self.slots is not None:
            rows = self.batch_size if rows is None else rows
            bucket = next(b for b in self.buckets if b >= rows)
            sampled = self.slots.any_random
            graph = self._graphs.get((bucket, sampled))
            if graph is not None:
                graph.replay()
            else:
                with torch.no_grad():
                    self._slot_step(bucket, sampled)
        elif self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                self._step()
        return self.tokens

    def recent(self, n: int) -> torch.Tensor:
        """Each slot's last n tokens [B, n], oldest first (n <= log_len), from the log the steps write: valid
        for the slots that took all of the last n steps."""
        L = 0 if self.log is None else self.log.shape[1]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= L:
            raise ValueError(f"recent takes 1 <= n <= log_len={L} tokens, got {n!r}")
        # The step at input position p wrote column p % L; the last n steps had positions offset-n .. offset-1.
        columns = (self.state.seqlen_offset[:, None] - n + torch.arange(n, device=self.log.device)) % L
        return self.log.gather(1, columns)

    def _step(self) -> None:
        offset = self.state.seqlen_offset
        # Greedy tokens with no eos: written in place by the LM head's kernel, log included.
        in_kernel = self._head_argmax and self.eos is None
        if self._head_argmax:
            self._model_step(self.tokens, self.state.layers, offset, next_tokens=self._next,
                             log=self.log if in_kernel else None)
            next_tokens = self._next
        else:
            logits = self._model_step(self.tokens, self.state.layers, offset)
            offset.add_(1)
            next_tokens = sample(logits, self.sampling)
        if in_kernel:
            return
        if self.eos is not None:
            next_tokens = torch.where(self.finished, self.pad_token_id, next_tokens)
            self.finished |= torch.isin(next_tokens, self.eos)
        self.tokens.copy_(next_tokens)
        if self.log is not None:
            self.log.scatter_(1, ((offset - 1) % self.log.shape[1])[:, None], self.tokens[:, None])

    def _slot_step(self, rows: int, sampled: bool) -> None:
        # Views of the first `rows` slots: slots are dim 0 of every state tensor.
        offset, tokens = self.state.seqlen_offset[:rows], self.tokens[:rows]
        layers = [tuple(t[:rows] for t in layer) for layer in self.state.layers]
        logits = self._model_step(tokens, layers, offset)
        offset.add_(self.active[:rows])
        tokens.copy_(self.slots.sample(logits, offset, rows=rows) if sampled else argmax_rows(logits))

    @torch.no_grad()
    def _capture_slots(self) -> None:
        # As _capture, one graph per (bucket, greedy or sampled), all in one memory pool; largest first, so
        # that the pool's blocks fit the smaller ones.
        stream = torch.cuda.Stream(self.state.device)
        stream.wait_stream(torch.cuda.current_stream())
        pool = None
        for rows in reversed(self.buckets):
            for sampled in (False, True):
                with torch.cuda.stream(stream):
                    for _ in range(3 if pool is None else 1):
                        self._slot_step(rows, sampled)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream, pool=pool):
                    self._slot_step(rows, sampled)
                pool = graph.pool()
                self._graphs[rows, sampled] = graph
        self.state.reset()
        self.tokens.zero_()

    @torch.no_grad()
    def _capture(self) -> None:
        # Warm-up on a side stream first (as torch.cuda.graphs asks): it compiles the Triton kernels and
        # picks cuBLAS algorithms, none of which may happen during capture. It writes into the state.
        # Captured on a stream from torch's pool, not on the capture stream every graph shares by default: the
        # split kernels' ticket counters are kept per stream (based.ops.launch.ticket_counters), and two
        # decoders replayed at once must not share them (the pool's 32 streams a device are reused in turn).
        # The warm-up runs on that same stream, so the counters exist before the capture: made during it, their
        # zero fill would be a kernel of every replay.
        stream = torch.cuda.Stream(self.state.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self._step()
        self.state.reset()
        self.tokens.zero_()
        self.finished.zero_()


def _buckets(batch_size: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5 times them) below batch_size, then batch_size."""
    out, p = [], 1
    while p < batch_size:
        out += [b for b in dict.fromkeys((p, p + p // 2)) if b < batch_size]
        p *= 2
    return out + [batch_size]


def compiled_step(model):
    """model.step with each block compiled by torch.compile (its norms, residuals, SwiGLU, rotary and
    conv shifts fused into a few kernels; the matmuls stay cuBLAS), for ~40 eager kernels a block.

    Blocks of one mixer type share one compiled graph (modules are graph inputs), so compile time does
    not grow with depth. The linear-attention step stays outside the compiler: it is already one fused
    Triton kernel, whose feature tables are cached host-side values that must not be traced.
    """
    from ..layers import LinearAttention

    import torch._dynamo.config as dynamo_config

    # One graph per (mixer type, static or dynamic batch) and per model: raise the recompile limit.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))

    eager_mixer_step = torch.compiler.disable(lambda mixer, x, state, offset: mixer.step(x, state, offset))

    # On CUDA the previous block's MLP output (delta) is added in the next block, where the add fuses
    # into norm1: a graph ending in `x + mlp(...)` becomes cuBLAS addmm, whose beta=1 form first copies x
    # into its output (36 copies, 0.66 ms of a 92 ms step at batch 8,798). Not on the CPU, whose Inductor
    # (torch 2.13) fails to generate code for RWKV's block in that form.
    defer_add = model.device.type == "cuda"

    def block_step(block, x, delta, state, seqlen_offset):
        # BasedBlock.step, with the linear-attention mixer called eagerly.
        if delta is not None:
            x = x + delta
        h = block.norm1(x)
        if isinstance(block.mixer, LinearAttention):
            x = x + eager_mixer_step(block.mixer, h, state, seqlen_offset)
        else:
            x = x + block.mixer.step(h, state, seqlen_offset)
        out = block.mlp(block.norm2(x))
        return (x, out) if defer_add else (x + out, None)

    block_step = torch.compile(block_step)

    @torch.compile
    def head(x, delta):
        return model._logits(model.transformer.ln_f(x if delta is None else x + delta))

    def step(input_ids, state, seqlen_offset):
        # BasedForCausalLM.step over the compiled blocks.
        x = model.transformer.embeddings(input_ids.reshape(-1))
        delta = torch.zeros_like(x) if defer_add else None
        for block, s in zip(model.transformer.layers, state):
            x, delta = block_step(block, x, delta, s, seqlen_offset)
        return head(x, delta)

    return step


@torch.no_grad()
def stream(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    sampling: SamplingParams | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    fused: bool | None = None,
    chunk: int = 1,
) -> Iterator[torch.Tensor]:
    """Generate after prompts, yielding the new tokens as blocks [B, <= chunk] on the model's device.

    The host waits for the device once per block, when it checks whether every row has finished: a
    larger chunk keeps the device busier, a smaller one streams sooner. Rows that finish early emit
    pad_token_id until every row has finished or max_new_tokens are out.

    Args:
        input_ids: [B, T] prompts, left-padded if attention_mask is given.
        max_new_tokens: tokens to generate per row (>= 0).
        sampling, eos_token_id, pad_token_id, cuda_graph, compile, fused: as for Decoder.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    check_lengths(model, T, max_new_tokens)  # T counts left padding too: positions never pass T + max_new_tokens
    if max_new_tokens == 0:
        return
    decoder = Decoder(
        model, B, max_seq_len=T + max_new_tokens, sampling=sampling, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, cuda_graph=cuda_graph, compile=compile,
        fused=fused, log_len=chunk,
    )
    # The steps log their tokens on the device (Decoder.log_len): a block is read once, not copied per step.
    first = decoder.add(input_ids, attention_mask)[:, None]
    n = min(chunk, max_new_tokens) - 1
    for _ in range(n):
        decoder.step()
    yield torch.cat([first, decoder.recent(n)], dim=1) if n else first.clone()
    produced = n + 1
    while produced < max_new_tokens:
        if decoder.eos is not None and bool(decoder.finished.all()):
            return
        n = min(chunk, max_new_tokens - produced)
        for _ in range(n):
            decoder.step()
        yield decoder.recent(n)
        produced += n


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, check_every: int = 32, **kwargs) -> torch.Tensor:
    """New tokens [B, n] after prompts [B, T], n <= max_new_tokens (fewer once every row has hit eos, which
    is checked every `check_every` steps). Keyword arguments as for `stream`."""
    blocks = list(stream(model, input_ids, max_new_tokens, chunk=check_every, **kwargs))
    device = model.device
    return torch.cat(blocks, dim=1) if blocks else torch.empty(input_ids.shape[0], 0, dtype=torch.long, device=device)

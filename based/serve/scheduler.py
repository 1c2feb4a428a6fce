"""The engine loop: one thread owns the model and the Decoder; sequences join and leave its slots between steps.

Each pass of the loop
  1. takes cancellations (a client gone) and gives queued sequences the free slots;
  2. prefills up to `prefill_chunk` prompt tokens: whole prompts that fit go in one batched `prefill` straight
     into their slots; a longer prompt is prefilled a piece a pass into a scratch state of its own (so the
     running slots keep decoding meanwhile) and copied into its slot when complete (`Decoder.admit`).
     Whole prompts take the budget first, so a long prompt does not hold back the next ones (`_prefill`).
     With `prefill_wait` > 0 a pass prefills only when it is worth a forward of its own: the prompt tokens
     waiting reach `prefill_chunk`, or nothing decodes, or the oldest prompt holding a slot has waited
     `prefill_wait` seconds. An eager prefill costs its kernel launches whatever its size: a few large ones
     instead of one per pass of a prompt or two, for at most `prefill_wait` more time to first token;
  3. runs one decode step of every slot (free slots are inactive: their position stays at 0);
  4. reads back the tokens of the *previous* pass and hands out their text. The read-back of pass k waits
     for the device while pass k + 1 is already queued on it, so the host work (detokenising, stop strings,
     delivery) overlaps the next step. A sequence that finished is therefore stepped once more, and that
     token is dropped; its slot is free from the next pass on.

With `emit` set (`based serve --api-workers`, workers.py) step 4 hands out token ids, not text: per-slot numpy
arrays (tokens generated, max_tokens, whether eos ends it, owner) take the step's token array in a few
vectorized operations, only finished sequences touch Python objects, and `emit` gets per owner the arrays
(ids, tokens, finish codes) that the API workers detokenise (vLLM v1's output processor, likewise).
"""
from __future__ import annotations

import cProfile
import gc
import heapq
import logging
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..generation.engine import Decoder, prefill, prefill_chunk
from ..generation.state import full_attention_limit, to_device
from .metrics import Metrics
from .text import Detokenizer, StopMatcher

log = logging.getLogger("based.serve")


# Finish codes of emitted tokens (emit): eos ends the sequence and is no token of its text; length: the
# token is its last.
GOING, EOS, LENGTH = 0, 1, 2


class QueueFull(Exception):
    """More sequences would wait than max_waiting."""


class ShuttingDown(Exception):
    """The server no longer accepts requests."""


@dataclass(slots=True)
class Output:
    """What a sequence received in one pass: new text, and at the end its finish reason (or an error)."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One sequence to generate (a request with n > 1 is n of them). `deliver(Output)` is called on the
    thread that `Scheduler.post` hands outputs to."""

    prompt: list[int]
    max_tokens: int
    deliver: Callable[[Output], None]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    incremental: bool = True  # text every pass (streams, stop strings); False: decoded once at the end
    arrival: float = field(default_factory=time.monotonic)
    # Owned by the engine loop from here on.
    admitted: float = 0.0  # when it got a slot (prefill_wait counts from there)
    slot: int | None = None
    prefilled: int = 0
    scratch: list | None = None
    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # Detokenizer state
    read: int = 0
    utf8: object = None
    held: str = ""  # text not sent yet (stream_interval)
    shown: int = 0  # tokens when text was last sent
    text: str = ""  # kept only with stop strings
    sent: int = 0
    matcher: StopMatcher | None = None
    done: bool = False
    cancelled: bool = False
    tag: object = None  # the owner's mark: with --api-workers, which worker and which of its sequences (workers.py)


def engine_profile_path() -> str | None:
    """BASED_ENGINE_PROFILE=PATH: a cProfile of the engine thread (a profiler sees only the thread that enabled
    it), written to PATH when the loop ends; wall time per call, so a call that blocks on the device shows too.
    PATH is tried here, at start: one it cannot write was a traceback once the whole run was over."""
    path = os.environ.get("BASED_ENGINE_PROFILE") or None
    if path is not None:
        try:
            open(path, "ab").close()
        except OSError as e:
            raise ValueError(f"BASED_ENGINE_PROFILE={path} cannot be written ({e.strerror}): set it to a file path "
                             f"in an existing folder") from None
    return path


class Scheduler:
    """Continuous batching over a Decoder with per-slot sampling.

    Args:
        model: BasedForCausalLM in eval mode, on its device.
        tokenizer: a based.serve.text tokenizer (encode, decode_batch, eos_token_id).
        max_slots: the Decoder's batch size.
        max_waiting: sequences that may queue for a slot; more are refused (QueueFull).
        prefill_chunk: prompt tokens prefilled per pass of the loop (and the size of a long prompt's pieces).
        max_seq_len: positions a full-attention KV cache holds (prompt + max_tokens).
        post: runs a list of (Sequence, Output) deliveries where they belong (the asyncio loop of the server);
            default: in the engine thread.
        stream_interval: a stream's text goes out every this many tokens (the first token and the end at
            once): fewer, larger chunks, less work for the HTTP side per token.
        prefill_wait: seconds a prompt holding a slot may wait for others to prefill with, while other sequences
            decode and fewer than prefill_chunk prompt tokens wait (0: every pass prefills what waits).

    `emit`, when set (before start), takes the place of detokenising: once a pass it gets
    {owner: (ids, tokens, codes)} of the sequences whose `tag` is (owner, id): numpy int64 ids, int32 tokens,
    int8 finish codes (GOING, EOS, LENGTH). Those sequences' Outputs are then only their errors and aborts.
    """

    def __init__(self, model, tokenizer, max_slots: int, max_waiting: int, prefill_chunk: int,
                 max_seq_len: int | None = None, cuda_graph: bool | None = None,
                 post: Callable[[list[tuple[Sequence, Output]]], None] | None = None, stream_interval: int = 1,
                 prefill_wait: float = 0.0):
        self.model, self.tokenizer = model, tokenizer
        self.stream_interval = stream_interval
        self.max_waiting, self.prefill_chunk, self.prefill_wait = max_waiting, prefill_chunk, prefill_wait
        self.emit: Callable[[dict], None] | None = None
        self.decoder = Decoder(model, max_slots, max_seq_len=max_seq_len, cuda_graph=cuda_graph, slot_sampling=True)
        self.state_bytes_per_slot = model.inference_state_bytes(self.decoder.state.max_seq_len, 1, self.decoder.state.dtype)
        self.metrics = Metrics(max_slots, self.state_bytes_per_slot)
        self.detokenizer = Detokenizer(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.post = post or (lambda items: [seq.deliver(out) for seq, out in items])
        self.cuda = model.device.type == "cuda"
        self.cond = threading.Condition()
        self.waiting: deque[Sequence] = deque()
        self.cancels: list[Sequence] = []
        self.free = list(range(max_slots))  # a heap: the lowest free slot first, so steps stay short
        self.prefilling: list[Sequence] = []
        self.running: dict[int, Sequence] = {}
        self.pending = None  # the last pass, whose tokens are not read yet
        # Per slot, for the vectorized read-back (emit): `serial` changes whenever a slot's sequence starts,
        # ends or moves away (to a number no slot had before), so a token read back for a sequence that ended
        # meanwhile is told by its serial at launch.
        self.serial = np.zeros(max_slots, dtype=np.int64)
        self._serials = 0
        self.moved: list[tuple[np.ndarray, np.ndarray]] = []  # slot moves since `pending` was launched
        # Only where a slot's state is fixed in size and read whole every step: a KV cache (full attention,
        # Hyena) is max_seq_len positions a slot (~400 MB for transformer-1.3b at 2048) to copy per move, while
        # a step over its empty rows costs little. BASED_SLOT_COMPACTION=0 turns it off, for A/B timing.
        self.compaction = os.environ.get("BASED_SLOT_COMPACTION") != "0" and full_attention_limit(model) is None
        self.live = np.zeros(max_slots, dtype=bool)
        self.generated = np.zeros(max_slots, dtype=np.int64)
        self.limit = np.zeros(max_slots, dtype=np.int64)
        self.stops_at_eos = np.zeros(max_slots, dtype=bool)
        self.owner = np.zeros(max_slots, dtype=np.int64)
        self.sid = np.zeros(max_slots, dtype=np.int64)
        self.accepting = True
        self._abort: str | None = None
        self._stop = False
        self._last_read = time.monotonic()
        self._phases = {p: self.metrics.engine_phase.labels(p)
                        for p in ("idle", "admit", "prefill", "step", "wait", "deliver")}
        self._phase_start = time.perf_counter()
        self.thread = threading.Thread(target=self._run, name="based-engine", daemon=True)
        self.alive = False

    @property
    def max_slots(self) -> int:
        return self.decoder.batch_size

    def start(self) -> None:
        self.profile_path = engine_profile_path()
        # What exists now (torch, the model, the imports: millions of objects) lives as long as the server:
        # frozen out of the cyclic GC, whose full collections would otherwise walk it all again and again
        # while the loop allocates per token (~0.25 s each, with the engine thread holding the GIL).
        gc.collect()
        gc.freeze()
        self.alive = True
        self.thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none)."""
        with self.cond:
            if not self.accepting or not self.alive:
                self.metrics.rejected.inc()
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_waiting + len(self.free):
                self.metrics.rejected.inc()
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-waiting {self.max_waiting})")
            self.waiting.extend(seqs)
            self._occupancy()
            self.cond.notify()

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """The client is gone (or an API worker found a stop string: reason "stop"): drop the sequence, freeing
        its slot by the next pass."""
        with self.cond:
            if seq.done or seq.cancelled:
                return
            seq.cancelled = True
            try:
                self.waiting.remove(seq)
                seq.done = True
                self.metrics.finished.labels(reason).inc()
                self._occupancy()
            except ValueError:
                self.cancels.append((seq, reason))
            self.cond.notify()

    def drain(self) -> None:
        """Accept nothing more; what is queued or running goes on."""
        with self.cond:
            self.accepting = False

    def abort(self, reason: str) -> None:
        """End every queued and running sequence with an error (a shutdown's grace period is over)."""
        with self.cond:
            self.accepting = False
            self._abort = reason
            self.cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)
        # Back into the GC's reach: a process that goes on (tests, a notebook) can free what the server held,
        # and extension types see their objects released before interpreter exit.
        gc.unfreeze()

    def idle(self) -> bool:
        with self.cond:
            return not (self.waiting or self.prefilling or self.running)

    def counts(self) -> dict:
        with self.cond:
            return {"running": len(self.prefilling) + len(self.running), "waiting": len(self.waiting),
                    "slots_free": len(self.free), "slots": self.max_slots}

    def _occupancy(self) -> None:
        self.metrics.set_occupancy(len(self.prefilling) + len(self.running), len(self.waiting))

    def _run(self) -> None:
        if self.cuda and self.model.device.index is not None:  # this thread's events and copies: the model's device
            torch.cuda.set_device(self.model.device)
        profiler = cProfile.Profile() if self.profile_path else None  # (start)
        if profiler is not None:
            profiler.enable()
        cpu = time.thread_time()
        while True:
            try:
                if not self._pass():
                    break
            except Exception:  # noqa: BLE001 - a failed pass ends its sequences, never the loop
                log.error("engine pass failed:\n%s", traceback.format_exc())
                self._fail_all("internal error in the engine loop (see the server log)")
            now = time.thread_time()
            self.metrics.engine_cpu.inc(now - cpu)
            cpu = now
        if profiler is not None:
            profiler.disable()
            try:
                profiler.dump_stats(self.profile_path)
            except OSError as e:  # (its folder went away meanwhile) the loop still ends as it should
                log.error("BASED_ENGINE_PROFILE: the profile could not be written: %s", e)
        self.alive = False

    @torch.no_grad()
    def _pass(self) -> bool:
        with self.cond:
            while not (self.waiting or self.prefilling or self.running or self.cancels or self.pending
                       or self._stop or self._abort):
                self.cond.wait()
            self._lap("idle")
            if self._abort:
                reason, self._abort = self._abort, None
                doomed = [*self.waiting, *self.prefilling, *self.running.values()]
                self.waiting.clear()
            else:
                doomed = []
            cancels, self.cancels = self.cancels, []
            if self.free and self.waiting:
                now = time.monotonic()
                while self.free and self.waiting:
                    seq = self.waiting.popleft()
                    seq.slot, seq.admitted = heapq.heappop(self.free), now
                    self.prefilling.append(seq)
                self._occupancy()
            if self._stop and not (self.prefilling or self.running or self.pending):
                return False
        if doomed:
            self._read_pending()
            self._lap("deliver")
            self._finish([(s, "abort", "") for s in doomed], error=reason)
        self._finish([(s, reason, "") for s, reason in cancels if not s.done], deliver=False)

        self._lap("admit")
        first_seqs, first_tokens = self._prefill() if self.prefilling and self._prefill_due() else ([], [])
        self._lap("prefill")
        self._compact()
        stepped = bool(self.running)
        if stepped:
            self.decoder.step(rows=max(self.running) + 1)
            self.metrics.steps.inc()
        if not first_seqs and not stepped:
            self._read_pending()
            self._lap("deliver")
            return True
        out = torch.cat([*first_tokens, self.decoder.tokens]) if stepped else torch.cat(first_tokens)
        if self.cuda:
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = out.clone(), None
        if self.emit is None:
            launched = (ready, host, first_seqs, list(self.running.items()) if stepped else [])
        else:  # what each token belongs to, as numbers: slots and their serials now
            slots = np.array([s.slot for s in first_seqs], dtype=np.int64)
            rows = self.max_slots if stepped else 0
            launched = (ready, host, (slots, self.serial[slots]),
                        np.where(self.live[:rows], self.serial[:rows], -1))
        self._lap("step")
        self._read_pending()
        self._lap("deliver")
        self.pending = launched
        return True

    def _prefill_due(self) -> bool:
        """Whether this pass prefills (prefill_wait): enough prompt tokens wait for one large prefill, or
        nothing decodes meanwhile, or the oldest waiting prompt has waited long enough."""
        if self.prefill_wait <= 0 or not self.running:
            return True
        if time.monotonic() - self.prefilling[0].admitted >= self.prefill_wait:
            return True
        tokens = 0
        for seq in self.prefilling:
            tokens += len(seq.prompt) - seq.prefilled
            if tokens >= self.prefill_chunk:
                return True
        return False

    def _prefill(self) -> tuple[list[Sequence], list[torch.Tensor]]:
        """Up to prefill_chunk prompt tokens of the sequences holding a slot; returns those that completed
        their prompt and their first tokens (device tensors). A prefill that fails ends its own sequences
        with an error; the others go on.

        The budget's order (vLLM's chunked prefill likewise serves short prompts first): a prompt taken in the
        order of the slots would let one long prompt take every pass's budget until it is done, and every prompt
        that came after it would wait that long for its first token. So whole prompts that fit go first (oldest
        first, one batched prefill), then pieces of the others, the fewest tokens left first (a prompt nearly
        done is one pass from its first token). The oldest prompt that needs pieces (the head) is owed a quarter
        of the budget every pass, so a stream of short prompts cannot hold it back for ever; each of the others
        becomes the head in its turn."""
        budget, whole, done, firsts, failed = self.prefill_chunk, [], [], [], []
        state = self.decoder.state
        head = next((s for s in self.prefilling if s.prefilled or len(s.prompt) > budget), None)
        reserve = min(len(head.prompt) - head.prefilled, max(1, budget // 4)) if head else 0
        budget -= reserve
        for seq in self.prefilling:  # the head is never whole: started, or longer than the budget
            if budget <= 0:
                break
            if seq.prefilled == 0 and len(seq.prompt) <= budget:
                whole.append(seq)
                budget -= len(seq.prompt)
        pieces, taken = [], {*whole, head}
        others = [s for s in self.prefilling if s not in taken] if budget > 0 else []
        for seq in sorted(others, key=lambda s: len(s.prompt) - s.prefilled):
            if budget <= 0:
                break
            pieces.append((seq, min(len(seq.prompt) - seq.prefilled, budget)))
            budget -= pieces[-1][1]
        if head is not None:  # its share, and what the others left
            pieces.append((head, min(len(head.prompt) - head.prefilled, budget + reserve)))
        for seq, n in pieces:
            try:
                if seq.scratch is None:
                    seq.scratch = self.model.allocate_inference_cache(1, state.dtype, state.device, state.max_seq_len)
                piece = to_device([seq.prompt[seq.prefilled:seq.prefilled + n]], state.device, torch.long)
                logits = prefill_chunk(self.model, seq.scratch, piece, seq.prefilled)
                seq.prefilled += n
                self.metrics.prompt_tokens.inc(n)
                if seq.prefilled == len(seq.prompt):
                    firsts.append(self._admit([seq], logits, seq.scratch))
                    seq.scratch = None
                    done.append(seq)
            except Exception:  # noqa: BLE001 - this sequence's failure, not the loop's
                log.error("prefill failed:\n%s", traceback.format_exc())
                failed.append(seq)
        if whole:
            try:
                T = max(len(s.prompt) for s in whole)
                ids = torch.zeros(len(whole), T, dtype=torch.long)
                mask = torch.zeros(len(whole), T, dtype=torch.long)
                for i, s in enumerate(whole):
                    ids[i, T - len(s.prompt):] = torch.tensor(s.prompt)
                    mask[i, T - len(s.prompt):] = 1
                # On the host: prefill groups the rows there and queues its copies without a wait for the device.
                logits = prefill(self.model, state, ids, mask, [s.slot for s in whole])
                for s in whole:
                    s.prefilled = len(s.prompt)
                self.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in whole))
                firsts.append(self._admit(whole, logits, None))
                done.extend(whole)
            except Exception:  # noqa: BLE001
                log.error("prefill failed:\n%s", traceback.format_exc())
                failed.extend(whole)
        self._finish([(s, "error", "") for s in failed],
                     error="internal error while prefilling this request (see the server log)")
        return done, firsts

    def _admit(self, seqs: list[Sequence], logits: torch.Tensor, layers) -> torch.Tensor:
        first = self.decoder.admit(
            [s.slot for s in seqs], [len(s.prompt) for s in seqs], logits, layers=layers,
            temperature=[s.temperature for s in seqs], top_k=[s.top_k for s in seqs],
            top_p=[s.top_p for s in seqs], seed=[s.seed for s in seqs],
        )
        self._start_running(seqs)
        return first

    def _start_running(self, seqs: list[Sequence]) -> None:
        """Prefilled sequences decode from the next step on: their slots' rows of the per-slot arrays."""
        with self.cond:
            done = set(seqs)
            self.prefilling = [s for s in self.prefilling if s not in done]
            for s in seqs:
                self.running[s.slot] = s
        slots = np.array([s.slot for s in seqs], dtype=np.int64)
        self.serial[slots] = self._fresh(len(slots))
        self.live[slots] = True
        self.generated[slots] = 0
        self.limit[slots] = [s.max_tokens for s in seqs]
        self.stops_at_eos[slots] = [self.eos is not None and not s.ignore_eos for s in seqs]
        if self.emit is not None:
            self.owner[slots] = [s.tag[0] for s in seqs]
            self.sid[slots] = [s.tag[1] for s in seqs]

    def _fresh(self, n: int) -> np.ndarray:
        """n serials never given before."""
        self._serials += n
        return np.arange(self._serials - n + 1, self._serials + 1, dtype=np.int64)

    def _compact(self) -> None:
        """Move running sequences out of slots above the bucket their number needs into free slots below it.

        A step costs what its rows cost (`decoder.step(rows)`: the highest running slot, rounded up to a
        bucket), and its state traffic grows with them. New sequences take the lowest free slot, but as a
        batch drains, the few sequences left sit scattered up to the top slot: with 3072 requests on 2048 slots
        (`based bench serve`'s saturation workload) the steps would stay at 2048 rows while a third of them run.
        A move copies a slot's state once (~15 MB for 1.3b); it is done only when the step gets a smaller bucket.
        """
        if not self.running or not self.compaction:
            return
        holding = len(self.running) + len(self.prefilling)
        target = next(b for b in self.decoder.buckets if b >= holding)
        if max(self.running) < target:
            return
        # Only this thread changes `running` and `free`; the lock is for the readers (counts, metrics).
        src = sorted((s for s in self.running if s >= target), reverse=True)
        dst = [s for s in heapq.nsmallest(len(src), self.free) if s < target]
        src = src[:len(dst)]
        if not src:
            return
        try:  # first: a move that fails (out of memory for its copies) leaves the sequences where they were
            self.decoder.move(src, dst)
        except Exception:  # noqa: BLE001 - the loop goes on uncompacted, every sequence intact
            log.error("slot compaction failed, turned off:\n%s", traceback.format_exc())
            self.compaction = False
            return
        with self.cond:
            for h, low in zip(src, dst):
                seq = self.running.pop(h)
                seq.slot = low
                self.running[low] = seq
            taken = set(dst)
            self.free = [s for s in self.free if s not in taken] + src
            heapq.heapify(self.free)
        hs, ls = np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
        for a in (self.serial, self.live, self.generated, self.limit, self.stops_at_eos, self.owner, self.sid):
            a[ls] = a[hs]
        self.live[hs] = False
        self.serial[hs] = self._fresh(len(hs))
        self.metrics.moves.inc(len(src))
        if self.pending is not None and self.emit is not None:  # its tokens are read by slot: see _emit_pending
            self.moved.append((hs, ls))

    def _lap(self, phase: str) -> None:
        """The wall time since the last lap goes to `phase` (based_engine_phase_seconds)."""
        now = time.perf_counter()
        self._phases[phase].inc(now - self._phase_start)
        self._phase_start = now

    def _read_pending(self) -> None:
        """Hand out the tokens of the pass before: detokenise (one batch call), stop strings, finishes; with
        `emit`, the token ids (_emit_pending)."""
        if self.pending is None:
            return
        ready, host, first_seqs, stepped, = self.pending
        moved, self.pending, self.moved = self.moved, None, []
        if ready is not None:
            ready.synchronize()
        self._lap("wait")
        if self.emit is not None:
            self._emit_pending(host.numpy(), *first_seqs, stepped, moved)
            return
        values = host.tolist()
        now = time.monotonic()
        new: dict[Sequence, list[int]] = {seq: [token] for seq, token in zip(first_seqs, values) if not seq.done}
        firsts, base = len(new), len(first_seqs)
        for slot, seq in stepped:
            if not seq.done:
                if seq in new:
                    new[seq].append(values[base + slot])
                else:
                    new[seq] = [values[base + slot]]
        continuing = len(new) - firsts
        if not new:
            return
        self.metrics.itl.observe(now - self._last_read, continuing)
        self._last_read = now
        reasons, produced, eos = {}, 0, self.eos
        for seq, ids in new.items():
            if not seq.ids:
                self.metrics.ttft.observe(now - seq.arrival)
            room = seq.max_tokens - len(seq.ids)
            if eos is not None and not seq.ignore_eos and eos in ids[:room]:
                ids, reasons[seq] = ids[:ids.index(eos)], "stop"
            elif len(ids) >= room:
                ids, reasons[seq] = ids[:room], "length"
            seq.ids.extend(ids)
            produced += len(ids)
        self.metrics.add_tokens(produced)
        outputs, finished = text_outputs(self.detokenizer, new, reasons, self.stream_interval)
        self.post(outputs)
        self._finish(finished)

    def _emit_pending(self, values: np.ndarray, first_slots: np.ndarray, first_serials: np.ndarray,
                      stepped: np.ndarray, moved: list[tuple[np.ndarray, np.ndarray]] = ()) -> None:
        """The vectorized read-back (emit): each live slot's token counted and checked in numpy, grouped by
        owner; only the sequences that finished are looked up. `moved`: the (from, to) slots of sequences that
        _compact moved after this pass was launched: their rows go where the sequences are now."""
        now = time.monotonic()
        base = len(first_slots)
        for hs, ls in moved:
            where = np.arange(self.max_slots)
            where[hs] = ls
            first_slots = where[first_slots]
            if len(stepped):
                values[base + ls] = values[base + hs]
                stepped = stepped.copy()
                stepped[ls], stepped[hs] = stepped[hs], -1
        # A sequence's first token (its prefill's) comes before the token of the step of the same pass.
        keep = first_serials == self.serial[first_slots]
        fs = first_slots[keep]
        parts = [self._count(fs, values[:base][keep])] if len(fs) else []
        for slot in fs.tolist():
            self.metrics.ttft.observe(now - self.running[slot].arrival)
        rows = len(stepped)
        valid = stepped == self.serial[:rows]  # a sequence that ended meanwhile: its token dropped
        ss = np.flatnonzero(valid)
        if len(ss):
            parts.append(self._count(ss, values[base:base + rows][ss]))
        if not parts:
            return
        slots, tokens, codes = (np.concatenate(x) for x in zip(*parts)) if len(parts) > 1 else parts[0]
        firsts_stepped = int(valid[fs].sum()) if len(fs) and rows else 0
        self.metrics.itl.observe(now - self._last_read, len(ss) - firsts_stepped)
        self._last_read = now
        self.metrics.add_tokens(len(codes) - int((codes == EOS).sum()))
        owners, sids = self.owner[slots], self.sid[slots]
        batches = {}
        for w in np.unique(owners).tolist():
            mine = owners == w
            batches[w] = (sids[mine], tokens[mine].astype(np.int32), codes[mine])
        ended = np.flatnonzero(codes)
        finished = [(self.running[slot], "stop" if code == EOS else "length", "")
                    for slot, code in zip(slots[ended].tolist(), codes[ended].tolist())]
        self.emit(batches)
        self._finish(finished, deliver=False)

    def _count(self, slots: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One new token for each of `slots`: (slots, tokens, finish codes); a slot that ends here is retired
        (its serial moves on), so a second token of the same pass is dropped."""
        generated = self.generated[slots] + 1
        eos = self.stops_at_eos[slots] & (tokens == self.eos) if self.eos is not None else np.zeros(len(slots), bool)
        codes = np.where(eos, EOS, np.where(generated >= self.limit[slots], LENGTH, GOING)).astype(np.int8)
        self.generated[slots] = generated - eos  # eos is no token of the text: not counted
        ended = slots[codes != GOING]
        self.serial[ended] = self._fresh(len(ended))
        self.live[ended] = False
        return slots, tokens, codes

    def _finish(self, items: list[tuple], error: str | None = None, deliver: bool = True) -> None:
        """End sequences (seq, reason, last text): free their slots, count them, send each its last Output."""
        if not items:
            return
        slots, outputs = [], []
        with self.cond:
            for seq, reason, text in items:
                seq.done = True
                completion = len(seq.ids)
                if seq.slot is not None:
                    if self.running.get(seq.slot) is seq:
                        del self.running[seq.slot]
                        slots.append(seq.slot)
                        self.serial[seq.slot] = self._fresh(1)[0]
                        self.live[seq.slot] = False
                        if self.emit is not None:
                            completion = int(self.generated[seq.slot])
                    elif seq in self.prefilling:
                        self.prefilling.remove(seq)
                    heapq.heappush(self.free, seq.slot)
                    seq.slot, seq.scratch = None, None
                self.metrics.finished.labels(reason).inc()
                if deliver:
                    outputs.append((seq, Output(text, reason, len(seq.prompt), completion, error)))
            self._occupancy()
        self.decoder.free(slots)
        self.post(outputs)

    def _fail_all(self, error: str) -> None:
        self.pending, self.moved = None, []
        with self.cond:
            doomed = [*self.prefilling, *self.running.values()]
        self._finish([(s, "error", "") for s in doomed], error=error)


def text_outputs(detokenizer: Detokenizer, new: dict, reasons: dict, stream_interval: int
                 ) -> tuple[list[tuple[Sequence, Output]], list[tuple[Sequence, str, str]]]:
    """A pass's text: the Outputs to send and the sequences that finish (seq, reason, last text).

    Args:
        new: Sequence -> its new token ids of this pass, already in seq.ids.
        reasons: Sequence -> finish reason ("stop": eos, "length") of those that the engine ended; a stop string
            found in the text ends a sequence too (reason "stop").
    The engine loop calls it with api_workers 0, each API worker (workers.py) on its own sequences otherwise.
    """
    streams, final = [], []
    for seq in new:
        if seq.incremental or seq in reasons:  # else its text is decoded once, when it ends
            streams.append(seq)
            final.append(seq in reasons)
    texts = detokenizer.step(streams, final)
    outputs, finished = [], []
    for seq, piece in zip(streams, texts):
        reason = reasons.get(seq)
        if not seq.stop:  # no text kept: each piece goes out as it comes (every stream_interval tokens)
            if reason:
                finished.append((seq, reason, seq.held + piece))
            elif piece:
                if seq.shown and len(seq.ids) - seq.shown < stream_interval:
                    seq.held += piece
                else:
                    outputs.append((seq, Output(seq.held + piece)))
                    seq.held, seq.shown = "", len(seq.ids)
            continue
        # Stop strings: the text is kept, a match may begin in text already held back.
        matcher = seq.matcher or StopMatcher(seq.stop)
        seq.matcher = matcher
        before = len(seq.text)
        seq.text += piece
        at = matcher.find(seq.text, before)
        if at is not None:
            seq.text, reason = seq.text[:at], "stop"
        if reason:
            finished.append((seq, reason, seq.text[seq.sent:]))
            seq.sent = len(seq.text)
            continue
        end = len(seq.text) - matcher.held(seq.text)
        if end > seq.sent:
            outputs.append((seq, Output(seq.text[seq.sent:end])))
            seq.sent = end
    return outputs, finished

"""The server's Prometheus metrics (prometheus_client, one registry per server).

Latency histograms take many observations of one value at once: every sequence that received a token in a
decode step waited the same inter-token time, so a step adds one count of n rather than n Python calls.
"""
from __future__ import annotations

import bisect
import threading
from collections import deque
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import HistogramMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class BatchHistogram:
    """A Prometheus histogram with observe(value, count): its counts are kept here, exported by collect()."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name, self.documentation, self.bounds = name, documentation, list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float, count: int = 1) -> None:
        if count <= 0:
            return
        with self.lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += count
            self.sum += value * count

    def collect(self):
        with self.lock:
            counts, total = list(self.counts), self.sum
        cumulative, buckets = 0, []
        for bound, c in zip([*map(str, self.bounds), "+Inf"], counts):
            cumulative += c
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class Metrics:
    """Gauges and counters the engine loop updates, and the text /metrics serves."""

    def __init__(self, slots_total: int, state_bytes_per_slot: int):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total: the server's CPU time, for CPU per token
        self.running = Gauge("based_requests_running", "Sequences holding a slot (prefilling or decoding)", registry=r)
        self.waiting = Gauge("based_requests_waiting", "Sequences queued for a slot", registry=r)
        self.slots_used = Gauge("based_slots_used", "Decoder slots in use", registry=r)
        Gauge("based_slots_total", "Decoder slots", registry=r).set(slots_total)
        self.state_bytes = Gauge("based_state_memory_bytes", "Decode-state memory of the slots in use", registry=r)
        Gauge("based_state_memory_total_bytes", "Decode-state memory of all slots", registry=r).set(
            slots_total * state_bytes_per_slot)
        self.state_bytes_per_slot = state_bytes_per_slot
        self.tokens_per_s = Gauge("based_generation_tokens_per_second",
                                  "Generated tokens per second over the last 5 seconds", registry=r)
        self.tokens_per_s.set_function(self._rate)
        self.generated = Counter("based_generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("based_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.finished = Counter("based_requests_finished", "Sequences finished, by reason", ["reason"], registry=r)
        self.rejected = Counter("based_requests_rejected", "Requests refused (queue full or shutting down)",
                                registry=r)
        self.engine_cpu = Counter("based_engine_cpu_seconds", "CPU time of the engine loop's thread", registry=r)
        self.steps = Counter("based_decode_steps", "Decode steps run", registry=r)
        self.moves = Counter("based_slot_moves", "Sequences moved to a lower slot, so that steps take fewer rows",
                             registry=r)
        # Where the engine loop's wall time goes (idle, prefill, step, read = waiting for the device's tokens,
        # deliver = detokenise, stops, hand-over): the first thing to read when tokens/s falls short.
        self.engine_phase = Counter("based_engine_phase_seconds", "Wall time of the engine loop by phase", ["phase"],
                                    registry=r)
        self.ttft = BatchHistogram("based_time_to_first_token_seconds", "From arrival to the first token's text",
                                   TTFT_BUCKETS)
        self.itl = BatchHistogram("based_inter_token_latency_seconds", "Between a sequence's consecutive tokens",
                                  ITL_BUCKETS)
        r.register(self.ttft)
        r.register(self.itl)
        self._window: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def set_occupancy(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.slots_used.set(running)
        self.state_bytes.set(running * self.state_bytes_per_slot)

    def add_tokens(self, n: int) -> None:
        self.generated.inc(n)
        with self._lock:
            self._window.append((time.monotonic(), n))

    def _rate(self) -> float:
        """Tokens per second over the last 5 s (read when /metrics is served)."""
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - 5:
                self._window.popleft()
            total = sum(c for _, c in self._window)
        return total / 5

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

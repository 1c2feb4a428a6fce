"""Serving benchmark: `based serve` under load, BASED 1.3b against Transformer++ 1.3b (random weights).

    based bench serve [--presets 1.3b transformer-1.3b] [--device cuda] [--out PATH]
    based bench serve --device cpu --presets debug --quick      # the wiring, in a minute on a CPU
    based bench serve --null-engine --max-slots 1024            # the server's own CPU ceiling (no model)

Methodology as vLLM's benchmarks/benchmark_serving.py: an asyncio client (aiohttp) sends completion
requests with Poisson arrivals at a given rate, or all at once (saturation); prompts of --prompt-len tokens
(random ASCII: one byte token each), output lengths uniform in --output-len with ignore_eos, greedy. Each
preset gets its own server process (`based serve --preset P`, default slot count unless --max-slots) on
the same device, one after the other. Per run: output tokens/s, requests/s, TTFT p50/p99, inter-token
latency p50/p99 (between a stream's chunks; a chunk carrying k tokens counts as k gaps of 1/k), server CPU
time per output token (process_cpu_seconds_total of the server, plus based_api_cpu_seconds_total of its
API worker processes with --api-workers, over the tokens it generated, from /metrics) and the steady-state
tokens/s while every slot was busy (from /metrics, sampled each second).
Inter-token latency is the gap between a stream's consecutive chunks, as vLLM's ITL: the server sends what
queued up for a stream as one chunk, so under load a chunk may carry several tokens, and a gap counts once;
time per output token (TPOT, (latency - TTFT) / (tokens - 1) per request) is reported beside it.

Order per preset: saturation streaming, then Poisson streaming at --rate-fractions of the saturation
request rate (or at --rates), then saturation without streaming; then the offline engine
(based.generation.Decoder, greedy, the same slots, no server) for the ratio the issue's targets use.
With --null-engine the server is `based serve`'s app and engine loop around a stand-in for the model
(NullScheduler: prefill and decode step return a token at once, no model runs), so tokens/s and CPU per
token are the server's own overhead: the HTTP side, detokenising, delivery. Only this benchmark uses it.
Results: JSON under benchmarks/results/ (date, GPU name and git revision; on a machine without .git pass
--git-rev or BASED_GIT_REV) and a plot of output tokens/s against p99 inter-token latency.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..commands import HelpFormatter

PROMPT, OUTPUT = 512, (128, 1024)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_attention(preset: str) -> bool:
    from based.models import BasedConfig

    return "attention" in BasedConfig.from_preset(preset).mixer_types


class ServerProcess:
    """`based serve` in a subprocess; its start-up line (slots) kept."""

    def __init__(self, preset: str, args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if args.null_engine:  # this module's null server, with the flags `based serve` would get
            cmd = [sys.executable, "-m", "based.bench.serve", NULL_SERVER, "--preset", "debug", "--device", "cpu",
                   "--null-step-ms", str(args.null_step_ms)]
        else:
            cmd = [sys.executable, "-m", "based.cli", "serve", "--preset", preset, "--device", args.device]
        cmd += ["--port", str(self.port), "--max-waiting", str(args.max_waiting),
               "--prefill-chunk", str(args.prefill_chunk), "--prefill-wait-ms", str(args.prefill_wait_ms),
               "--stream-interval", str(args.stream_interval),
               "--grace", "5"]
        if args.max_slots:
            cmd += ["--max-slots", str(args.max_slots)]
        cmd += ["--api-workers", str(args.api_workers)]  # explicit: the engine-alone run assumes the same
        if full_attention(preset):  # a KV cache as long as the benchmark's sequences: more slots fit
            cmd += ["--max-seq-len", str(args.prompt_len + args.output_len[1])]
        self.log = open(Path(args.log_dir) / f"serve-{preset}.log", "w") if args.log_dir else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.cmd = cmd

    def wait(self, timeout: float) -> dict:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"based serve exited with {self.proc.returncode} (see --log-dir)")
            try:
                r = requests.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"based serve did not answer /health within {timeout:.0f} s")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


RESULT_KEYS = {"1.3b": "based", "transformer-1.3b": "transformer"}  # a preset's section of the JSON
NULL_SERVER = "--null-server"  # argv[1] of this module: the null-engine server, `based serve`'s flags after it
NULL_TOKEN = ord("a")  # every generated token: one byte, one character of text


def null_scheduler(step_s: float = 0.0):
    """A Scheduler whose model costs nothing: a prefill admits every waiting prompt at once, a decode step
    returns NULL_TOKEN for every slot without running anything. The rest (slots, read-back, detokenising,
    stop strings, finishes, delivery, metrics) is the server's own code. step_s > 0 paces the steps as a GPU
    would: a step is ready step_s after the one before, and the host work of a pass overlaps that wait (the
    engine thread sleeps, without the GIL, only for what is left of it)."""
    import torch

    from based.serve.scheduler import Scheduler

    class NullDecoder:
        def __init__(self, slots: int):
            self.batch_size = slots
            self.buckets = [slots]  # a step costs step_s however many rows: nothing to compact
            self.tokens = torch.full((slots,), NULL_TOKEN, dtype=torch.long)
            self.due = 0.0

        def step(self, rows: int | None = None) -> torch.Tensor:
            if step_s:
                now = time.perf_counter()
                if self.due > now:
                    time.sleep(self.due - now)
                self.due = max(now, self.due) + step_s
            return self.tokens

        def free(self, slots) -> None:
            pass

    class NullScheduler(Scheduler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.decoder = NullDecoder(self.decoder.batch_size)

        def _prefill(self):
            seqs = list(self.prefilling)
            if not seqs:
                return [], []
            for s in seqs:
                s.prefilled = len(s.prompt)
            self._start_running(seqs)
            self.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in seqs))
            return seqs, [torch.full((len(seqs),), NULL_TOKEN, dtype=torch.long)]

    return NullScheduler


def null_server(argv: list[str]) -> int:
    """`based serve --preset debug --device cpu` with the null engine (null_scheduler) in place of the model."""
    import argparse as _argparse

    import torch

    from based import BasedConfig, BasedForCausalLM
    from based.commands import serve as serve_command
    from based.serve.text import ByteTokenizer

    parser = _argparse.ArgumentParser(prog="based bench serve --null-server")
    serve_command.register(parser.add_subparsers())
    step_ms = float(argv[argv.index("--null-step-ms") + 1]) if "--null-step-ms" in argv else 0.0
    argv = [a for i, a in enumerate(argv) if "--null-step-ms" not in argv[max(0, i - 1):i + 1]]
    args = parser.parse_args(["serve", *argv])
    torch.set_num_threads(1)
    model = BasedForCausalLM(BasedConfig.from_preset("debug")).eval()
    slots = args.max_slots or 1024
    scheduler = null_scheduler(step_ms / 1e3)(model, ByteTokenizer(), slots, args.max_waiting, args.prefill_chunk,
                                 max_seq_len=64, stream_interval=args.stream_interval,
                                 prefill_wait=args.prefill_wait_ms / 1e3)
    print(f"based bench serve: null engine, {slots} slots", file=sys.stderr, flush=True)
    sock = serve_command.bind(args.host, args.port) if args.api_workers else None
    server = serve_command.front(scheduler, args, "null", None, sock)
    profile = os.environ.get("BASED_NULL_PROFILE")  # cProfile of the event loop's thread, written at exit
    if profile and not args.api_workers:
        import cProfile

        cProfile.runctx("server.run()", globals(), {"server": server}, profile)
        return 0
    return server.run() or 0


def scrape(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.labels:
                out[s.name] = s.value
            elif s.name == "based_engine_phase_seconds_total":  # the engine loop's wall time by phase
                out[f"engine_{s.labels['phase']}_s"] = s.value
    return out


def phase_seconds(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The engine loop's wall time by phase (based_engine_phase_seconds) between two scrapes."""
    return {k[len("engine_"):-len("_s")]: round(v - before.get(k, 0), 3) for k, v in sorted(after.items())
            if k.startswith("engine_") and k.endswith("_s")}


async def metrics(session, url: str) -> dict[str, float]:
    import aiohttp

    # A pooled connection the server closed meanwhile (keep-alive) resets once; thousands of clients
    # connecting at once can overflow the listen backlog for a moment.
    for attempt in range(10):
        try:
            async with session.get(url + "/metrics") as r:
                return scrape(await r.text())
        except aiohttp.ClientError:
            if attempt == 9:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))


async def one_request(session, url: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    """Send one completion; TTFT, chunk gaps and tokens of its answer."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    start = time.perf_counter()
    out = {"ttft": None, "itl": [], "tokens": 0, "latency": None, "error": None}
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                out["error"] = f"HTTP {r.status}: {(await r.text())[:200]}"
                return out
            if not stream:
                data = await r.json()
                out["latency"] = out["ttft"] = time.perf_counter() - start
                out["tokens"] = data["usage"]["completion_tokens"]
                return out
            last = None
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                now = time.perf_counter()
                if b'"usage"' in line:
                    out["tokens"] = json.loads(line[6:])["usage"]["completion_tokens"]
                    continue
                if b'"error"' in line[:16]:
                    out["error"] = line[6:200].decode()
                    continue
                if last is None:
                    out["ttft"] = now - start
                else:
                    out["itl"].append(now - last)
                last = now
            out["latency"] = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        out["error"] = f"{type(e).__name__}: {e}"
    return out


async def send_requests(url: str, prompts: list[str], lengths: list[int], rate: float, stream: bool,
                        seed: int) -> dict:
    """One client's requests at Poisson arrivals of `rate` per second (inf: all at once): per-request results,
    when it began and ended (time.perf_counter, one clock for every process of this host) and its CPU time."""
    import aiohttp

    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=0)
    cpu = time.process_time()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        tasks = []
        for prompt, n in zip(prompts, lengths):
            tasks.append(asyncio.create_task(one_request(session, url, prompt, n, stream)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        end = time.perf_counter()
    return {"results": results, "start": start, "end": end, "cpu_s": time.process_time() - cpu}


def _client_process(url: str, prompts: list[str], lengths: list[int], rate: float, stream: bool, seed: int) -> dict:
    return asyncio.run(send_requests(url, prompts, lengths, rate, stream, seed))


async def run_load(url: str, prompts: list[str], lengths: list[int], rate: float, stream: bool,
                   seed: int, clients: int = 1) -> dict:
    """All requests at Poisson arrivals of `rate` per second (inf: all at once); /metrics sampled each second.
    clients > 1: the requests are dealt to that many client processes, each with Poisson arrivals of
    rate / clients (together a Poisson stream of `rate`), so that one Python process reading tens of
    thousands of SSE events a second does not become what the inter-token latency measures."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600)) as session:
        before = await metrics(session, url)
        samples, done = [], asyncio.Event()

        async def sampler():
            while not done.is_set():
                try:
                    m = await metrics(session, url)
                except aiohttp.ClientError:  # a sample lost under load is no reason to lose the run
                    continue
                samples.append((time.perf_counter(), m.get("based_generation_tokens_total", 0),
                                m.get("based_slots_used", 0), m.get("based_slots_total", 0)))
                try:
                    await asyncio.wait_for(done.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

        sampling = asyncio.create_task(sampler())
        clients = max(1, min(clients, len(prompts)))  # no client process without requests
        if clients == 1:
            parts = [await send_requests(url, prompts, lengths, rate, stream, seed)]
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            loop = asyncio.get_running_loop()
            with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("spawn")) as pool:
                parts = await asyncio.gather(*(
                    loop.run_in_executor(pool, _client_process, url, prompts[i::clients], lengths[i::clients],
                                         rate / clients, stream, seed * 1000 + i) for i in range(clients)))
        done.set()
        await sampling
        after = await metrics(session, url)
    results = [r for part in parts for r in part["results"]]
    elapsed = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    client_cpu = sum(p["cpu_s"] for p in parts)
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    itl = [g for r in ok for g in r["itl"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    # Time per output token after the first (vLLM's TPOT): a chunk that carried several tokens counts them all.
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if stream and r["ttft"] and r["tokens"] > 1]
    server_tokens = after.get("based_generation_tokens_total", 0) - before.get("based_generation_tokens_total", 0)
    cpu = after.get("process_cpu_seconds_total", 0) - before.get("process_cpu_seconds_total", 0)
    # --api-workers: the HTTP side's processes (based_api_cpu_seconds_total) are the server's CPU too.
    api_cpu = after.get("based_api_cpu_seconds_total", 0) - before.get("based_api_cpu_seconds_total", 0)
    cpu += api_cpu
    engine_cpu = after.get("based_engine_cpu_seconds_total", 0) - before.get("based_engine_cpu_seconds_total", 0)
    busy = [(t, n) for t, n, used, total in samples if total and used >= total]
    steady = (busy[-1][1] - busy[0][1]) / (busy[-1][0] - busy[0][0]) if len(busy) > 2 else None
    return {
        "rate": "inf" if rate == float("inf") else rate, "stream": stream, "requests": len(results),
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
        "duration_s": elapsed, "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed, "requests_per_s": len(ok) / elapsed,
        "steady_tokens_per_s_all_slots_busy": steady, "busy_samples": len(busy),
        "ttft_ms_p50": _ms(percentile(ttft, 50)), "ttft_ms_p99": _ms(percentile(ttft, 99)),
        "itl_ms_p50": _ms(percentile(itl, 50)), "itl_ms_p99": _ms(percentile(itl, 99)),
        "itl_ms_mean": _ms(statistics.fmean(itl)) if itl else None,
        "tpot_ms_p50": _ms(percentile(tpot, 50)), "tpot_ms_p99": _ms(percentile(tpot, 99)),
        "server_cpu_ms_per_token": _ms(cpu / server_tokens) if server_tokens else None,
        "engine_thread_cpu_ms_per_token": _ms(engine_cpu / server_tokens) if server_tokens else None,
        "api_workers_cpu_ms_per_token": _ms(api_cpu / server_tokens) if server_tokens else None,
        "decode_steps": after.get("based_decode_steps_total", 0) - before.get("based_decode_steps_total", 0),
        "engine_phase_s": phase_seconds(before, after),
        # Near 1: the client processes were busy all along, and their own queueing is in the latencies.
        "client_processes": len(parts), "client_cpu_fraction": client_cpu / (elapsed * len(parts)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def workload(n: int, prompt_len: int, output: tuple[int, int], seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ "
    prompts = ["".join(rng.choice(letters) for _ in range(prompt_len)) for _ in range(n)]
    return prompts, [rng.randint(*output) for _ in range(n)]


def offline(preset: str, slots: int, args) -> dict:
    """The engine without a server: a Decoder of `slots` slots, greedy, every slot decoding (the issue's
    'offline engine at the same number of slots'); tokens/s over --offline-steps steps after the prefill."""
    import torch

    from based.generation import Decoder
    from based.generation.engine import prefill

    from .generate import build, fill_slots, synchronize

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(preset, dtype, device)
    decoder = Decoder(model, slots, max_seq_len=args.prompt_len + args.output_len[1], log_len=32)
    n0 = min(slots, 64)
    decoder.add(torch.randint(0, 256, (n0, args.prompt_len), device=device))
    fill_slots(decoder, n0)
    for _ in range(8):
        decoder.step()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(args.offline_steps):
        decoder.step()
    synchronize(device)
    elapsed = time.perf_counter() - t
    # Prefill's rate too: every request of the workload pays its prompt, which the decode steps above do not, so
    # the two rates bound what any server can reach against them (summarize: bound_over_offline).
    n = min(slots, 32)
    ids = torch.randint(0, 256, (n, args.prompt_len), device=device)
    where = torch.randperm(slots)[:n]  # scattered, as a server's free slots are
    prefill(model, decoder.state, ids, None, where)
    synchronize(device)
    t = time.perf_counter()
    for _ in range(3):
        prefill(model, decoder.state, ids, None, where)
    synchronize(device)
    prefill_s = (time.perf_counter() - t) / 3
    del decoder, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"slots": slots, "steps": args.offline_steps, "tokens_per_s": slots * args.offline_steps / elapsed,
            "prefill_prompts": n, "prefill_tokens_per_s": n * args.prompt_len / prefill_s}


def offline_workload(preset: str, slots: int, args, n: int, seed: int) -> dict:
    """The engine alone on the saturation workload: the server's Scheduler driven in this process (same
    slots, prompts, output lengths, chunked prefill and per-pass detokenising; no HTTP, no event loop). What
    the server serves against this is the cost of serving; against `offline` (decode steps of full slots, no
    prefill) it also pays for the prompts. With --api-workers the engine runs as it does behind them: token ids
    out (Scheduler.emit), the text left to the workers."""
    import threading

    import torch

    from based.serve.scheduler import EOS, GOING, Output, Scheduler, Sequence
    from based.serve.text import ByteTokenizer

    from .generate import build, synchronize

    device = torch.device(args.device)
    model = build(preset, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    tokenizer = ByteTokenizer()
    scheduler = Scheduler(model, tokenizer, slots, n, args.prefill_chunk,
                          max_seq_len=model.config.max_position_embeddings, stream_interval=args.stream_interval,
                          prefill_wait=args.prefill_wait_ms / 1e3)
    sink = None
    if args.api_workers:
        def emit(batches) -> None:  # on the engine thread
            for _, _, codes in batches.values():
                sink(int((codes != EOS).sum()), int((codes != GOING).sum()))

        scheduler.emit = emit
    scheduler.start()
    try:
        def drive(prompts: list[str], lengths: list[int]) -> tuple[int, float]:
            left, tokens, done = [len(prompts)], [0], threading.Event()

            def count(new: int, ended: int) -> None:
                tokens[0] += new
                left[0] -= ended
                if not left[0]:
                    done.set()

            def deliver(out: Output) -> None:  # on the engine thread
                if out.finish_reason is not None or out.error is not None:
                    count(out.completion_tokens, 1)

            nonlocal sink
            sink = count
            seqs = [Sequence(tokenizer.encode(p), m, deliver, ignore_eos=True, tag=(0, i))
                    for i, (p, m) in enumerate(zip(prompts, lengths))]
            start = time.perf_counter()
            scheduler.submit(seqs)
            done.wait()
            return tokens[0], time.perf_counter() - start

        drive(*workload(min(4, slots), args.prompt_len, tuple(args.output_len), seed))  # warm-up
        before = scrape(scheduler.metrics.text().decode())
        tokens, seconds = drive(*workload(n, args.prompt_len, tuple(args.output_len), seed))
        phases = phase_seconds(before, scrape(scheduler.metrics.text().decode()))
        synchronize(device)
    finally:
        scheduler.stop()
    del scheduler, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"slots": slots, "requests": n, "token_ids_out": bool(args.api_workers), "output_tokens": tokens,
            "duration_s": seconds,
            "output_tokens_per_s": tokens / seconds, "engine_phase_s": phases}


# Requests one run may send: the client makes all of them first (100,000 prompts of 512 tokens are ~50M token
# ids in Python lists), so a factor or rate off by orders of magnitude would fill the memory before a request went.
MAX_REQUESTS = 100_000


def requests_problem(what: str, n: int) -> str | None:
    if n > MAX_REQUESTS:
        return f"{what} makes a run of {n} requests, more than {MAX_REQUESTS:,}: lower it"
    return None


def saturation_requests(args, slots: int) -> int:
    """Requests of a saturation run (sent all at once): --saturation-prompts, else --saturation-factor x slots."""
    n = args.saturation_prompts or max(args.min_prompts, int(args.saturation_factor * slots))
    problem = requests_problem(f"--saturation-factor {args.saturation_factor:g} x {slots} slots", n)
    if problem:  # (where the server chose its slots; known counts are refused before any server starts)
        raise SystemExit(f"based bench serve: {problem}")
    return n


def bench_engine_only(preset: str, args) -> dict:
    """--engine-only: the engine without servers, at --max-slots: decode and prefill rates (`offline`) and the
    saturation workload through the Scheduler in-process (`offline_workload`, with its loop's phases). A quick
    A/B of an engine change in one lease (BASED_* switches are recorded in the config)."""
    slots = args.max_slots
    n = saturation_requests(args, slots)
    return {"preset": preset, "slots": slots, "engine_only": True, "runs": [], "offline": offline(preset, slots, args),
            "offline_workload": offline_workload(preset, slots, args, n, seed=2)}


def bench_preset(preset: str, args) -> dict:
    server = ServerProcess(preset, args)
    try:
        health = server.wait(args.start_timeout)
        slots = health["slots"]
        result = {"preset": preset, "slots": slots, "server_command": " ".join(server.cmd[1:]), "runs": []}
        print(f"{preset}: {slots} slots", flush=True)
        seed = 0

        def run(rate: float, stream: bool, n: int) -> dict:
            nonlocal seed
            seed += 1
            prompts, lengths = workload(n, args.prompt_len, tuple(args.output_len), seed)
            row = asyncio.run(run_load(server.url, prompts, lengths, rate, stream, seed, args.clients))
            result["runs"].append(row)
            print(preset, json.dumps(row), flush=True)
            return row

        run(float("inf"), True, min(4, slots))  # warm-up: the first prefills and steps
        result["runs"].clear()
        n_sat = saturation_requests(args, slots)
        sat = run(float("inf"), True, n_sat)
        rates = args.rates or [f * sat["requests_per_s"] for f in args.rate_fractions if sat["requests_per_s"] > 0]
        planned = [(rate, True, max(args.min_prompts, round(rate * args.duration))) for rate in rates]
        problem = next(filter(None, (requests_problem(f"a rate of {rate:.3g}/s x --duration {args.duration:g}", n)
                                     for rate, _, n in planned)), None)
        if problem:  # (--rate-fractions of the measured saturation rate: known only now)
            raise SystemExit(f"based bench serve: {problem}")
        if not args.skip_plain:
            planned.append((float("inf"), False, n_sat))
        for rate, stream, n in planned:
            if time.monotonic() > args.deadline:  # --time-limit: what is left is listed, not run
                result.setdefault("skipped_runs", []).append({"rate": str(rate), "stream": stream, "requests": n})
                continue
            run(rate, stream, n)
        result["server_exit_code"] = server.stop()
    finally:
        server.stop()
        if args.log_dir:
            server.log.close()
    if not args.skip_offline:
        try:
            result["offline"] = offline(preset, slots, args)
        except Exception as e:  # noqa: BLE001 - recorded; the server numbers stand alone
            result["offline"] = {"error": f"{type(e).__name__}: {e}"}
        try:
            result["offline_workload"] = offline_workload(preset, slots, args, n_sat, seed=2)  # the saturation run's
        except Exception as e:  # noqa: BLE001
            result["offline_workload"] = {"error": f"{type(e).__name__}: {e}"}
    return result


def summarize(result: dict) -> dict:
    """The issue's targets, from the runs."""
    out = {}
    best_under, steady_under = {}, {}
    for key, r in result.items():
        if not (isinstance(r, dict) and "runs" in r):
            continue
        runs = r["runs"]
        sat = [x for x in runs if x["rate"] == "inf" and x["stream"]]
        plain = [x for x in runs if x["rate"] == "inf" and not x["stream"]]
        off = r.get("offline", {}).get("tokens_per_s")
        same = r.get("offline_workload", {}).get("output_tokens_per_s")
        if same:  # the same workload through the engine alone: what HTTP and the event loop cost
            out[f"{key}_offline_workload_tokens_per_s"] = same
            if sat:
                out[f"{key}_stream_over_offline_workload"] = sat[0]["output_tokens_per_s"] / same
            if plain:
                out[f"{key}_plain_over_offline_workload"] = plain[0]["output_tokens_per_s"] / same
        if sat:
            s = sat[0]
            out[f"{key}_saturation_stream_tokens_per_s"] = s["output_tokens_per_s"]
            out[f"{key}_saturation_stream_steady_tokens_per_s"] = s["steady_tokens_per_s_all_slots_busy"]
            if off:
                best = s["steady_tokens_per_s_all_slots_busy"] or s["output_tokens_per_s"]
                out[f"{key}_stream_over_offline"] = best / off
        if plain and off:
            best = plain[0]["steady_tokens_per_s_all_slots_busy"] or plain[0]["output_tokens_per_s"]
            out[f"{key}_plain_over_offline"] = best / off
        prefill_rate, config = r.get("offline", {}).get("prefill_tokens_per_s"), result.get("config", {})
        if off and prefill_rate and "prompt_len" in config and "output_len" in config:
            # A request costs prompt / prefill_rate of prefill and mean_output / off of decoding: even with host and
            # GPU fully overlapped and every slot busy, a server reaches at most this fraction of `off`.
            mean_output = sum(config["output_len"]) / 2
            decode_s, prefill_s = mean_output / off, config["prompt_len"] / prefill_rate
            out[f"{key}_bound_over_offline"] = decode_s / (decode_s + prefill_s)
        ok = [x for x in runs if x["stream"] and x["itl_ms_p99"] is not None and x["itl_ms_p99"] <= 100]
        if sat and sat[0] in ok and sat[0]["steady_tokens_per_s_all_slots_busy"]:
            steady_under[key] = sat[0]["steady_tokens_per_s_all_slots_busy"]
        if ok:
            top = max(ok, key=lambda x: x["output_tokens_per_s"])
            best_under[key] = top["output_tokens_per_s"]
            out[f"{key}_best_tokens_per_s_at_p99_itl_le_100ms"] = top["output_tokens_per_s"]
            out[f"{key}_best_rate_at_p99_itl_le_100ms"] = top["rate"]
        if sat:
            half = sat[0]["requests_per_s"] / 2
            poisson = [x for x in runs if x["stream"] and x["rate"] != "inf"]
            if poisson:
                near = min(poisson, key=lambda x: abs(x["rate"] - half))
                out[f"{key}_ttft_ms_p50_near_half_saturation"] = near["ttft_ms_p50"]
                out[f"{key}_rate_near_half_saturation"] = near["rate"]
    keys = list(best_under)
    if len(keys) >= 2:
        out[f"{keys[0]}_over_{keys[1]}_at_p99_itl_le_100ms"] = best_under[keys[0]] / best_under[keys[1]]
    if len(steady_under) >= 2:  # both saturate within the latency bound: their rates with every slot busy, which
        # a whole-run count (drain included) can flatter when one model's run is much shorter than the other's
        a, b = list(steady_under)[:2]
        out[f"{a}_over_{b}_steady_all_slots_busy"] = steady_under[a] / steady_under[b]
    return out


def plot(result: dict, path: Path) -> bool:
    """Throughput against p99 inter-token latency, one line per model; False (nothing drawn) where no run streamed,
    as with --engine-only."""
    series = {}
    for key, r in result.items():
        if isinstance(r, dict) and "runs" in r:
            pts = sorted(((x["itl_ms_p99"], x["output_tokens_per_s"]) for x in r["runs"]
                          if x["stream"] and x["itl_ms_p99"] is not None), key=lambda pt: pt[1])
            if pts:
                series[f"{key} ({r['slots']} slots)"] = pts
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, pts in series.items():
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.axvline(100, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("p99 inter-token latency (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_xscale("log")
    ax.set_title(f"based serve, {result['gpu']}, {result['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def check_settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line naming the flag for a value that cannot mean anything (negative, zero, NaN, inf), and for an --out
    or --log-dir that cannot be written: before the servers start, not when their results are written. (--append
    onto an unreadable --out is refused where main reads it, also before any server.)"""
    from ..commands import number_problem, out_file_problem, out_folder_problem

    checks = [("--rates", v, 0, False) for v in args.rates or []]
    checks += [("--rate-fractions", v, 0, False) for v in args.rate_fractions or []]
    checks += [("--duration", args.duration, 0, False), ("--start-timeout", args.start_timeout, 0, False),
               ("--saturation-factor", args.saturation_factor, 0, False), ("--min-prompts", args.min_prompts, 1, True),
               ("--offline-steps", args.offline_steps, 1, True), ("--null-step-ms", args.null_step_ms, 0, True),
               ("--time-limit", args.time_limit if args.time_limit is not None else 1, 0, True),
               ("--saturation-prompts", 1 if args.saturation_prompts is None else args.saturation_prompts, 1, True),
               ("--max-slots", 1 if args.max_slots is None else args.max_slots, 1, True)]  # (before --quick, which replaced a 0 by 4)
    problems = [number_problem(*check) for check in checks]
    sizes = [("--saturation-prompts", args.saturation_prompts or 0), ("--min-prompts", args.min_prompts)]
    sizes += [(f"--rates {r:g} x --duration {args.duration:g}", r * args.duration) for r in args.rates or []
              if math.isfinite(r * args.duration)]
    if args.max_slots and math.isfinite(args.saturation_factor):
        sizes.append((f"--saturation-factor {args.saturation_factor:g} x --max-slots {args.max_slots}",
                      args.saturation_factor * args.max_slots))
    problems += [requests_problem(what, round(n)) for what, n in sizes]
    problems.append(args.out is not None and out_file_problem(args.out))
    problems.append(args.log_dir and out_folder_problem(args.log_dir, "--log-dir"))  # ("" as before: no logs)
    problem = next(filter(None, problems), None)
    if problem:
        p.error(problem)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="based bench serve", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--presets", nargs="+", default=["1.3b", "transformer-1.3b"],
                   help="one server per preset, one after the other")
    p.add_argument("--device", default="cuda", help="cuda, or cpu (checks the wiring only)")
    p.add_argument("--max-slots", type=int, default=None, help="default: the server's own (what fits memory)")
    p.add_argument("--max-waiting", type=int, default=1_000_000, help="the servers' queue (the client sends all)")
    p.add_argument("--prefill-chunk", type=int, default=4096,
                   help="prompt tokens per engine pass (4096: at 1.3b a pass of prompts stays under ~70 ms on an "
                   "H100, so running streams keep p99 inter-token latency under 100 ms)")
    p.add_argument("--prefill-wait-ms", type=float, default=20.0, help="the servers' --prefill-wait-ms")
    p.add_argument("--stream-interval", type=int, default=1, help="the servers' --stream-interval")
    p.add_argument("--api-workers", type=int, default=None,
                   help="the servers' --api-workers: HTTP processes in front of the engine's (0: one process; "
                        "default: the server's own, 0 on a CPU, min(4, cores / 4) on CUDA)")
    p.add_argument("--prompt-len", type=int, default=PROMPT, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, nargs=2, default=list(OUTPUT), metavar=("MIN", "MAX"),
                   help="output tokens per request, uniform in MIN..MAX")
    p.add_argument("--rates", type=float, nargs="*", default=None, help="requests/s (default: --rate-fractions)")
    p.add_argument("--rate-fractions", type=float, nargs="*", default=[0.25, 0.5, 0.75, 0.9],
                   help="Poisson rates as fractions of the saturation run's requests/s")
    p.add_argument("--clients", type=int, default=None,
                   help="client processes sharing the requests (Poisson rate / N each), so that one client's own "
                   "queueing is not in the latencies (default: 4 on CUDA, at most one a core; 1 on a CPU)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per Poisson run")
    p.add_argument("--min-prompts", type=int, default=50, help="requests per run at the least")
    p.add_argument("--saturation-factor", type=float, default=1.5, help="saturation requests = factor x slots")
    p.add_argument("--saturation-prompts", type=int, default=None,
                   help="requests of a saturation run (default: --saturation-factor x slots)")
    p.add_argument("--skip-plain", action="store_true", help="no non-streaming saturation run")
    p.add_argument("--skip-offline", action="store_true", help="no run of the offline engine")
    p.add_argument("--engine-only", action="store_true",
                   help="no servers: only the offline engine and the saturation workload through the engine alone "
                   "(needs --max-slots)")
    p.add_argument("--null-engine", action="store_true",
                   help="the server around a model that costs nothing (CPU): its own overhead; no offline run")
    p.add_argument("--null-step-ms", type=float, default=0.0,
                   help="with --null-engine: a decode step takes this long, as on a GPU (0: at once)")
    p.add_argument("--offline-steps", type=int, default=64, help="decode steps of the offline engine run")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to come up")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings (CPU wiring check): 4 slots, prompts of 16, outputs 4-12, rates 2 4")
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/serve-<gpu>-<date>.json)")
    p.add_argument("--git-rev", default=None, help="recorded revision (default $BASED_GIT_REV, else git rev-parse)")
    p.add_argument("--gpu", default=None, help="recorded device name (default torch's name of the device)")
    p.add_argument("--date", default=None, help="recorded date (default today, UTC)")
    p.add_argument("--log-dir", default=None, help="write each server's log there")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds; runs that would start later are skipped (listed in the JSON)")
    p.add_argument("--append", action="store_true",
                   help="keep the other presets' sections of an existing --out JSON (one preset per command)")
    args = p.parse_args(argv)
    check_settings(p, args)
    args.deadline = time.monotonic() + args.time_limit if args.time_limit else float("inf")
    if args.quick:
        args.max_slots = args.max_slots or 4
        args.prompt_len, args.output_len = 16, [4, 12]
        args.rates = args.rates or [2.0, 4.0]
        args.duration, args.min_prompts, args.saturation_prompts = 2.0, 4, args.saturation_prompts or 8
        args.offline_steps = 8
    if args.null_engine:  # the server's overhead alone: no model, so no device and no offline engine to compare
        args.device, args.skip_offline, args.presets = "cpu", True, ["debug"]
        args.max_slots = args.max_slots or 1024
    if args.api_workers is None:  # the server's default, resolved here: the engine-alone run matches it
        from ..commands.serve import default_api_workers

        args.api_workers = default_api_workers("cpu" if args.null_engine else args.device.split(":")[0])
    if args.output_len[0] < 1 or args.output_len[1] < args.output_len[0] or args.prompt_len < 1:
        p.error("--prompt-len must be >= 1 and --output-len MIN MAX with 1 <= MIN <= MAX")
    if args.max_slots is not None and args.max_slots < 1:
        p.error(f"--max-slots must be >= 1, got {args.max_slots}")
    if args.engine_only and (args.max_slots is None or args.null_engine or args.skip_offline):
        p.error("--engine-only needs --max-slots (no server to ask) and is neither --null-engine nor --skip-offline")
    if args.clients is None:  # 4 clients used 0.88 of a core together at ~30k SSE events/s (docs/serving.md)
        args.clients = min(4, os.cpu_count() or 1) if args.device.startswith("cuda") else 1
    if not 1 <= args.clients <= (os.cpu_count() or 1):
        p.error(f"--clients must be 1 .. {os.cpu_count() or 1} (client processes, at most one a core), "
                f"got {args.clients}")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        p.error("the client needs aiohttp: pip install aiohttp")
    import torch

    from based.models.presets import PRESETS

    unknown = [x for x in args.presets if x not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("based bench serve needs a CUDA device (or --device cpu, to check the wiring)", file=sys.stderr)
        return 2
    from .ops import _git_rev

    gpu = args.gpu or (torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu")
    date = args.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    # "NVIDIA H100 80GB HBM3" -> h100: the first word that has letters then digits.
    short = next((w for w in gpu.split() if w[:1].isalpha() and w[1:].isdigit()), gpu.split()[-1]).lower()
    out = args.out or Path("benchmarks/results") / f"serve-{short}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    try:
        earlier = json.loads(out.read_text()) if args.append and out.exists() else {}
    except (ValueError, OSError) as e:
        p.error(f"--append: --out {out} is not readable JSON ({e}): choose another --out")
    if not isinstance(earlier, dict):
        p.error(f"--append: --out {out} holds no JSON object of an earlier run: choose another --out")
    result = {
        **earlier,
        "date": date, "gpu": gpu, "git_revision": args.git_rev or _git_rev(), "torch": torch.__version__,
        "python": platform.python_version(),
        "config": {"prompt_len": args.prompt_len, "output_len": args.output_len, "ignore_eos": True,
                   "decoding": "greedy", "weights": "random", "prefill_chunk": args.prefill_chunk,
                   "prefill_wait_ms": args.prefill_wait_ms,
                   "stream_interval": args.stream_interval, "api_workers": args.api_workers,
                   "client_processes": args.clients,
                   "null_engine": args.null_engine,
                   "null_step_ms": args.null_step_ms,
                   "rates": args.rates, "rate_fractions": None if args.rates else args.rate_fractions,
                   "duration_s": args.duration, "device": args.device,
                   "client": "aiohttp, Poisson arrivals (vLLM benchmark_serving methodology)"},
    }
    tuning = {k: v for k, v in os.environ.items() if k.startswith("BASED_")}
    if tuning:
        result["config"]["environment"] = tuning

    def save():
        result["summary"] = summarize(result)
        out.write_text(json.dumps(result, indent=1) + "\n")

    from based.commands.serve import raise_open_files_limit

    raise_open_files_limit()
    started, failed = time.perf_counter(), []
    for preset in args.presets:
        key = (f"null_engine_{args.max_slots}_slots_{args.null_step_ms:g}ms" if args.null_engine
               else RESULT_KEYS.get(preset, preset))
        try:
            result[key] = (bench_engine_only if args.engine_only else bench_preset)(preset, args)
        except Exception as e:  # noqa: BLE001 - record it, go on with the next preset
            failed.append(preset)
            result[key] = {"preset": preset, "error": f"{type(e).__name__}: {e}"}
            print(f"{preset} failed: {e!r}", file=sys.stderr, flush=True)
        save()
    result[f"elapsed_s_{'_'.join(args.presets)}"] = time.perf_counter() - started
    save()
    drawn = plot(result, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if drawn else ""))
    if failed:  # recorded in the JSON, and the other presets measured; but the benchmark did not do its job
        print(f"based bench serve: {', '.join(failed)} failed (the error is in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == [NULL_SERVER]:
        sys.exit(null_server(sys.argv[2:]))
    sys.exit(main())

"""`based serve`: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md).

    based serve --preset debug                      # random weights, byte tokens, CPU: starts in seconds
    based serve --checkpoint runs/debug --port 8000 # a `based train` checkpoint and its tokenizer
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
CPU_MAX_SLOTS = 64  # every slot up to the highest one in use steps: on a CPU a few dozen is plenty
# A fixed-state model takes prompts of any length, but each one's prefill takes part of every pass until it is
# done (a 300k-token prompt: seconds of passes that every stream shares): a cap by default.
MAX_PROMPT_TOKENS = 32768


def register(sub) -> None:
    from based.commands import PRESETS

    p = sub.add_parser("serve", help="OpenAI-compatible server with continuous batching (pip install -e '.[serve]')",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="directory written by save_pretrained / based train")
    source.add_argument("--preset", choices=PRESETS, help="random-weight model of this preset (byte tokens)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-slots", type=int, default=None,
                   help="decoder slots (default: the most whose state fits --memory-fraction of free memory; "
                        f"at most {CPU_MAX_SLOTS} on a CPU)")
    p.add_argument("--memory-fraction", type=float, default=0.8,
                   help="share of the free memory (after the model) the default --max-slots may fill")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests beyond the free slots; then 429")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens prefilled per engine pass; longer prompts go in pieces of this size")
    p.add_argument("--prefill-wait-ms", type=float, default=20.0,
                   help="while other sequences decode, a prompt waits up to this long for others to prefill with "
                        "it unless --prefill-chunk tokens wait (fewer, larger prefills; time to first token up to "
                        "this much longer); 0: prefill every pass")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="a stream's text is sent every N tokens (the first at once): fewer chunks, less CPU per token")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + max_tokens a full-attention model's KV cache holds per slot (default its "
                        "max_position_embeddings; less gives more slots)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help=f"longer prompts get a 400 before they reach the engine (default {MAX_PROMPT_TOKENS} for "
                        "models without a positional limit; a full-attention model's prompt is bounded by "
                        "--max-seq-len, and by this too when given)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="initialises a preset's random weights")
    p.add_argument("--model-name", default=None, help="the id /v1/models lists (default the checkpoint or preset)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds SIGTERM waits for running requests before ending them with an error")
    p.add_argument("--api-workers", type=int, default=None,
                   help="HTTP processes in front of the engine's (0: the HTTP side in the engine's process; "
                        "default: 0 on a CPU, on CUDA min(4, CPU cores / 4): where one process's CPU is the limit)")
    p.add_argument("--no-cuda-graph", action="store_true", help="step eagerly on CUDA (debugging)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="uvicorn's log level")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"based serve: error: {e.name} is missing: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    try:
        server = build(args)
    except (ValueError, MemoryError, OSError) as e:
        print(f"based serve: error: {e}", file=sys.stderr)
        return 2
    return server.run() or 0


def default_slots(model, dtype, device, max_seq_len: int, fraction: float) -> tuple[int, int, int | None]:
    """(slots, bytes per slot, free bytes): the most slots whose states, logits and activations fit
    `fraction` of the free memory (the model already loaded)."""
    from based.generation.state import free_memory_bytes

    per_slot = model.inference_state_bytes(max_seq_len, 1, dtype)
    # Beside the state, per slot: the step's logits and their argmax, a few activations (as based bench
    # generate counts them); the sampler works in blocks of rows (batch_sampling.SAMPLER_BLOCK_ELEMENTS) and
    # the prefill's activations fit in the fraction left over.
    per_slot_total = per_slot + 8 * model.config.vocab_size + 64 * model.config.d_model
    free = free_memory_bytes(device)
    if free is None:
        return 1, per_slot, None
    slots = int(free * fraction // per_slot_total)
    if device.type == "cpu":
        slots = min(slots, CPU_MAX_SLOTS)
    return max(slots, 0), per_slot, free


def build(args: argparse.Namespace):
    import torch

    from based.generation.state import full_attention_limit
    from based.serve.scheduler import Scheduler
    from based.serve.text import ByteTokenizer, load_tokenizer

    from ..cli import torch_device
    from .generate import load

    device = torch_device(args.device)
    api_workers = getattr(args, "api_workers", None)
    if api_workers is None:
        api_workers = args.api_workers = default_api_workers(device.type)
    for flag, value, low in (("--port", args.port, 0), ("--max-waiting", args.max_waiting, 0),
                             ("--api-workers", api_workers, 0),
                             ("--prefill-chunk", args.prefill_chunk, 1), ("--stream-interval", args.stream_interval, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535:  # (socket.bind raises OverflowError, past the OSError that bind() reports)
        raise ValueError(f"--port must be <= 65535, got {args.port}")
    if not 0 <= args.grace < float("inf"):
        raise ValueError(f"--grace must be >= 0 and finite (seconds), got {args.grace}")
    if not 0 <= args.prefill_wait_ms < float("inf"):  # nan or inf: a prompt could wait as long as others decode
        raise ValueError(f"--prefill-wait-ms must be >= 0 and finite, got {args.prefill_wait_ms}")
    if args.max_slots is not None and args.max_slots < 1:
        raise ValueError(f"--max-slots must be >= 1, got {args.max_slots}")
    if getattr(args, "max_prompt_tokens", None) is not None and args.max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    if not 0 < args.memory_fraction <= 1:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    from based.serve.scheduler import engine_profile_path

    engine_profile_path()  # before the model loads, as the flags (the engine checks it again when it starts)
    # Before the model loads: a taken port fails in a second, not after it. The API workers get the socket.
    sock = bind(args.host, args.port) if api_workers else check_address(args.host, args.port)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the graphs' capture streams and the engine's events follow it
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.preset is not None:  # random weights made on the device: seconds for 1.3b, not a CPU init
        from based import BasedConfig, BasedForCausalLM

        torch.manual_seed(args.seed)
        with torch.device(device):
            model = BasedForCausalLM(BasedConfig.from_preset(args.preset))
        what = f"preset {args.preset} (random weights)"
    else:
        model, _, what = load(args)  # the checkpoint's model; the tokenizer is ours (batch decoding)
    tokenizer = load_tokenizer(args.checkpoint)
    if isinstance(tokenizer, ByteTokenizer) and model.config.vocab_size < 256:
        raise ValueError(f"byte-level tokens need vocab_size >= 256, the model has {model.config.vocab_size}")
    model = model.to(device=device, dtype=dtype).eval()
    limit = full_attention_limit(model)
    max_seq_len = model.config.max_position_embeddings
    if args.max_seq_len is not None:
        if not 1 <= args.max_seq_len <= max_seq_len:
            raise ValueError(f"--max-seq-len must be in [1, {max_seq_len}] (max_position_embeddings), got "
                             f"{args.max_seq_len}")
        max_seq_len = args.max_seq_len
        limit = limit and max_seq_len
    slots, per_slot, free = default_slots(model, dtype, device, max_seq_len, args.memory_fraction)
    if args.max_slots is not None:
        slots = args.max_slots
        if free is not None and slots * per_slot > free:  # (the engine's own message named generate's --batch-size)
            raise MemoryError(f"--max-slots {slots} needs {slots * per_slot / 2**30:.2f} GiB of decode state, "
                              f"{free / 2**30:.2f} GiB is free on {device}: lower --max-slots (or leave it out: the "
                              f"most that fit)")
    elif slots < 1:
        raise MemoryError(f"not one slot's decode state ({per_slot / 2**20:.1f} MiB) fits {args.memory_fraction} of "
                          f"the free memory on {device}: raise --memory-fraction or free memory")
    free_text = "unknown" if free is None else f"{free / 2**30:.1f} GiB"
    print(f"based serve: {what} on {device} ({str(dtype).replace('torch.', '')}); {slots} slots x "
          f"{per_slot / 2**20:.3f} MiB of state ({'--max-slots' if args.max_slots else f'{args.memory_fraction:.0%} of {free_text} free'}"
          f"{f', at most {CPU_MAX_SLOTS} on a CPU' if device.type == 'cpu' and not args.max_slots else ''})",
          file=sys.stderr, flush=True)
    scheduler = Scheduler(model, tokenizer, slots, args.max_waiting, args.prefill_chunk, max_seq_len=max_seq_len,
                          cuda_graph=False if args.no_cuda_graph else None, stream_interval=args.stream_interval,
                          prefill_wait=args.prefill_wait_ms / 1e3)
    name = args.model_name or (str(args.checkpoint) if args.checkpoint else args.preset)
    return front(scheduler, args, name, limit, sock)


def front(scheduler, args: argparse.Namespace, name: str, limit: int | None, sock=None):
    """The HTTP side around a Scheduler, ready to run(): with --api-workers N the Engine and its N worker
    processes on `sock` (bound by the caller), else uvicorn and the app in this process."""
    cap = prompt_cap(args, limit)
    if args.api_workers:
        from based.serve.workers import Engine

        return Engine(scheduler, sock, args, name, limit, backlog(args, scheduler), cap)
    from based.serve.app import create_app

    return Server(create_app(scheduler, name, limit, cap), scheduler, args)


def prompt_cap(args: argparse.Namespace, limit: int | None) -> int | None:
    """--max-prompt-tokens, or its default: MAX_PROMPT_TOKENS where no positional limit bounds a prompt."""
    cap = getattr(args, "max_prompt_tokens", None)
    return cap if cap is not None else (None if limit else MAX_PROMPT_TOKENS)


def default_api_workers(device_type: str) -> int:
    """--api-workers when not given. On CUDA the HTTP side outgrows one process: 1.3b at 2048 slots on an
    H100 (16 cores) streamed 21.2k tokens/s from one process, 29.9k with 4 workers (the engine alone: 30.5k;
    benchmarks/results/serve-1.3b-2048-*-h100-2026-12-07.json). A CPU engine is far slower than one HTTP
    process, and a worker costs a start-up import of torch: none there."""
    import os

    return min(4, (os.cpu_count() or 1) // 4) if device_type == "cuda" else 0


def bind(host: str, port: int):
    """A TCP socket bound to host:port (not listening yet); ValueError naming --host / --port when the server
    could not listen there."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        s.bind(address)
    except OSError as e:
        s.close()
        raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); pick another port") from None
    return s


def check_address(host: str, port: int) -> None:
    """Raises ValueError naming --host / --port when the server could not listen there."""
    bind(host, port).close()


def backlog(args, scheduler) -> int:
    """The listen backlog: thousands of clients connect at once in a saturation benchmark."""
    return min(65535, max(2048, args.max_waiting + scheduler.max_slots))


def raise_open_files_limit() -> None:
    """The soft limit on open files up to the hard one: a socket per client, often past the usual 1024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ImportError, ValueError, OSError):
        pass


class Server:
    """uvicorn around the app, with our SIGTERM: stop accepting, let running requests finish for --grace
    seconds, end the rest with an error, exit 0."""

    def __init__(self, app, scheduler, args):
        import uvicorn

        self.scheduler, self.grace = scheduler, args.grace
        raise_open_files_limit()
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                backlog=backlog(args, scheduler),
                                timeout_graceful_shutdown=int(args.grace) + 10)
        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                # Not uvicorn's own: it re-raises the signal after shutdown, which would end the process with
                # SIGTERM's status instead of 0.
                if self.should_exit:
                    self.force_exit = True
                    return
                outer.scheduler.drain()
                threading.Thread(target=outer._finish_or_abort, daemon=True).start()
                self.should_exit = True

        self.server = _Server(config)

    def _finish_or_abort(self) -> None:
        import time

        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            if self.scheduler.idle():
                return
            time.sleep(0.05)
        self.scheduler.abort(f"the server shut down before this request finished (--grace {self.grace:g} s)")

    def run(self) -> None:
        print(f"based serve: starting on http://{self.server.config.host}:{self.server.config.port}",
              file=sys.stderr, flush=True)
        self.server.run()

"""`based serve --api-workers N`: the HTTP side in N processes, the engine loop in its own.

One process's GIL holds both the engine thread and the asyncio loop that turns outputs into server-sent
events (~34 us of CPU a token a stream): at thousands of streams that one core, not the GPU, sets the pace.
As vLLM's `--api-server-count`, the `based serve` process keeps the model and the Scheduler (the GPU's only
owner) and N spawned worker processes run uvicorn and the same FastAPI app (create_app) on one listening
socket the engine bound, the kernel handing each connection to one of them. A worker never loads the model
or touches CUDA (it sees no GPU): its app talks to a RemoteScheduler over a duplex Pipe.

The wire, one Pipe a worker (tuples only, pickled once a message):
    worker -> engine   ("submit", qid, [(sid, prompt ids, max_tokens, temperature, top_p, top_k, seed, stop,
                                          ignore_eos, incremental, arrival), ...])     answered ("reply", qid, error)
                       ("cancel", [sid, ...]) or ("cancel", [sid, ...], "stop")     (a stop string matched here)
                       ("counts", qid) / ("metrics", qid)                              answered ("reply", qid, value)
                       (an engine-side failure answers ("fail", qid, message): a 503)
    engine -> worker   ("tok", sids, tokens, codes)   one message per engine pass per worker: numpy arrays, the
                                 new token of each of its running sequences (a sequence's first pass may bring
                                 two: its prefill's and its first step's, in order), with the finish codes of
                                 scheduler.py (GOING, EOS: eos ends it and is no text, LENGTH: its last token)
                       ("out", [(sid, text, finish_reason, prompt_tokens, completion_tokens, error), ...])
                                 sequences the engine ended otherwise: errors, aborts
                       ("drain",)  stop accepting: the server is shutting down
A sequence's `tag` is its (worker, sid) in the engine and its sid in the worker.

Detokenising and stop strings happen in the workers (as vLLM v1's output processor): the engine thread, which
holds the one GIL that the GPU's pace depends on, only counts tokens in numpy (Scheduler.emit) and sends ids. A
worker that finds a stop string ends the request itself and cancels the sequence in the engine ("stop"); the
engine may have stepped it once or twice more by then, tokens the worker drops (they are in
based_generation_tokens_total, never in a response's text or usage).
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback

# Nothing here imports torch at module level: a spawned worker imports this module before worker_main hides
# the GPUs from it.

log = logging.getLogger("based.serve")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc, as prometheus_client's ProcessCollector)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat(5)
    except (OSError, IndexError, ValueError):
        return None


def _nothing(out) -> None:
    """An engine-side Sequence's deliver: its outputs go out through Engine.post, never one by one."""


class _Worker:
    """The engine's end of one worker: its process, its Pipe, the sequences it submitted."""

    def __init__(self, index: int, process, conn):
        self.index, self.process, self.conn = index, process, conn
        self.seqs: dict = {}  # sid -> engine Sequence, until it finishes or is cancelled
        self.requests = 0
        self.dead = False
        self.cpu = 0.0  # last CPU seconds read (what a worker that exited had used)
        # Messages go out from a thread of their own: the engine thread only queues a pass's batch, and never
        # waits on a worker whose socket buffer is full (busy, or stopped) while the others want their tokens.
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sender = threading.Thread(target=self._send_loop, name=f"based-api-send-{index}", daemon=True)
        self.sender.start()

    def send(self, message) -> None:
        if not self.dead:
            self.outbox.put(message)

    def _send_loop(self) -> None:
        while (message := self.outbox.get()) is not None:
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the worker is gone; its reader thread cleans up
                self.dead = True
                return

    def close(self) -> None:
        self.outbox.put(None)
        self.sender.join(5)
        self.conn.close()

    def cpu_seconds(self) -> float:
        now = process_cpu_seconds(self.process.pid) if self.process.pid else None
        if now is not None:
            self.cpu = now
        return self.cpu


class Engine:
    """The `based serve` process with --api-workers: the Scheduler, the workers, their Pipes; SIGTERM stops
    accepting (workers close their listeners), lets running requests finish for --grace seconds, ends the
    rest with an error, waits for the workers and exits 0."""

    def __init__(self, scheduler, sock, args, model_name: str, max_positions: int | None, backlog: int,
                 max_prompt_tokens: int | None = None):
        self.scheduler, self.sock, self.args = scheduler, sock, args
        self.grace = args.grace
        self.config = {"checkpoint": getattr(args, "checkpoint", None), "model_name": model_name,
                       "max_positions": max_positions, "max_prompt_tokens": max_prompt_tokens,
                       "max_slots": scheduler.max_slots, "max_waiting": scheduler.max_waiting,
                       "log_level": args.log_level, "backlog": backlog, "grace": args.grace,
                       "stream_interval": scheduler.stream_interval}
        self.workers: list[_Worker] = []
        self.stopping = threading.Event()
        self.signals = 0

    # The engine thread's side: once per pass, the new tokens of the pass, one message per worker.
    def emit(self, batches: dict) -> None:
        from .scheduler import GOING

        for w, (sids, tokens, codes) in batches.items():
            worker = self.workers[w]
            ended = sids[codes != GOING]
            if len(ended):
                for sid in ended.tolist():
                    worker.seqs.pop(sid, None)
            worker.send(("tok", sids, tokens, codes))

    # Outputs the engine makes itself: the ends of sequences that fail, are aborted or cancelled.
    def post(self, items) -> None:
        if not items:
            return
        batches: dict[int, list] = {}
        for seq, out in items:
            w, sid = seq.tag
            batch = batches.setdefault(w, [])
            if out.finish_reason is None:
                batch.append((sid, out.text))
            else:
                batch.append((sid, out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens, out.error))
                self.workers[w].seqs.pop(sid, None)
        for w, batch in batches.items():
            self.workers[w].send(("out", batch))

    def _serve(self, worker: _Worker) -> None:
        """A worker's requests, on a thread of their own: submit, cancel, counts, metrics."""
        scheduler, conn, w = self.scheduler, worker.conn, worker.index
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._handle(worker, message)
            except Exception:  # noqa: BLE001 - one request's failure: it gets a 503, the worker goes on
                log.error("API worker %d's request failed in the engine process:\n%s", w, traceback.format_exc())
                if message[0] != "cancel":
                    worker.send(("fail", message[1], "internal error in the engine process (see the server log)"))
        worker.dead = True
        doomed = list(worker.seqs.values())
        worker.seqs.clear()
        for seq in doomed:  # their client is gone with the worker: free the slots
            scheduler.cancel(seq)
        if not self.stopping.is_set():
            worker.process.join(1)
            print(f"based serve: API worker {w} (pid {worker.process.pid}) exited with code "
                  f"{worker.process.exitcode}; {len(doomed)} of its sequences cancelled, the other workers go on",
                  file=sys.stderr, flush=True)

    def _handle(self, worker: _Worker, message) -> None:
        from .scheduler import QueueFull, Sequence, ShuttingDown

        scheduler, w = self.scheduler, worker.index
        kind = message[0]
        if kind == "submit":
            _, qid, items = message
            seqs = [Sequence(prompt=p, max_tokens=m, deliver=_nothing, temperature=t, top_p=tp, top_k=tk, seed=s,
                             stop=st, ignore_eos=ie, incremental=inc, arrival=a, tag=(w, sid))
                    for sid, p, m, t, tp, tk, s, st, ie, inc, a in items]
            for seq in seqs:  # before submit: the engine thread may post their outputs at once
                worker.seqs[seq.tag[1]] = seq
            error = None
            try:
                scheduler.submit(seqs)
                worker.requests += 1
            except (QueueFull, ShuttingDown) as e:
                for seq in seqs:
                    worker.seqs.pop(seq.tag[1], None)
                error = (type(e).__name__, str(e))
            worker.send(("reply", qid, error))
        elif kind == "cancel":
            reason = message[2] if len(message) > 2 else "cancelled"
            for sid in message[1]:
                seq = worker.seqs.pop(sid, None)
                if seq is not None:
                    scheduler.cancel(seq, reason)
        elif kind == "counts":
            counts = scheduler.counts()
            counts["api_workers"] = [{"pid": x.process.pid, "requests": x.requests, "alive": not x.dead}
                                     for x in self.workers]
            worker.send(("reply", message[1], (scheduler.alive, counts)))
        elif kind == "metrics":
            worker.send(("reply", message[1], scheduler.metrics.text()))

    def collect(self):
        """based_api_cpu_seconds_total: the workers' CPU, so that with process_cpu_seconds_total (this
        process) it is the server's."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily("based_api_cpu_seconds", "CPU time of the API worker processes",
                                  value=sum(w.cpu_seconds() for w in self.workers))
        yield GaugeMetricFamily("based_api_workers", "API worker processes alive",
                                value=sum(not w.dead for w in self.workers))

    def _signal(self, sig, frame) -> None:
        self.signals += 1
        self.stopping.set()

    def run(self) -> int:
        import multiprocessing as mp

        scheduler = self.scheduler
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA context or model inherited
        scheduler.post = self.post
        scheduler.emit = self.emit
        scheduler.metrics.registry.register(self)
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        scheduler.start()
        for i in range(self.args.api_workers):
            ours, theirs = ctx.Pipe(duplex=True)
            p = ctx.Process(target=worker_main, args=(i, theirs, self.sock, self.config), name=f"based-api-{i}",
                            daemon=False)
            p.start()
            theirs.close()
            self.workers.append(_Worker(i, p, ours))
        self.sock.close()  # the workers hold it now: when they close theirs, nothing listens
        readers = [threading.Thread(target=self._serve, args=(w,), name=f"based-api-{w.index}", daemon=True)
                   for w in self.workers]
        for t in readers:
            t.start()
        host, port = self.args.host, self.args.port
        print(f"based serve: starting on http://{host}:{port} ({len(self.workers)} API worker processes)",
              file=sys.stderr, flush=True)
        code = 0
        while not self.stopping.wait(0.2):
            if all(not w.process.is_alive() for w in self.workers):
                print("based serve: every API worker exited; stopping", file=sys.stderr, flush=True)
                code = 1
                self.stopping.set()
        self._shutdown()
        return code

    def _shutdown(self) -> None:
        scheduler = self.scheduler
        scheduler.drain()
        for w in self.workers:
            w.send(("drain",))
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and not scheduler.idle() and self.signals < 2:
            time.sleep(0.05)
        if not scheduler.idle():
            scheduler.abort(f"the server shut down before this request finished (--grace {self.grace:g} s)")
        # Each worker ends once its connections closed (their last outputs are on the way).
        deadline = time.monotonic() + 15
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                print(f"based serve: API worker {w.index} did not exit; terminating it", file=sys.stderr, flush=True)
                w.process.terminate()
                w.process.join(5)
        scheduler.stop(10)
        for w in self.workers:
            w.close()


class _Metrics:
    def __init__(self, remote: RemoteScheduler):
        self.remote = remote

    def text(self):
        return self.remote._ask("metrics")


class RemoteScheduler:
    """What create_app uses of a Scheduler, in a worker process, over its Pipe to the engine. submit, counts and
    metrics.text return awaitables (a round trip to the engine: the 429 is decided there, as in one process);
    token ids arrive as one message per engine pass, become text here (the Detokenizer state and stop strings of
    this worker's sequences, one batch per message) and go to the event loop with one call_soon_threadsafe."""

    def __init__(self, conn, tokenizer, max_slots: int, stream_interval: int = 1):
        from .text import Detokenizer

        self.conn, self.tokenizer, self.max_slots = conn, tokenizer, max_slots
        self.detokenizer, self.stream_interval = Detokenizer(tokenizer), stream_interval
        self.metrics = _Metrics(self)
        self.post = lambda items: [seq.deliver(out) for seq, out in items]  # create_app's lifespan replaces it
        self.on_drain = lambda: None
        self.alive = True  # the engine loop runs (as its last answer said)
        self.connected = True  # the Pipe to the engine process is up
        self.seqs: dict = {}  # sid -> Sequence of this worker, until its last output
        self.replies: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._read, name="based-api-reader", daemon=True)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread.start()

    def _send(self, message) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError):
            self.connected = False

    def _ask(self, kind: str, *payload) -> asyncio.Future:
        fut = self.loop.create_future()
        if not self.connected:
            fut.set_exception(_shutting_down())
            return fut
        self.next_id += 1
        self.replies[self.next_id] = fut
        self._send((kind, self.next_id, *payload))
        return fut

    async def _submit(self, fut, seqs) -> None:
        error = await fut
        if error is not None:
            from .scheduler import QueueFull, ShuttingDown

            for seq in seqs:
                self.seqs.pop(seq.tag, None)
            raise (QueueFull if error[0] == "QueueFull" else ShuttingDown)(error[1])

    def submit(self, seqs):
        items = []
        for seq in seqs:
            self.next_id += 1
            seq.tag = self.next_id
            self.seqs[seq.tag] = seq
            items.append((seq.tag, seq.prompt, seq.max_tokens, seq.temperature, seq.top_p, seq.top_k, seq.seed,
                          seq.stop, seq.ignore_eos, seq.incremental, seq.arrival))
        return self._submit(self._ask("submit", items), seqs)

    def cancel(self, seq) -> None:
        if self.seqs.pop(seq.tag, None) is not None:
            self._send(("cancel", [seq.tag]))

    async def counts(self) -> dict:
        self.alive, counts = await self._ask("counts")
        counts["api_worker"] = os.getpid()
        return counts

    def abort(self, reason: str) -> None:
        """End this worker's sequences with an error (the engine's own are the engine's to end)."""
        from .scheduler import Output

        doomed = list(self.seqs.items())
        self.seqs.clear()  # in place: the reader thread holds this dict
        if doomed:
            self._send(("cancel", [sid for sid, _ in doomed]))
        for _, seq in doomed:
            seq.deliver(Output("", "abort", error=reason))

    def stop(self, timeout: float | None = None) -> None:
        self.connected = False
        try:
            self.conn.close()
        except OSError:
            pass

    def _read(self) -> None:
        from .scheduler import Output

        conn, seqs = self.conn, self.seqs
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "tok":
                self._tokens(*message[1:])
            elif kind == "out":
                items = []
                for sid, text, reason, prompt_tokens, _, error in message[1]:
                    seq = seqs.pop(sid, None)
                    if seq is not None:  # the tokens it got here are its completion (usage exact)
                        items.append((seq, Output(text, reason, prompt_tokens, len(seq.ids), error)))
                if items:
                    self.post(items)
            elif kind == "reply":
                fut = self.replies.pop(message[1], None)
                if fut is not None:
                    self.loop.call_soon_threadsafe(_resolve, fut, message[2])
            elif kind == "fail":
                fut = self.replies.pop(message[1], None)
                if fut is not None:
                    self.loop.call_soon_threadsafe(_fail, fut, message[2])
            elif kind == "drain":
                self.on_drain()
        if self.connected:  # the engine went away under us
            self.connected = self.alive = False
            print(f"based serve: API worker {os.getpid()}: the engine process is gone; stopping",
                  file=sys.stderr, flush=True)
            self.loop.call_soon_threadsafe(self._engine_gone)

    def _tokens(self, sids, tokens, codes) -> None:
        """A pass's token ids for this worker's sequences: their text, as the engine makes it in one process
        (scheduler.text_outputs); a stop string found ends the request here and its sequence in the engine."""
        from .scheduler import EOS, GOING, Output, text_outputs

        seqs, new, reasons = self.seqs, {}, {}
        for sid, token, code in zip(sids.tolist(), tokens.tolist(), codes.tolist()):
            seq = seqs.get(sid)
            if seq is None:  # ended here (a stop string) or cancelled: what the engine made meanwhile is dropped
                continue
            new[seq] = None
            if code != EOS:
                seq.ids.append(token)
            if code != GOING:
                reasons[seq] = "stop" if code == EOS else "length"
        if not new:
            return
        items, stopped = text_outputs(self.detokenizer, new, reasons, self.stream_interval)
        ours = []
        for seq, reason, text in stopped:
            seqs.pop(seq.tag, None)
            if seq not in reasons:
                ours.append(seq.tag)
            items.append((seq, Output(text, reason, len(seq.prompt), len(seq.ids))))
        if ours:  # from the event loop's thread, the Pipe's only writer here
            self.loop.call_soon_threadsafe(self._send, ("cancel", ours, "stop"))
        if items:
            self.post(items)

    def _engine_gone(self) -> None:
        for fut in list(self.replies.values()):
            if not fut.done():
                fut.set_exception(_shutting_down())
        self.replies.clear()
        self.abort("the engine process stopped")
        self.on_drain()


def _shutting_down():
    from .scheduler import ShuttingDown

    return ShuttingDown("the server is shutting down")


def _fail(fut: asyncio.Future, message: str) -> None:
    from .scheduler import ShuttingDown

    if not fut.done():
        fut.set_exception(ShuttingDown(message))


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def worker_main(index: int, conn, sock, config: dict) -> None:
    """A worker process: uvicorn and create_app's app on the engine's socket, a RemoteScheduler for engine."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the engine owns the GPU: nothing here may open a context on it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the group: the engine handles it
    import uvicorn

    from ..commands.serve import raise_open_files_limit
    from .app import create_app
    from .text import load_tokenizer

    raise_open_files_limit()
    remote = RemoteScheduler(conn, load_tokenizer(config["checkpoint"]), config["max_slots"], config["stream_interval"])
    remote.max_waiting = config["max_waiting"]  # (create_app refuses a request larger than slots + queue)
    app = create_app(remote, config["model_name"], config["max_positions"], config["max_prompt_tokens"])
    uv = uvicorn.Config(app, log_level=config["log_level"], backlog=config["backlog"],
                        timeout_graceful_shutdown=int(config["grace"]) + 10)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # The engine process decides when to stop (a terminal's Ctrl-C reaches every process of the group):
            # SIGINT is left to it; a SIGTERM sent to this worker alone stops it as uvicorn would, exit code 0.
            if sig == signal.SIGTERM:
                self.should_exit = True

    server = _Server(uv)
    remote.on_drain = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])

"""The HTTP side: FastAPI endpoints following OpenAI's API, in front of the engine loop (scheduler.py).

Every request becomes n Sequences; their Outputs arrive on this event loop (the engine thread posts them with
call_soon_threadsafe, one call a step) into a Mailbox per request. A client that goes away (its stream closed,
or the socket of a plain request) cancels its sequences, whose slots are free from the engine's next pass.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import random
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ChatRequest, CompletionRequest, error_body, field_of
from .scheduler import Output, QueueFull, Scheduler, Sequence, ShuttingDown
from .text import default_chat_template, render_chat


_TEXT, _REASON = "\x00text\x00", "\x00reason\x00"  # placeholders of the stream events' templates


class Mailbox:
    """A request's (index, Output)s as the engine loop posts them (on the event loop's thread); take() waits for
    some and returns all that came meanwhile. Lighter than an asyncio.Queue: one list append a token, one
    wake-up a batch."""

    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: list[tuple[int, Output]] = []
        self.waiter: asyncio.Future | None = None

    def put(self, item: tuple[int, Output]) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[tuple[int, Output]]:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


class BadRequest(Exception):
    """A request the client must change: a 400, or `status` (404 for an unknown model) with OpenAI's `code`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


async def settled(value):
    """value, or what it resolves to: a Scheduler answers at once, a worker's RemoteScheduler (workers.py)
    after a round trip to the engine process."""
    return await value if inspect.isawaitable(value) else value


def create_app(scheduler: Scheduler, model_name: str, max_positions: int | None = None,
               max_prompt_tokens: int | None = None) -> FastAPI:
    """The server's app.

    Args:
        scheduler: the engine loop (started with the app, stopped with it), or in an API worker process the
            RemoteScheduler that talks to it (workers.py).
        model_name: the id /v1/models lists, and the only `model` a request may name (or leave out).
        max_positions: a full-attention model's limit on prompt + max_tokens (None: no limit).
        max_prompt_tokens: the most tokens a prompt may have (`based serve --max-prompt-tokens`; None: no cap).
    """
    tokenizer = scheduler.tokenizer
    template = tokenizer.chat_template or default_chat_template()

    @asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()

        def deliver(items):
            for seq, out in items:
                seq.deliver(out)

        scheduler.post = lambda items: items and loop.call_soon_threadsafe(deliver, items)
        scheduler.start()
        yield
        scheduler.abort("the server is shutting down")
        await asyncio.to_thread(scheduler.stop, 10)

    app = FastAPI(title="based serve", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        # 400, not FastAPI's 422: OpenAI and vLLM answer a malformed request so.
        err = exc.errors()[0]
        param = field_of(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            where = err.get("loc", ())[-1]
            detail = (err.get("ctx") or {}).get("error", msg)
            return JSONResponse(error_body(f"the body is not valid JSON: {detail} (at character {where}); send "
                                           f"one JSON object", None), status_code=400)
        if param == "body" and err.get("type") in ("missing", "model_attributes_type", "dict_type"):
            msg = ("the body is empty: send a JSON object" if err.get("type") == "missing" else
                   "the body must be a JSON object, sent with content-type: application/json")
            return JSONResponse(error_body(msg, None), status_code=400)
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            head = msg.split(":", 1)[0]
            if param == "body" and head.replace("_", "").isalnum():
                param = head
        elif err.get("type") == "extra_forbidden":
            msg = f"{param}: unknown field"
        elif err.get("type") == "missing":
            msg = f"{param}: required field missing"
        else:
            msg = f"{param}: {msg}"
        return JSONResponse(error_body(msg, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        # Starlette's own answers (unknown route, wrong method) in OpenAI's shape instead of {"detail": ...}.
        where, status = f"{request.method} {request.url.path}", exc.status_code
        if status == 404:
            routes = ", ".join(f"{m} {r.path}" for r in app.routes if isinstance(r, APIRoute)
                               for m in sorted(r.methods))
            msg = f"Invalid URL ({where}): this server has {routes}"
        elif status == 405:
            allow = (exc.headers or {}).get("Allow", "another method")
            msg = f"Method not allowed ({where}): {request.url.path} takes {allow}"
        else:
            msg = f"{exc.detail} ({where})"
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return JSONResponse(error_body(msg, None, kind), status_code=status, headers=exc.headers)

    @app.exception_handler(BadRequest)
    async def bad(request, exc: BadRequest):
        return JSONResponse(error_body(str(exc), exc.param, code=exc.code), status_code=exc.status)

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        # A bug's 500 (Starlette logs the traceback after this answer) in the same shape as every other error.
        return JSONResponse(error_body("internal error (see the server log)", None, "server_error"), status_code=500)

    @app.exception_handler(QueueFull)
    async def full(request, exc: QueueFull):
        return JSONResponse(error_body(f"server busy: {exc}; retry later", None, "rate_limit_error"),
                            status_code=429, headers={"Retry-After": "1"})

    @app.exception_handler(ShuttingDown)
    async def closing(request, exc: ShuttingDown):
        return JSONResponse(error_body(str(exc), None, "server_error"), status_code=503)

    @app.get("/health")
    async def health():
        counts = await settled(scheduler.counts())
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped", **counts}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        text = await settled(scheduler.metrics.text())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "based"}]}

    def prompt_field(body) -> str:
        """The request field a prompt's error names: a chat's messages, a completion's prompt."""
        return "messages" if isinstance(body, ChatRequest) else "prompt"

    def check_model(body) -> None:
        # As vLLM: a request without a model (or an empty one) gets the served model.
        if body.model and body.model != model_name:
            raise BadRequest(f"The model `{body.model}` does not exist: this server serves `{model_name}` (as "
                             f"GET /v1/models lists); send that name or leave model out", "model", 404,
                             "model_not_found")

    def sequences(body, prompt: str, queue: Mailbox, base_index: int) -> list[Sequence]:
        field = prompt_field(body)
        ids = tokenizer.encode(prompt)
        if not ids:
            raise BadRequest(f"{field}: encodes to no tokens", field)
        # Here, before the engine: a fixed-state model takes any length, but a prompt's prefill holds a share
        # of every engine pass until it is done (300k tokens: seconds of it).
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise BadRequest(
                f"{field}: the prompt has {len(ids)} tokens, more than this server's limit of {max_prompt_tokens} "
                f"prompt tokens: shorten it, or start the server with a larger --max-prompt-tokens", field)
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:  # chat: as much as fits, else a bound of its own
            max_tokens = max(1, max_positions - len(ids)) if max_positions else 1024
        if max_positions is not None and len(ids) + max_tokens > max_positions:
            param = field if len(ids) >= max_positions else "max_tokens"
            raise BadRequest(
                f"{param}: the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds this model's "
                f"{max_positions} positions (full attention)", param)
        seed = body.seed if body.seed is not None else random.getrandbits(63)
        out = []
        for j in range(body.n):
            index = base_index + j
            out.append(Sequence(
                prompt=ids, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                top_k=max(0, body.top_k), seed=(seed + j + 2**63) % 2**64 - 2**63, stop=body.stops, ignore_eos=body.ignore_eos,
                incremental=body.stream or bool(body.stops),
                deliver=lambda o, i=index: queue.put((i, o)),
            ))
        return out

    async def submit(body, prompts: list[str]):
        # More sequences than the slots and the queue hold together can never be taken: a 400, not a 429 that a
        # client retries forever.
        most = scheduler.max_slots + getattr(scheduler, "max_waiting", float("inf"))
        if len(prompts) * body.n > most:
            param = "n" if body.n > 1 else prompt_field(body)
            raise BadRequest(f"{param}: {len(prompts)} prompt(s) x n {body.n} = {len(prompts) * body.n} sequences, "
                             f"more than this server ever holds at once ({most}: its slots and --max-waiting); "
                             f"send fewer prompts or a smaller n", param)
        queue = Mailbox()
        seqs = [s for i, p in enumerate(prompts) for s in sequences(body, p, queue, i * body.n)]
        await settled(scheduler.submit(seqs))
        return queue, seqs

    def usage(outs: dict[int, Output], n: int) -> dict:
        prompt = sum(o.prompt_tokens for i, o in outs.items() if i % n == 0)  # once per prompt, not per choice
        completion = sum(o.completion_tokens for o in outs.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def collect(request: Request, queue, seqs) -> dict[int, tuple[str, Output]]:
        """Wait for every sequence's end; a client gone meanwhile cancels them."""
        texts, ends = {i: [] for i in range(len(seqs))}, {}

        async def gather():
            while len(ends) < len(seqs):
                for i, out in await queue.take():
                    texts[i].append(out.text)
                    if out.finish_reason is not None:
                        ends[i] = out

        async def gone():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        work, watch = asyncio.create_task(gather()), asyncio.create_task(gone())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                for s in seqs:
                    scheduler.cancel(s)
        if not work.done() or work.cancelled():
            return None
        return {i: ("".join(texts[i]), ends[i]) for i in ends}

    def failed(results) -> JSONResponse | None:
        errors = [o.error for _, o in results.values() if o.error]
        if errors:
            return JSONResponse(error_body(errors[0], None, "server_error"), status_code=503)
        return None

    async def stream(request: Request, queue, seqs, chunk, include_usage: bool, n: int):
        """Server-sent events: a chunk per choice with what arrived since the last one, a last chunk with
        usage, then [DONE]. Outputs that queued up while the event loop was busy go out as one chunk: under load
        a stream sends fewer, larger chunks instead of falling behind."""
        ends: dict[int, Output] = {}
        templates: dict[int, list[str]] = {}

        def event(i: int, text: str, reason: str | None) -> str:
            """The event of chunk(i, text, reason), text not empty: the chunk's JSON is made once per choice
            with placeholders, and each event fills in its text and reason (json.dumps of two values, not of
            the whole chunk every time a stream sends)."""
            parts = templates.get(i)
            if parts is None:
                whole = f"data: {json.dumps(chunk(i, _TEXT, _REASON))}\n\n"
                head, _, rest = whole.partition(json.dumps(_TEXT))
                middle, _, tail = rest.partition(json.dumps(_REASON))
                parts = templates[i] = [head, middle, tail]
            return f"{parts[0]}{json.dumps(text)}{parts[1]}{json.dumps(reason)}{parts[2]}"

        try:
            for i in range(len(seqs)):
                first = chunk(i, None, None, first=True)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
            while len(ends) < len(seqs):
                items = await queue.take()
                texts: dict[int, list[str]] = {}
                for i, out in items:
                    if out.error:
                        yield f"data: {json.dumps(error_body(out.error, None, 'server_error'))}\n\n"
                        return
                    texts.setdefault(i, []).append(out.text)
                    if out.finish_reason is not None:
                        ends[i] = out
                events = []
                for i, parts in texts.items():
                    text, end = "".join(parts), ends.get(i)
                    if text:
                        events.append(event(i, text, end and end.finish_reason))
                    elif end is not None:
                        events.append(f"data: {json.dumps(chunk(i, text, end.finish_reason))}\n\n")
                if events:
                    yield "".join(events)
            if include_usage:
                yield f"data: {json.dumps(chunk(None, None, None) | {'choices': [], 'usage': usage(ends, n)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if len(ends) < len(seqs):
                for s in seqs:
                    scheduler.cancel(s)

    async def respond(body, request: Request, queue, seqs, head: dict, chunk, choice):
        """The endpoints' common end: server-sent events of `chunk`s, or one body of `choice`s with usage."""
        if body.stream:
            include = body.stream_options.include_usage if body.stream_options else True
            return StreamingResponse(stream(request, queue, seqs, chunk, include, body.n), media_type="text/event-stream")
        results = await collect(request, queue, seqs)
        if results is None:
            return Response(status_code=499)
        error = failed(results)
        if error is not None:
            return error
        choices = [choice(i, text, out) for i, (text, out) in sorted(results.items())]
        return head | {"choices": choices, "usage": usage({i: o for i, (_, o) in results.items()}, body.n)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        queue, seqs = await submit(body, prompts)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        def chunk(i, text, reason, first=False):
            if first:
                return None
            if i is None:
                return dict(head)
            return head | {"choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}]}

        def choice(i, text, out):
            return {"index": i, "text": text, "finish_reason": out.finish_reason, "logprobs": None}

        return await respond(body, request, queue, seqs, head, chunk, choice)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            prompt = render_chat(template, messages, tokenizer.eos_token, tokenizer.bos_token)
        except Exception as e:  # noqa: BLE001 - a template error is the request's (e.g. roles it refuses)
            raise BadRequest(f"messages: the chat template failed on them: {e}", "messages") from None
        queue, seqs = await submit(body, [prompt])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": model_name}
        if body.stream:
            head["object"] = "chat.completion.chunk"

        def chunk(i, text, reason, first=False):
            if i is None:
                return dict(head)
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return head | {"choices": [{"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}]}

        def choice(i, text, out):
            return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": out.finish_reason,
                    "logprobs": None}

        return await respond(body, request, queue, seqs, head, chunk, choice)

    return app

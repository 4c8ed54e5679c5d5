"""The ASGI app of `rsd serve` (Starlette): the OpenAI routes, the API key, request limits, errors in the OpenAI
shape, streaming, time-outs and disconnects.

    POST /v1/chat/completions   the messages through the target's chat template; the last user message is the question
    POST /v1/completions        the prompt as given
    GET  /v1/models             the one served model
    GET  /health                200 while the models are loaded and the server takes requests
    GET  /metrics               Prometheus text format (`rsd.serve.metrics`)

A request's trajectories are decoded by the engine (`rsd.serve.engine`), batched with every other request's. A
request past `request_timeout` ends with what it has (`finish_reason` "length", `rsd.finish_reason` "timeout"), or
with a 504 if none of its choices has a step yet (a streamed one has its 200 already: it always ends with what it
has). A client that goes away cancels its trajectories, whose caches are freed at their next step.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rsd.core import RSDError
from rsd.serve.engine import EndEvent, Engine, Job, QueueFull, StepEvent
from rsd.serve.metrics import Metrics
from rsd.serve.requests import APIError, ServerLimits, parse_body, problems_of
from rsd.serve.responses import DONE, Choice, Reply, StopScanner, openai_finish_reason, sse
from rsd.serve.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("rsd.serve")
TIMEOUT, DISCONNECTED = object(), object()


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    context: int | None = None  # the most tokens a model reads (for the prompt-length error)


class Server:
    """What every request handler shares."""

    def __init__(self, engine: Engine, limits: ServerLimits, options: ServeOptions) -> None:
        self.engine = engine
        self.limits = limits
        self.options = options
        self.metrics = Metrics(engine)
        self.ready = False


def create_app(engine: Engine, limits: ServerLimits, options: ServeOptions) -> Starlette:
    server = Server(engine, limits, options)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.startup()
        server.ready = True
        try:
            yield
        finally:  # after the drain: uvicorn has waited for the requests in flight (up to its grace period)
            server.ready = False
            await engine.shutdown()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {HTTPException: http_error, Exception: internal_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.server = server
    return app


# -- small routes -----------------------------------------------------------------------------------------------
async def models(request: Request) -> Response:
    server: Server = request.app.state.server
    try:
        check_auth(request, server.options.api_key)
    except APIError as exc:
        return error_response(exc)
    card = {"id": server.limits.served_model_name, "object": "model", "created": 0, "owned_by": "rsd"}
    if server.options.context is not None:
        card["max_model_len"] = server.options.context
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: Request) -> Response:
    ready = request.app.state.server.ready
    return JSONResponse({"status": "ok" if ready else "starting or stopping"}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.server.metrics.render()
    return Response(body, media_type=content_type)


async def http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}."))


async def internal_error(request: Request, exc: Exception) -> Response:
    return error_response(APIError(500, f"internal error ({type(exc).__name__}); the server goes on."))


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def check_auth(request: Request, key: str | None) -> None:
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: how long the comparison takes says nothing about how much of the key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'.", code="invalid_api_key"
        )


async def read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes.")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


# -- completions ------------------------------------------------------------------------------------------------
async def chat_completions(request: Request) -> Response:
    return await complete(request, ChatCompletionRequest, "chat")


async def completions(request: Request) -> Response:
    return await complete(request, CompletionRequest, "text")


async def complete(request: Request, schema: type, kind: str) -> Response:
    server: Server = request.app.state.server
    endpoint = request.url.path
    started = time.perf_counter()
    server.metrics.in_flight.inc()
    flow = None
    try:
        flow, body = await open_flow(server, request, schema, kind, started)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = stream(flow, include_usage, endpoint)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        response = await collect(flow, request)
    except APIError as exc:
        response = error_response(exc)
    except Exception as exc:  # a bug of ours: this request fails, the server goes on
        log.exception("request failed")
        if flow is not None:
            flow.cancel("error")
        response = error_response(APIError(500, f"internal error ({type(exc).__name__}); the server goes on."))
    finish_request(server, endpoint, response.status_code, started)
    return response


def finish_request(server: Server, endpoint: str, status: int, started: float) -> None:
    server.metrics.in_flight.dec()
    server.metrics.requests.labels(endpoint, str(status)).inc()
    server.metrics.latency.observe(time.perf_counter() - started)


async def open_flow(server: Server, request: Request, schema: type, kind: str, started: float):
    """Check the request and hand its trajectories to the engine; any refusal is an `APIError`."""
    check_auth(request, server.options.api_key)
    body = parse_body(await read_body(request, server.options.max_body_bytes), schema)
    problems = problems_of(body, server.limits)
    try:
        trajectories = [server.engine.start(p) for p in problems]
    except RSDError as exc:
        raise APIError(400, str(exc)) from None
    if trajectories[0].finish_reason == "context":
        raise context_error(len(trajectories[0].prompt_ids), server.options.context, kind)
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    jobs = [Job(i, traj, events, loop) for i, traj in enumerate(trajectories)]
    try:
        server.engine.submit(jobs)
    except QueueFull:
        engine = server.engine
        message = (
            f"the server is at capacity ({engine.max_concurrency} trajectories decoding, {engine.max_queue} waiting); "
            f"retry in a moment."
        )
        raise APIError(503, message, code="server_overloaded", headers={"Retry-After": "1"}) from None
    server.metrics.tokens.labels("prompt").inc(len(trajectories[0].prompt_ids))
    answer_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    reply = Reply(answer_id, kind, server.limits.served_model_name)
    return Flow(server, jobs, events, reply, body.stop_strings(), started), body


def context_error(prompt_tokens: int, context: int | None, kind: str) -> APIError:
    size = f"{prompt_tokens} tokens" if prompt_tokens else "longer than the context"
    message = (
        f"the prompt is {size}; this server's models read at most {context} tokens, the prompt and at least one "
        f"generated token. Shorten the prompt."
    )
    return APIError(400, message, param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")


class Flow:
    """A request's trajectories from the client's side: events in, choices out, the deadline, cancellation."""

    def __init__(self, server: Server, jobs: list[Job], events: asyncio.Queue, reply: Reply, stops, started: float):
        self.server, self.jobs, self.events, self.reply = server, jobs, events, reply
        self.choices = [Choice(job.index, StopScanner(stops)) for job in jobs]
        self.prompt_tokens = len(jobs[0].traj.prompt_ids)
        self.started = started
        timeout = server.options.request_timeout
        self.deadline: float | None = started + timeout if timeout > 0 else None
        self.timed_out = False
        self.first_step_seen = False

    @property
    def done(self) -> bool:
        return all(c.done for c in self.choices)

    async def next_event(self, watcher: asyncio.Future | None = None):
        """The next event; TIMEOUT once when the deadline passes; DISCONNECTED when `watcher` sees the client go."""
        remaining = None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())
        get = asyncio.ensure_future(self.events.get())
        waits = {get} if watcher is None else {get, watcher}
        await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        if watcher is not None and watcher.done():
            return DISCONNECTED
        self.timed_out, self.deadline = True, None
        self.cancel("timeout")
        return TIMEOUT

    def on_step(self, event: StepEvent) -> tuple[Choice, str] | None:
        """Record a step; the choice and the text it adds, or None when the choice stopped before it."""
        if not self.first_step_seen:
            self.first_step_seen = True
            self.server.metrics.first_step.observe(time.perf_counter() - self.started)
        choice = self.choices[event.index]
        if choice.scanner.stopped or choice.done:
            return None
        piece = choice.add_step(event.step)
        if choice.scanner.stopped:
            self.server.engine.cancel(self.jobs[event.index], "stop")
        return choice, piece

    def on_end(self, event: EndEvent) -> tuple[Choice, str]:
        choice = self.choices[event.index]
        return choice, choice.finish(event.reason, event.stats, event.error)

    def cancel(self, reason: str) -> None:
        for job, choice in zip(self.jobs, self.choices, strict=True):
            if not choice.done:
                self.server.engine.cancel(job, reason)


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(flow: Flow, request: Request) -> Response:
    """A whole answer: every choice to its end; a 504 if the deadline passes before any step."""
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        while not flow.done:
            event = await flow.next_event(watcher)
            if event is DISCONNECTED:
                flow.cancel("disconnect")
                return Response(status_code=499)  # nobody reads it; the trajectories are cancelled
            if event is TIMEOUT:
                if not any(c.steps for c in flow.choices):
                    timeout = flow.server.options.request_timeout
                    raise APIError(504, f"no step was ready within the request timeout of {timeout:g} s.")
            elif isinstance(event, StepEvent):
                flow.on_step(event)
            else:
                flow.on_end(event)
    finally:
        watcher.cancel()
    failed = next((c.error for c in flow.choices if c.error), None)
    if failed is not None:
        raise APIError(500, f"decoding failed: {failed}", code="internal_error")
    return JSONResponse(flow.reply.response(flow.prompt_tokens, flow.choices))


async def stream(flow: Flow, include_usage: bool, endpoint: str) -> AsyncIterator[str]:
    """Server-sent events: a chunk per committed step with its `rsd` record, a last chunk per choice with its
    finish reason, the usage chunk when asked, then [DONE]. Starlette cancels this when the client goes away."""
    reply, status = flow.reply, 499
    sent_first: set[int] = set()
    try:
        while not flow.done:
            event = await flow.next_event()
            if isinstance(event, StepEvent):
                if (recorded := flow.on_step(event)) is not None:
                    choice, piece = recorded
                    first = choice.index not in sent_first
                    sent_first.add(choice.index)
                    yield reply.chunk(choice.index, piece, first=first, rsd={"step": event.step.to_dict()})
            elif isinstance(event, EndEvent):
                for chunk in end_chunks(flow, event, sent_first):
                    yield chunk
        if include_usage:
            yield reply.usage_chunk(flow.prompt_tokens, flow.choices)
        yield DONE
        status = 200
    finally:
        flow.cancel("disconnect")  # only the trajectories not ended yet: the client went away mid-stream
        finish_request(flow.server, endpoint, status, flow.started)


def end_chunks(flow: Flow, event: EndEvent, sent_first: set[int]) -> list[str]:
    choice, rest = flow.on_end(event)
    chunks = []
    if rest or choice.index not in sent_first:
        chunks.append(flow.reply.chunk(choice.index, rest, first=choice.index not in sent_first))
        sent_first.add(choice.index)
    if choice.error is not None:
        chunks.append(sse(APIError(500, f"decoding failed: {choice.error}", code="internal_error").body()))
    finish = openai_finish_reason(choice.reason)
    record = {"finish_reason": choice.reason, "stats": choice.stats}
    chunks.append(flow.reply.chunk(choice.index, "", finish=finish, rsd=record))
    return chunks

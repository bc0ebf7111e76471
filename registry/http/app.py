"""The original plan's REST API (and what an HTTP user needs beyond it), over the gateway.

Bodies are decoded and encoded with msgspec into the contract's own types
(registry.http.models), so what is accepted here is what the registry folds; a
body that does not fit is a 422 naming the field. The OpenAPI document is
FastAPI's, with the bodies' schemas generated from the same types.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec
from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from registry.http import auth as httpauth
from registry.http.gateway import Gateway, NotFound, Unavailable
from registry.http.metrics import CountRequests, HttpMetrics
from registry.http.models import (
    Answer,
    HeartbeatRequest,
    RegisterRequest,
    error_location,
    openapi_components,
    ref,
)
from registry.protocol import WorkerCapability, WorkerStatus
from registry.query import Filter, QueryError, matches, parse_tags, rank

MAX_BODY = 1024 * 1024  # NATS's max_payload: nothing bigger could be published
HEALTH_EVERY_S = 2.0
FEED_POLL_S = 0.25  # a live feed notices a closing gateway this soon
WORKER_ID = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,128}$", max_length=128)]
TagPair = Annotated[str, StringConstraints(pattern=r"^[^=]+=", max_length=512)]
T = TypeVar("T")


class ApiError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _json(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def _error(status: int, description: str, schema: str = "Error") -> dict[int | str, Any]:
    return {status: {"description": description,
                     "content": {"application/json": {"schema": ref(schema)}}}}  # fmt: skip


def _answers(schema: str, *errors: dict[int | str, Any]) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {
        200: {"description": "OK", "content": {"application/json": {"schema": ref(schema)}}}
    }
    for e in errors:
        out.update(e)
    return out


def _body(schema: str) -> dict[str, Any]:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": ref(schema)}}}}  # fmt: skip


NOT_FOUND = _error(404, "no such worker")
INVALID = _error(422, "the body or a parameter does not fit the contract", "HTTPValidationError")
UNAVAILABLE = _error(503, "NATS did not answer in time; nothing changed, retry")
FORBIDDEN = _error(401, "no valid token for this worker (secured mode)")


async def _decode(request: Request, kind: type[T]) -> T:
    return _decode_body(await request.body(), kind)


def _decode_body(body: bytes, kind: type[T]) -> T:
    if len(body) > MAX_BODY:
        raise ApiError(413, f"body of {len(body)} bytes exceeds {MAX_BODY}")
    try:
        try:
            return msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError:  # 1.0 is an integer in JSON Schema: try once more
            return msgspec.convert(_integral(msgspec.json.decode(body)), type=kind)
    except msgspec.ValidationError as e:
        loc, msg = error_location(str(e))
        raise ApiError(422, [{"loc": ["body", *loc], "msg": msg, "type": "value_error"}]) from None
    except msgspec.DecodeError as e:
        raise ApiError(422, [{"loc": ["body"], "msg": f"not JSON: {e}", "type": "json_invalid"}]) from None


FAILURES = (ApiError, NotFound, Unavailable, httpauth.Refused)


def failure(e: Exception) -> tuple[int, bytes]:
    """The status and `{"detail": ...}` body for what a handler raised (FAILURES)."""
    if isinstance(e, ApiError):
        status, detail = e.status, e.detail
    elif isinstance(e, NotFound):
        status, detail = 404, f"no worker with id {e.args[0]!r}"
    elif isinstance(e, httpauth.Refused):
        status, detail = 401, str(e)
    else:
        status, detail = 503, str(e)
    return status, msgspec.json.encode({"detail": detail})


HEARTBEAT_STORED = msgspec.json.encode(Answer(success=True, message="heartbeat stored"))


async def beat(gateway: Gateway, guard: httpauth.Guard, worker_id: str, body: bytes,
               authorization: str | None) -> None:  # fmt: skip
    """One heartbeat over HTTP; raises what the handlers turn into 4xx/503."""
    req = _decode_body(body, HeartbeatRequest)
    if req.worker_id != worker_id:
        raise ApiError(400, f"worker id mismatch: path {worker_id!r}, body {req.worker_id!r}")
    guard.check_worker(worker_id, authorization)
    try:
        sent_at = req.sent_at()
    except ValueError:
        raise ApiError(422, [{"loc": ["body", "timestamp"], "type": "value_error",
                              "msg": "not an RFC 3339 date and time"}]) from None  # fmt: skip
    await gateway.heartbeat(worker_id, req.status, req.metrics, sent_at)


def _integral(value: Any) -> Any:
    """Floats without a fraction as ints, all the way down (what JSON Schema calls integers)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def create_app(gateway: Gateway, *, guard: httpauth.Guard | None = None,
               extra_metrics: CollectorRegistry | None = None) -> FastAPI:  # fmt: skip
    """The API over a started gateway; `guard` checks tokens (None: open mode);
    `extra_metrics`: more to serve at /metrics (the registry's own, in `registry up`)."""
    guard = guard or httpauth.Guard.open()
    metrics = HttpMetrics(gateway)
    app = FastAPI(
        title="worker registry", version="1",
        description="The original plan's REST API over the event-sourced registry: every "
        "write is the event an agent publishes, every read the bucket it is folded into.",
    )  # fmt: skip

    @app.exception_handler(ApiError)
    @app.exception_handler(NotFound)
    @app.exception_handler(Unavailable)
    @app.exception_handler(httpauth.Refused)
    async def _failed(request: Request, e: Exception) -> Response:
        status, body = failure(e)
        return Response(body, status_code=status, media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
        headers = dict(e.headers or {})
        if e.status_code == 405:  # Starlette names the methods of the first route that matched
            headers["Allow"] = ", ".join(sorted(_methods_at(app, request.url.path)))
        return JSONResponse({"detail": e.detail}, e.status_code, headers=headers)

    # ------------------------------------------------------------ the original plan's six

    @app.post("/api/v1/workers/register", tags=["workers"], openapi_extra=_body("RegisterRequest"),
              responses=_answers("Answer", _error(400, "bad request"), FORBIDDEN, INVALID,
                                 _error(413, "body too large"), UNAVAILABLE))  # fmt: skip
    async def register(request: Request) -> Response:
        """Register a worker (an id is generated when the registration has none)."""
        req = await _decode(request, RegisterRequest)
        guard.check_register(req.registration.worker_id, req.auth_token)
        wid = await gateway.register(req.registration, req.heartbeat_interval_s)
        return _json(Answer(success=True, message="worker registered", worker_id=wid))

    @app.post("/api/v1/workers/{worker_id}/heartbeat", tags=["workers"],
              openapi_extra=_body("HeartbeatRequest"),
              responses=_answers("Answer", _error(400, "worker id mismatch"), FORBIDDEN,
                                 NOT_FOUND, INVALID, _error(413, "body too large"),
                                 UNAVAILABLE))  # fmt: skip
    async def heartbeat(worker_id: WORKER_ID, request: Request) -> Response:
        """A heartbeat: status and metrics. 404 for a worker that is not registered.
        (Served by HeartbeatFastPath in front of this app; the same function answers.)"""
        await beat(gateway, guard, worker_id, await request.body(),
                   request.headers.get("authorization"))  # fmt: skip
        return Response(HEARTBEAT_STORED, media_type="application/json")

    @app.delete("/api/v1/workers/{worker_id}", tags=["workers"],
                responses=_answers("Answer", FORBIDDEN, NOT_FOUND, UNAVAILABLE))  # fmt: skip
    async def unregister(worker_id: WORKER_ID, request: Request) -> Response:
        """Unregister a worker: it goes offline at once (and is purged after retention)."""
        guard.check_worker(worker_id, request.headers.get("authorization"))
        await gateway.unregister(worker_id)
        return _json(Answer(success=True, message="worker unregistered"))

    @app.get("/api/v1/workers", tags=["workers"],
             responses=_answers("WorkerList", _error(400, "bad filter")))  # fmt: skip
    async def list_workers(
        capability: WorkerCapability | None = None, status: WorkerStatus | None = None,
        content_type: Annotated[str | None, Query(max_length=64)] = None,
        tag: Annotated[list[TagPair] | None, Query(description="key=value, repeatable")] = None,
        available: bool | None = None,
        include_offline: bool = Query(False, description="offline records too"),
    ) -> Response:
        """Live workers by id (the original plan's list), filtered as `registry workers`."""
        try:
            f = Filter(capability=capability, status=status, content_type=content_type,
                       tags=parse_tags(tag or []), available=available,
                       include_offline=include_offline)  # fmt: skip
        except QueryError as e:
            raise ApiError(400, str(e)) from None
        return _json([r for r in gateway.records() if matches(r, f)])

    @app.get("/api/v1/workers/stats", tags=["workers"], responses=_answers("Stats"))
    async def stats() -> Response:
        """The fleet as the original plan counts it."""
        return _json(gateway.stats())

    @app.get("/api/v1/workers/available", tags=["workers"], responses=_answers("WorkerList"))
    async def available(
        capability: WorkerCapability | None = None,
        content_type: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> Response:
        """Available workers that can take a job, least loaded first (`get_available_workers`;
        for `gpu` or `cpu`, hybrid workers count too)."""
        f = Filter(capability=capability, content_type=content_type, available=True,
                   for_picking=True)  # fmt: skip
        return _json(rank(r for r in gateway.records() if matches(r, f))[:limit])

    @app.get("/api/v1/workers/{worker_id}", tags=["workers"],
             responses=_answers("WorkerInfo", NOT_FOUND))  # fmt: skip
    async def get_worker(worker_id: WORKER_ID) -> Response:
        record = gateway.record(worker_id)
        if record is None:
            raise NotFound(worker_id)
        return _json(record)

    # ------------------------------------------------------------ beyond the plan

    @app.get("/api/v1/workers/{worker_id}/history", tags=["workers"],
             responses=_answers("History", NOT_FOUND, UNAVAILABLE))  # fmt: skip
    async def history(worker_id: WORKER_ID,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Response:  # fmt: skip
        """The worker's retained events, oldest first."""
        return _json(await gateway.history(worker_id, limit))

    @app.get("/api/v1/workers/{worker_id}/explain", tags=["workers"],
             responses=_answers("Explanation", NOT_FOUND, UNAVAILABLE))  # fmt: skip
    async def explain(worker_id: WORKER_ID) -> Response:
        """`registry explain`: why the worker is in the state it is, from its events."""
        return _json(await gateway.explain(worker_id))

    @app.get("/api/v1/health", tags=["registry"],
             responses=_answers("Health", _error(503, "the registry is not answering", "Health")))
    async def health() -> Response:
        """The registry's health: active process, lag, brake. 503 when nobody answers."""
        h = await gateway.health()
        return _json(h, 503 if h.status == "unavailable" else 200)

    @app.get("/api/v1/events", tags=["registry"], response_class=StreamingResponse,
             responses={200: {"description": "server-sent events: `worker` (a change: "
                              "{worker_id, record|null}) and `health` every 2 s",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}}})  # fmt: skip
    async def events(request: Request) -> StreamingResponse:
        """Every change of the bucket as it happens, and the health every 2 s."""
        return StreamingResponse(_feed(gateway, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.get("/metrics", tags=["registry"], include_in_schema=False)
    async def prometheus() -> Response:
        text = generate_latest(metrics.registry)
        if extra_metrics is not None:
            text += generate_latest(extra_metrics)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    _dashboard(app)
    _openapi(app)
    app.add_middleware(CountRequests, metrics=metrics)
    app.state.metrics = metrics
    return app


def _methods_at(app: FastAPI, path: str) -> set[str]:
    """Every method some route serves at this path (for a 405's Allow header)."""
    literal: set[str] = set()  # /api/v1/workers/stats is not worker "stats"
    templated: set[str] = set()
    for route in app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            into = templated if "{" in getattr(route, "path", "") else literal
            into |= set(getattr(route, "methods", None) or ())
    return literal or templated


async def _feed(gateway: Gateway, request: Request) -> AsyncIterator[bytes]:
    async with gateway.changes() as queue:
        yield b"retry: 2000\n\n"
        next_health = 0.0
        while not gateway.closing.is_set() and not await request.is_disconnected():
            now = time.monotonic()
            if now >= next_health:
                next_health = now + HEALTH_EVERY_S
                h = await gateway.health()
                yield b"event: health\ndata: " + msgspec.json.encode(h) + b"\n\n"
            try:
                change = await asyncio.wait_for(queue.get(), min(FEED_POLL_S, next_health - now))
            except TimeoutError:
                continue
            if change is None:  # fell behind: the page starts over
                yield b"event: overflow\ndata: {}\n\n"
                return
            yield b"event: worker\ndata: " + msgspec.json.encode(change) + b"\n\n"


def _dashboard(app: FastAPI) -> None:
    static = resources.files("registry.http") / "static"
    if not static.is_dir():
        return
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(static / "index.html"))


def _openapi(app: FastAPI) -> None:
    """FastAPI's document, with the msgspec-generated body schemas in its components."""
    make = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = make()
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(openapi_components())
            schemas["WorkerList"] = {"type": "array", "items": ref("WorkerInfo")}
            schemas["Error"] = {"type": "object", "required": ["detail"],
                                "properties": {"detail": {}}}  # fmt: skip
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]



class HeartbeatFastPath:
    """ASGI: `POST /api/v1/workers/{id}/heartbeat`, the call a fleet makes all the time,
    answered by `beat` without FastAPI's routing, dependency and exception layers (which
    cost more than the heartbeat itself); everything else goes to the app. The FastAPI
    route documents it and answers it the same way when called without this in front."""

    PATH = re.compile(r"/api/v1/workers/([A-Za-z0-9_-]{1,128})/heartbeat")
    ROUTE = "/api/v1/workers/{worker_id}/heartbeat"
    JSON: ClassVar = [(b"content-type", b"application/json")]

    def __init__(self, app: ASGIApp, gateway: Gateway, guard: httpauth.Guard,
                 metrics: HttpMetrics) -> None:  # fmt: skip
        self.app = app
        self.gateway = gateway
        self.guard = guard
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        m = self.PATH.fullmatch(scope.get("path", "")) if scope["type"] == "http" else None
        if m is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        body = await _read_body(receive)
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
        status, payload = 200, HEARTBEAT_STORED
        if body is None:
            status, payload = failure(ApiError(413, f"body exceeds {MAX_BODY} bytes"))
        else:
            try:
                await beat(self.gateway, self.guard, m.group(1), body, authorization)
            except FAILURES as e:
                status, payload = failure(e)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*self.JSON, (b"content-length", str(len(payload)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": payload})
        self.metrics.observe("POST", self.ROUTE, status, time.perf_counter() - started)


async def _read_body(receive: Receive) -> bytes | None:
    """The request body; None past MAX_BODY (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def create_asgi(gateway: Gateway, *, guard: httpauth.Guard | None = None,
                extra_metrics: CollectorRegistry | None = None) -> ASGIApp:  # fmt: skip
    """What uvicorn serves: the app, with the heartbeat fast path in front."""
    guard = guard or httpauth.Guard.open()
    app = create_app(gateway, guard=guard, extra_metrics=extra_metrics)
    return HeartbeatFastPath(app, gateway, guard, app.state.metrics)

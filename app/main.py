"""The ASGI application (`uvicorn app.main:app`): routes, error shapes, limits, health, metrics."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import mark_process_dead

from app import health, logs, metrics
from app.api import errors as api_errors
from app.api.gate import USER_REQUESTS, Gates
from app.api.routes import router
from app.broker import BrokerInspector
from app.db import make_engine, make_sessionmaker
from app.errors import ServiceError
from app.jobs import UnsafePublishMany
from app.ops import routes as ops
from app.publisher import background_publisher
from app.services import status, sync
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """Answers 413 to a request body above `limit` bytes, before any handler or database work.

    A declared `Content-Length` is checked up front; a chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._reject(scope, receive, send)
                return
        received = 0
        rejected = False

        async def counting_receive() -> Message:
            # Past the limit, answer 413 ourselves and tell the app the client went away.
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    rejected = True
                    await self._reject(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not rejected:
                raise

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {
                "detail": [
                    {
                        "loc": ["body"],
                        "msg": f"request body is larger than {self.limit} bytes",
                        "type": "too_large",
                    }
                ]
            },
            status_code=413,
        )
        await response(scope, receive, send)


# A 422 lists at most this many errors (and says how many there were): a body of 100,000 bad
# values would otherwise get a response of tens of MB, built on the event loop.
MAX_ERRORS_SHOWN = 20


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's error list without the `input` it echoes: that can be the whole body, and can
    hold what JSON or UTF-8 cannot carry (NaN, a lone surrogate), so the 422 itself would fail.
    The first `MAX_ERRORS_SHOWN` only."""
    errors = []
    for error in list(exc.errors())[:MAX_ERRORS_SHOWN]:
        shown = {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
        if "ctx" in error:
            shown["ctx"] = jsonable_encoder(error["ctx"])
        errors.append(shown)
    return errors


def create_app(
    settings: Settings | None = None, send_many: UnsafePublishMany | None = None
) -> FastAPI:
    """The API. Its background publisher sends the requests' jobs through `send_many`, by
    default a `BoundedPublisher` of these settings; it runs for the app's lifespan."""
    settings = settings or get_settings()
    settings.signing_secret  # noqa: B018 - refuse to start without a real secret
    metrics.check_multiprocess(settings.prometheus_multiproc_dir)
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    publisher = background_publisher(settings, send_many, release=sync.releaser(factory))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A thread that holds the GIL (parsing a large body, serializing a long transcript)
        # hands it over after 1 ms instead of Python's 5: every step of every other request
        # waits for that handover, and a request takes a dozen steps.
        sys.setswitchinterval(settings.api_gil_switch_seconds)
        publisher.start()
        try:
            yield
        finally:
            # Blocks for up to `publish_drain_seconds`: not on the event loop.
            dropped = await anyio.to_thread.run_sync(publisher.close)
            if not dropped:  # else the publisher has said what it dropped
                log.info("publisher closed: every buffered job was sent")
            if settings.prometheus_multiproc_dir:
                # This process's live gauges leave the sums of the others (its counters stay).
                mark_process_dead(os.getpid(), settings.prometheus_multiproc_dir)  # type: ignore[no-untyped-call]

    api = FastAPI(title="chat-dualwrite", version="0.1.0", lifespan=lifespan)
    api.state.settings = settings
    api.state.engine = engine
    api.state.sessionmaker = factory
    api.state.publisher = publisher
    api.state.chat_gates = Gates(
        settings.chat_write_concurrency, settings.chat_write_queue, settings.chat_write_wait_seconds
    )
    api.state.user_gates = Gates(
        settings.user_concurrency,
        settings.user_queue,
        settings.user_wait_seconds,
        USER_REQUESTS,
    )
    api.include_router(router)
    ops.install(api)  # the rollout page, `/ops/` (404 without OPS_BASIC_AUTH)

    @api.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(
            {"detail": [{"loc": list(exc.field), "msg": exc.message, "type": type(exc).__name__}]},
            status_code=exc.status_code,
        )

    api_errors.install(api, settings)

    @api.exception_handler(RequestValidationError)
    async def request_validation_error(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        return JSONResponse(
            {"detail": validation_errors(exc), "error_count": len(exc.errors())},
            status_code=422,
        )

    api.add_middleware(BodyLimit, limit=settings.max_request_bytes)

    # Added last, so outermost: it also counts 413s of the body limit and unhandled errors.
    @api.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Any]]
    ) -> Any:
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            labels = metrics.request_labels(request.method, request.scope.get("route"), status)
            metrics.REQUESTS.labels(*labels).inc()

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        # Liveness only: the event loop answers (no thread, no dependency), so a database or
        # broker outage does not make an orchestrator restart every API process (`/readyz`).
        return {"status": "ok"}

    # `/readyz` checks the database on an engine of its own, one connection and no overflow (its
    # check runs in one thread at a time): a storm of requests that holds every connection of the
    # API's pool makes requests wait, but cannot make the process look unready and be taken out.
    ready_engine = make_engine(settings, pool_size=1, max_overflow=0)
    api.state.ready_engine = ready_engine
    readiness = health.Readiness(
        [
            health.database_check(make_sessionmaker(ready_engine)),
            health.broker_check(settings),
        ],
        timeout=settings.ready_timeout_seconds,
        cache_seconds=settings.ready_cache_seconds,
    )
    api.state.readiness = readiness

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        report = await readiness.report()
        return JSONResponse(report.body(), status_code=200 if report.ready else 503)

    def read_gauges() -> dict[str, Any]:
        with api.state.sessionmaker() as session:
            return status.database_gauges(session)

    # The API's own counters: this process's, or with PROMETHEUS_MULTIPROC_DIR those of every
    # process of this instance, summed. The database gauges are read by the process that
    # answers, once per scrape: facts of the cluster, which no process count may multiply.
    counted = (
        metrics.multiprocess_registry(settings.prometheus_multiproc_dir)
        if settings.prometheus_multiproc_dir
        else REGISTRY
    )
    shared = CollectorRegistry()
    shared.register(
        metrics.DatabaseCollector(metrics.Cached(read_gauges, settings.metrics_cache_seconds))
    )
    queues = BrokerInspector(settings, timeout=health.BROKER_TIMEOUT_SECONDS)
    shared.register(
        metrics.BrokerCollector(
            metrics.Cached(lambda: {"depths": queues.depths()}, settings.metrics_cache_seconds)
        )
    )

    @api.get("/metrics")
    def prometheus_metrics() -> PlainTextResponse:
        body = generate_latest(counted) + generate_latest(shared)
        return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)

    return api


def __getattr__(name: str) -> Any:
    # `app.main:app` is built on first access, so importing this module needs no environment.
    if name == "app":
        # The served process: its logging (uvicorn's loggers included) follows LOG_FORMAT.
        logs.configure()
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)

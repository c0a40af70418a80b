"""The HTTP query API (`memvq serve`): a FastAPI app over one loaded `RAGPipeline`.

It owns the app and its lifetime: routes, the settings (batching, limits, API key), the dynamic batcher that
starts and stops with the app, and which middleware guards it. The wire models live in `schema`, the guards in
`guards`, the metrics in `metrics` (all in `memvq.serve`). All state lives on the app (`app.state.server`), so
several apps can live in one process (tests do).

    POST /v1/answer         {question, top_k?, rerank_k?, max_answer_tokens?, return_passages?}
    POST /v1/answer:batch   {questions: [...], same options}
    POST /v1/retrieve       {question, top_k?, return_passages?}
    GET  /healthz  /readyz  /metrics       and the OpenAPI schema at /openapi.json (/docs: Swagger UI)
    GET  /                  the web page (`page`)
    POST /v1/chat/completions, GET /v1/models: OpenAI-compatible (`openai_api`)
"""

# No `from __future__ import annotations` here: the request models are built per app (their limits come from the
# settings) and FastAPI must see the endpoints' annotations as objects.

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, NamedTuple, Protocol

from fastapi import APIRouter, FastAPI, Security
from fastapi.responses import Response
from fastapi.security import APIKeyHeader, HTTPBearer

from memvq.encoders.options import QueryOptions
from memvq.memory.artifact import ArtifactError
from memvq.memory.integrity import FileWatch
from memvq.memory.store import MemoryStore
from memvq.pipelines.rag import RAGAnswer
from memvq.retrieval.retriever import RetrievedPassage
from memvq.serve.batcher import (
    Batcher,
    BatcherClosedError,
    BatchFn,
    BatchObserver,
    Completed,
    DynamicBatcher,
    QueueFullError,
)
from memvq.serve.guards import ApiKeyGuard, BodyGuard, StoreGuard
from memvq.serve.metrics import CONTENT_TYPE, RequestMetrics, ServerMetrics
from memvq.serve.openai_api import OpenAIErrors, openai_router
from memvq.serve.page import page_router
from memvq.serve.schema import (
    AnswerResponse,
    AnswerSpanModel,
    ApiError,
    BatchAnswerResponse,
    ErrorResponse,
    Provenance,
    RetrieveResponse,
    error_response,
    install_error_handlers,
    query_options,
    request_models,
)
from memvq.serve.settings import ServeSettings
from memvq.serve.watch import StoreWatcher

logger = logging.getLogger(__name__)


class QAPipeline(Protocol):
    """What the server needs of a pipeline (`RAGPipeline`, or a fake in tests)."""

    @property
    def config(self) -> Any: ...

    precision: str  # "fp32" or "bf16": what the reader computes in
    generation: int  # of the store the answers come from

    def answer(self, questions: list[str], options: QueryOptions | None) -> list[RAGAnswer]: ...

    def retrieve(self, questions: list[str], options: QueryOptions | None) -> list[list[RetrievedPassage]]: ...


class BatchKey(NamedTuple):
    """Requests go in one model call only when both are equal (the options resolved, so that a default and the
    same value given batch together)."""

    op: str  # "answer" or "retrieve"
    options: QueryOptions


# How an app batches its questions: (run, settings, observe) -> a batcher. The default is the in-process
# `DynamicBatcher`; a Ray Serve replica passes Ray Serve's batching (`memvq.serve.replicas.ServeBatcher`).
MakeBatcher = Callable[[BatchFn[Any], ServeSettings, BatchObserver], Batcher]


def in_process_batcher(run: BatchFn[Any], settings: ServeSettings, observe: BatchObserver) -> Batcher:
    """The batcher of the single-process `memvq serve`: one worker thread, batches formed per key."""
    return DynamicBatcher(
        run,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        observe=observe,
    )


# -- the app -------------------------------------------------------------------------------------------------------


class Server:
    """What one app holds: the pipeline, its batcher, settings, metrics and readiness."""

    def __init__(
        self,
        pipeline: QAPipeline,
        settings: ServeSettings,
        watch: FileWatch | None = None,
        batcher: MakeBatcher = in_process_batcher,
    ) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.watcher = StoreWatcher(watch, settings.watch_interval_s, self.reopen)
        self.metrics = ServerMetrics()
        self.batcher = batcher(self._run, settings, self.metrics.observe_batch)
        self.metrics.queue_depth.set_function(lambda: self.batcher.pending)
        self.ready = False

    def _run(self, questions: list[str], key: BatchKey) -> Sequence[Any]:
        """One model call (on the batcher's worker thread), on one generation of the store."""
        pipeline = self.pipeline
        if key.op == "answer":
            return pipeline.answer(questions, options=key.options)
        start = time.perf_counter()
        found = pipeline.retrieve(questions, options=key.options)
        ms = (time.perf_counter() - start) * 1000.0
        return [(passages, ms) for passages in found]

    def reopen(self) -> FileWatch | None:
        """Serve the store's generation published now (on the watch's thread): open and verify it, then give new
        batches a pipeline over it; a batch running keeps the pipeline, and so the generation, it started with.
        Returns the new generation's watch."""
        old = self.pipeline.store
        store = MemoryStore.open(old.layout.root)
        if store.manifest["backbone"] != old.manifest["backbone"] or store.manifest["codec"] != old.manifest["codec"]:
            raise ArtifactError(
                f"{old.layout.root} now holds a store of another encoder or codec (not a generation of the one "
                "served): restart the server on it"
            )
        _ = store.index  # loaded now, so that the prune of an older generation cannot remove it under a reader
        self.pipeline = self.pipeline.with_store(store)
        logger.info("serving generation %d of the store %s", store.generation, store.layout.root)
        return store.watch

    @property
    def store_changed(self) -> str:
        changed = ", ".join(self.watcher.damaged)
        return f"store files changed under the server ({changed}): restart it on a store that verifies"

    def key(self, op: str, request: Any) -> BatchKey:
        """The request's options with the reader's defaults filled in (so that equal options batch together)."""
        try:
            return BatchKey(op, query_options(request).resolved(self.pipeline.config))
        except ValueError as error:
            raise ApiError(422, "invalid_request", str(error)) from error

    async def submit(self, questions: list[str], key: BatchKey) -> list[Completed[Any]]:
        """Questions through the batcher; batcher and model failures become API errors."""
        if self.watcher.damaged:
            raise ApiError(503, "store_changed", self.store_changed)
        if not self.ready:
            raise ApiError(503, "unavailable", "the server is not ready", {"Retry-After": "1"})
        try:
            done = await self.batcher.submit_many(questions, key)
        except QueueFullError as error:
            raise ApiError(503, "overloaded", f"too many requests waiting ({error})", {"Retry-After": "1"}) from error
        except BatcherClosedError as error:
            raise ApiError(503, "unavailable", str(error), {"Retry-After": "1"}) from error
        except Exception as error:
            raise ApiError(500, "model_error", f"the model failed on this request ({type(error).__name__})") from error
        for item in done:
            self.metrics.queue_wait.labels(key.op).observe(item.queued_ms / 1000.0)
        self.metrics.questions.labels(key.op).inc(len(done))
        return done


def _provenance(passages: list[RetrievedPassage], with_text: bool) -> list[Provenance]:
    return [Provenance(**passage.provenance(with_text)) for passage in passages]


def _answer_response(done: Completed[RAGAnswer], with_text: bool) -> AnswerResponse:
    result = done.value
    span = None
    if result.span is not None and not result.abstained:
        passage_id = result.passages[result.span.passage].passage_id
        span = AnswerSpanModel(passage_id=passage_id, start=result.span.char_start, end=result.span.char_end)
    optional = {"answer_span": span, "confidence": result.confidence}  # left out of the JSON when None
    return AnswerResponse(
        question=result.question,
        answer=result.given,  # null when it abstained
        abstained=result.abstained,
        provenance=_provenance(result.passages, with_text),
        timings_ms={**result.timings_ms, "queue": done.queued_ms},
        batch_size=done.batch_size,
        **{key: value for key, value in optional.items() if value is not None},
    )


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (401, "missing or wrong API key"),
        (413, "request body too large"),
        (422, "invalid request (empty or over-long question, wrong type, option out of range)"),
        (500, "the model failed on this request"),
        (503, "not ready, shutting down or overloaded"),
    )
}


def create_app(
    pipeline: QAPipeline,
    settings: ServeSettings | None = None,
    watch: FileWatch | None = None,
    batcher: MakeBatcher = in_process_batcher,
) -> FastAPI:
    """The API over a loaded pipeline; the batcher (and the store's `watch`, when given) run while the app does.
    `batcher` makes the batcher the questions go through (default: the in-process `DynamicBatcher`)."""
    settings = settings or ServeSettings()
    server = Server(pipeline, settings, watch, batcher)
    keyed = settings.api_key is not None
    app = FastAPI(
        title="memvq",
        version="1",
        summary="Retrieval-augmented question answering over a compressed passage memory.",
        description=(
            "Answers come from the passages retrieved from the store and read by the reader; `provenance` lists "
            "the passages read, best first. Concurrent requests are batched into one model call. "
            + ("Every endpoint but the page (/), /healthz and /readyz needs the API key." if keyed else "")
        ),
        lifespan=_lifespan(server),
        # no 307 to the path without its trailing slash: its Location would be built from the client's Host header
        redirect_slashes=False,
    )
    app.state.server = server
    install_error_handlers(app)
    # Declarative only (the ApiKeyGuard middleware checks the key): shows the schemes in the OpenAPI schema.
    security = (
        [Security(APIKeyHeader(name="X-API-Key", auto_error=False)), Security(HTTPBearer(auto_error=False))]
        if keyed
        else []
    )
    models = request_models(settings)
    api, answer = _query_routes(server, models, security)
    app.include_router(api)
    app.include_router(openai_router(lambda: server.pipeline, models[0], answer, security, ERROR_RESPONSES))
    app.include_router(page_router())
    app.include_router(_health_routes(server, security))
    # Outermost last: metrics count every response, errors on the OpenAI routes are reshaped whoever answered them,
    # the key is checked before the store and the store before the body is read.
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(StoreGuard, changed=lambda: server.store_changed if server.watcher.damaged else None)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key.get_secret_value())
    app.add_middleware(OpenAIErrors)
    app.add_middleware(RequestMetrics, metrics=server.metrics)
    return app


def _lifespan(server: Server) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The batcher and the store watch run while the app does; ready in between."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.batcher.start()
        server.watcher.start()
        server.ready = True
        try:
            yield
        finally:
            server.ready = False
            await server.watcher.stop()
            await server.batcher.stop()

    return lifespan


def _query_routes(server: Server, models: tuple[type, type, type], security: list[Any]) -> tuple[APIRouter, Any]:
    """/v1/answer, /v1/answer:batch and /v1/retrieve, with the request models of the server's limits; and the
    answer endpoint (the OpenAI route answers through it)."""
    AnswerRequest, BatchAnswerRequest, RetrieveRequest = models
    api = APIRouter(prefix="/v1", dependencies=security, responses=ERROR_RESPONSES)

    @api.post("/answer", response_model=AnswerResponse, response_model_exclude_unset=True)
    async def answer(request: AnswerRequest) -> AnswerResponse:
        """Answer one question, with the passages read as provenance."""
        [done] = await server.submit([request.question], server.key("answer", request))
        return _answer_response(done, request.return_passages)

    @api.post("/answer:batch", response_model=BatchAnswerResponse, response_model_exclude_unset=True)
    async def answer_batch(request: BatchAnswerRequest) -> BatchAnswerResponse:
        """Answer many questions that share the options (they go through the model in batches)."""
        done = await server.submit(list(request.questions), server.key("answer", request))
        return BatchAnswerResponse(answers=[_answer_response(item, request.return_passages) for item in done])

    @api.post("/retrieve", response_model=RetrieveResponse, response_model_exclude_none=True)
    async def retrieve(request: RetrieveRequest) -> RetrieveResponse:
        """The top_k passages of a question (no answer)."""
        [done] = await server.submit([request.question], server.key("retrieve", request))
        passages, ms = done.value
        return RetrieveResponse(
            question=request.question,
            passages=_provenance(passages, request.return_passages),
            timings_ms={"retrieve": ms, "queue": done.queued_ms},
            batch_size=done.batch_size,
        )

    return api, answer


def _health_routes(server: Server, security: list[Any]) -> APIRouter:
    """/healthz, /readyz and /metrics."""
    router = APIRouter()

    @router.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up (no model involved)."""
        return {"status": "ok"}

    @router.get("/readyz", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def readyz() -> Any:
        """Ready to answer: the model is loaded, its worker runs and the store's files are those it verified."""
        if server.watcher.damaged:
            return error_response(503, "store_changed", server.store_changed)
        if not server.ready or not server.batcher.running:
            return error_response(503, "unavailable", "not ready", **{"Retry-After": "1"})
        pipeline = server.pipeline
        config, precision = pipeline.config, pipeline.precision
        return {
            "status": "ready",
            "reader": config.mode,
            "top_k": config.top_k,
            "precision": precision,
            "generation": pipeline.generation,
        }

    @router.get("/metrics", dependencies=security, response_class=Response)
    async def metrics() -> Response:
        """Prometheus text: request counts and latencies, batch sizes and times, queue wait and depth."""
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return router

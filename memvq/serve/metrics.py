"""The query API's Prometheus metrics: one registry per app, and the middleware that counts every response.

Request counts by endpoint, method and status (errors answered by middleware included; 499: the client went away
first), request latency, requests in progress; per model call: batch size, duration, failures; per question: queue
wait; the queue depth. Endpoint and method labels come from fixed sets, so clients cannot grow the series.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Labels stay bounded whatever clients send: other paths and methods are counted as "other".
KNOWN_PATHS = frozenset(
    {"/v1/answer", "/v1/answer:batch", "/v1/retrieve", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"}
    | {"/", "/v1/chat/completions", "/v1/models"}  # the page, the OpenAI-compatible routes
)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CLIENT_CLOSED = "499"  # the status label of a request whose client went away before its response (as nginx)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The Prometheus metrics of one app, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "memvq_http_requests", "HTTP requests answered", ["endpoint", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "memvq_http_request_duration_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "memvq_http_requests_in_progress", "HTTP requests being served", registry=self.registry
        )
        self.batch_size = Histogram(
            "memvq_batch_size", "questions per model call", ["op"], buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "memvq_batch_duration_seconds", "model call time", ["op"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_failures = Counter("memvq_batch_failures", "model calls that raised", ["op"], registry=self.registry)
        self.queue_wait = Histogram(
            "memvq_queue_wait_seconds",
            "time a question waited for its model call",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.questions = Counter("memvq_questions", "questions answered or retrieved", ["op"], registry=self.registry)
        self.queue_depth = Gauge("memvq_queue_depth", "questions waiting for the model", registry=self.registry)

    def observe_batch(self, key: Any, size: int, seconds: float, failed: bool) -> None:
        """The batcher's observer (`key.op`: the operation, a label)."""
        self.batch_size.labels(key.op).observe(size)
        self.batch_seconds.labels(key.op).observe(seconds)
        if failed:
            self.batch_failures.labels(key.op).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Counts every HTTP response (errors from the other middleware included) and times it."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
        status = "500"  # unless a response starts or the client goes first
        started = False
        start = time.perf_counter()

        async def receive_status() -> Message:
            nonlocal status
            message = await receive()
            if message["type"] == "http.disconnect" and not started:
                status = CLIENT_CLOSED
            return message

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = str(message["status"]), True
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive_status, send_status)
        finally:
            self.metrics.in_progress.dec()
            self.metrics.requests.labels(endpoint, method, status).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

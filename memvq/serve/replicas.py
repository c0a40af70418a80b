"""`memvq serve --replicas N`: the same API as N Ray Serve replicas behind a router, behind Ray Serve's HTTP proxy.

Each replica (`MemvqReplica`, one Ray actor) loads its own `RAGPipeline` (the store memory-mapped, so the
replicas of one machine share its pages) and builds the app with `create_app`, the one definition of the routes,
errors, API key, body guard, metrics and OpenAI routes. Only the batching differs: on a replica, questions go
through Ray Serve's `@serve.batch` (`ServeBatcher`) in place of the in-process `DynamicBatcher`.

- Ray Serve's proxy listens on HOST:PORT and hands each request to the router (`Router`, the ingress: one actor,
  no CPU reserved), which reads its body once (the size limit, the body deadline) and hands the whole request to
  a replica (the one with fewer requests of two picked at random) through a deployment handle. A question is a
  read: when the replica dies before it answers (or is gone when asked), the router asks another one, until
  `retry_timeout_s`; only then the client gets 503 with Retry-After, in the API's error shape. A replica's whole
  response comes back at once (a streamed chat completion too: its events arrive together). Every response names
  its replica in the `X-Memvq-Replica` header.
- /readyz and /metrics are answered by whichever replica gets the request: each replica has its own Prometheus
  registry (the response's `X-Memvq-Replica` tells which). Totals are the sum over replicas; Ray Serve exports its
  own per-replica metrics (`ray_serve_*`) on Ray's metrics port.
- A replica whose process dies is replaced by Serve. A replica whose store files changed under it (the store
  watch) answers 503 `store_changed` on every route but /healthz and logs it; it stays up (no restart loop:
  restart `memvq serve` on a store that verifies).
- Limits: `max_queue` is also the number of requests the replicas queue before the router answers 503
  (`max_queued_requests`); a replica takes at most twice `max_batch_size` requests at a time. The request-header
  deadline and the access log are those of Ray Serve's proxy, not `runner.serve`'s.

By default the command starts a local Ray and stops it (Serve with it) on exit; with `--ray-address` (or
`RAY_ADDRESS`) it deploys onto that cluster and on exit deletes its application only, leaving Serve and the cluster
running (the store and reader paths must then exist on the cluster's nodes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memvq.pipelines.config import LoadOptions
from memvq.serve.app import create_app
from memvq.serve.batcher import (
    BatcherClosedError,
    BatchFn,
    BatchObserver,
    Completed,
    QueueFullError,
    call_model,
    notify,
)
from memvq.serve.openai_api import OPENAI_PATHS, openai_error
from memvq.serve.schema import error_response
from memvq.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

APP_NAME = "memvq"
DEPLOYMENT_NAME = "memvq"
ROUTER_NAME = "memvq-router"
REPLICA_HEADER = "X-Memvq-Replica"


# -- batching on a replica -----------------------------------------------------------------------------------------


@dataclass
class _Question:
    question: str
    key: Hashable
    enqueued: float = field(default_factory=time.perf_counter)


class ServeBatcher:
    """Ray Serve's `@serve.batch` behind the server's batcher interface (`batcher.Batcher`).

    Concurrent questions are gathered into batches of at most `max_batch_size`, waiting at most `max_wait_ms` for
    one to fill; a batch runs as one model call per distinct key (operation and options) on one worker thread, so
    the replica's event loop stays free. Serve forms a batch from what arrives within `max_wait_ms` whether or not
    the model is busy; questions that arrive while it is busy are held here until it is free and then handed to
    Serve together (as `DynamicBatcher` counts its wait from when the model became free), else a busy replica would
    queue many batches of one or two. Like `DynamicBatcher`: a failing model call fails its own questions only, the
    questions of one request are admitted all or none (`max_queue`), and those of a request whose client went away,
    or one of whose questions failed, are dropped before they run."""

    def __init__(self, run: BatchFn[Any], settings: ServeSettings, observe: BatchObserver | None = None) -> None:
        self.run = run
        self.max_queue = settings.max_queue
        self.observe = observe
        self._pending = 0
        self._executor: ThreadPoolExecutor | None = None
        self._idle = asyncio.Event()  # the model is not running a batch: questions may go to Serve's batching
        self._idle.set()

        async def run_batch(items: list[_Question]) -> list[Completed[Any] | Exception]:
            return await self._run_batch(items)

        self._batched = serve.batch(
            max_batch_size=settings.max_batch_size, batch_wait_timeout_s=settings.max_wait_ms / 1000.0
        )(run_batch)

    @property
    def running(self) -> bool:
        return self._executor is not None

    @property
    def pending(self) -> int:
        """Questions submitted and not answered yet (the batch being run included)."""
        return self._pending

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memvq-model")

    async def stop(self) -> None:
        """Refuse new questions; the batch running finishes, those still waiting get `BatcherClosedError`."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def submit_many(self, questions: Sequence[str], key: Hashable = None) -> list[Completed[Any]]:
        if self._executor is None:
            raise BatcherClosedError("the model worker is not running")
        if self._pending + len(questions) > self.max_queue:
            raise QueueFullError(f"{self._pending} questions already waiting, {len(questions)} more refused")

        async def one(question: str) -> Completed[Any]:
            item = _Question(question, key)
            await self._idle.wait()
            done = await self._batched(item)
            if isinstance(done, Exception):
                raise done
            return done

        self._pending += len(questions)
        tasks = [asyncio.ensure_future(one(question)) for question in questions]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # one failed, or the caller was cancelled: withdraw the others
            for task in tasks:
                task.cancel()
            raise
        finally:
            self._pending -= len(questions)

    async def _run_batch(self, items: list[_Question]) -> list[Completed[Any] | Exception]:
        """One batch of Serve's: a model call per key, in order of first arrival; a result or error per item."""
        results: list[Completed[Any] | Exception] = [BatcherClosedError("the server is shutting down")] * len(items)
        groups: dict[Hashable, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.key, []).append(i)
        self._idle.clear()
        try:
            for key, indices in groups.items():
                if self._executor is None:
                    break
                await self._run_group(key, [items[i] for i in indices], indices, results)
        finally:
            self._idle.set()
        return results

    async def _run_group(
        self, key: Hashable, items: list[_Question], indices: list[int], results: list[Completed[Any] | Exception]
    ) -> None:
        """One model call for the questions of one key; their results (or its error) go to `results[indices]`."""
        assert self._executor is not None
        started = time.perf_counter()
        failed = False
        try:
            loop = asyncio.get_running_loop()
            values = await loop.run_in_executor(
                self._executor, call_model, self.run, [item.question for item in items], key
            )
        except Exception as error:  # a failing model call fails its own questions; the next key's goes on
            failed = True
            logger.exception("a batch of %d failed", len(items))
            for i in indices:
                results[i] = error
        else:
            for i, item, value in zip(indices, items, values, strict=True):
                results[i] = Completed(value, len(items), (started - item.enqueued) * 1000.0)
        notify(self.observe, key, len(items), time.perf_counter() - started, failed)


# -- the replica ---------------------------------------------------------------------------------------------------


class ReplicaHeader:
    """Names the replica that answered in every HTTP response (`X-Memvq-Replica`)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the router read it (the whole body), handed to a replica."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class Reply:
    """A replica's whole HTTP response."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def call_app(app: ASGIApp, request: Forwarded) -> Reply:
    """Run one request through an ASGI app in this process: its body is given at once (nothing to wait for; the
    connection stays open until the response is complete) and the whole response is collected."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": request.client,
        "server": None,
    }
    delivered = False
    never = asyncio.Event()

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await never.wait()  # the caller cancels this call if its client goes away
        return {"type": "http.disconnect"}

    start: Message | None = None
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    if start is None:
        raise RuntimeError(f"the app sent no response to {request.method} {request.path}")
    return Reply(start["status"], list(start.get("headers", [])), b"".join(chunks))


@serve.deployment(name=DEPLOYMENT_NAME)
class MemvqReplica:
    """One replica: a pipeline loaded from the store and reader, and the API over it with Ray Serve's batching;
    the router hands it whole requests (`handle`)."""

    def __init__(self, store: str, model: str, load: LoadOptions, settings: ServeSettings) -> None:
        from memvq.pipelines.rag import RAGPipeline

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pipeline = RAGPipeline.load(store, model, **load.model_dump())
        self.app = create_app(self.pipeline, settings, watch=self.pipeline.store.watch, batcher=ServeBatcher)
        self.app.add_middleware(ReplicaHeader, replica=self.replica)
        self.server = self.app.state.server
        self._running: AsyncExitStack | None = None
        self._starting = asyncio.Lock()

    async def _start(self) -> None:
        """The app's lifespan (its batcher and store watch) from the first request on."""
        async with self._starting:
            if self._running is None:
                stack = AsyncExitStack()
                await stack.enter_async_context(self.app.router.lifespan_context(self.app))
                self._running = stack
                if self.server.watcher.damaged:
                    logger.error("replica %s: %s", self.replica, self.server.store_changed)

    async def handle(self, request: Forwarded) -> Reply:
        await self._start()
        return await call_app(self.app, request)


# What a request to a replica raises when the replica dies under it or is gone before it starts: a question is a
# read, so the router asks another replica.
REPLICA_GONE: tuple[type[BaseException], ...] = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)


@serve.deployment(name=ROUTER_NAME)
class Router:
    """The HTTP ingress: reads a request's body once (the server's size limit and deadline), hands the request to a
    replica and, when that replica dies before it answers, to another one, until `retry_timeout_s` has passed:
    then 503 with Retry-After, in the API's error shape (OpenAI's on the OpenAI routes) like every error."""

    def __init__(self, replicas: DeploymentHandle, settings: ServeSettings) -> None:
        self.replicas = replicas
        self.settings = settings

    async def _body(self, request: Request) -> bytes:
        """The body, cut one byte past the size limit (the replica's guard answers 413 for it)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                break
        return b"".join(chunks)

    def _error(self, path: str, status: int, kind: str, message: str, **headers: str) -> Response:
        response = error_response(status, kind, message, **headers)
        if path in OPENAI_PATHS:
            response.body = openai_error(status, bytes(response.body))
            response.init_headers({**headers, "content-type": "application/json"})
        return response

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        try:
            body = await asyncio.wait_for(self._body(request), self.settings.body_timeout_s)
        except TimeoutError:
            reason = f"the request body did not arrive within {self.settings.body_timeout_s:g} s"
            return self._error(path, 408, "request_timeout", reason, Connection="close")
        client = (request.client.host, request.client.port) if request.client else None
        forwarded = Forwarded(request.method, path, request.url.query.encode(), request.headers.raw, body, client)
        deadline = time.monotonic() + self.settings.retry_timeout_s
        delay, failures = 0.05, 0
        while True:
            try:
                reply = await self.replicas.handle.remote(forwarded)
            except BackPressureError:
                return self._error(path, 503, "overloaded", "too many requests waiting", **{"Retry-After": "1"})
            except REPLICA_GONE as error:
                failures += 1
                if time.monotonic() + delay > deadline:
                    message = (
                        f"no replica answered within {self.settings.retry_timeout_s:g} s ({failures} died or were "
                        f"unavailable under this request; the last: {type(error).__name__})"
                    )
                    logger.error("%s %s: %s", request.method, path, message)
                    return self._error(path, 503, "unavailable", message, **{"Retry-After": "1"})
                logger.warning(
                    "%s %s: its replica is gone (%s), asking another", request.method, path, type(error).__name__
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            response = Response(reply.body, reply.status)
            response.raw_headers = reply.headers
            return response


# -- deploying -----------------------------------------------------------------------------------------------------


def replica_app(
    store: str | Path,
    model: str | Path,
    *,
    replicas: int,
    load: LoadOptions | None = None,
    settings: ServeSettings | None = None,
) -> Any:
    """The Serve application: the router (the HTTP ingress, no CPU of its own) over `replicas` replicas (Ray must be
    initialised: each replica's CPUs and GPUs are a share of the cluster's, at most one of each)."""
    import ray

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    settings, load = settings or ServeSettings(), load or LoadOptions()
    resources = ray.cluster_resources()
    gpus = 0.0 if load.device == "cpu" else resources.get("GPU", 0.0)
    actor_options = {
        "num_cpus": min(1.0, resources.get("CPU", 1.0) / replicas),
        "num_gpus": min(1.0, gpus / replicas),
    }
    deployment = MemvqReplica.options(
        num_replicas=replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=2 * settings.max_batch_size,
        max_queued_requests=settings.max_queue,
        max_constructor_retry_count=3,
    )
    router = Router.options(
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=settings.max_queue + 2 * replicas * settings.max_batch_size,
    )
    store, model = str(Path(store).resolve()), str(Path(model).resolve())
    return router.bind(deployment.bind(store, model, load, settings), settings)


def _deployment_message() -> str:
    """What Serve says of the deployment (a replica's constructor error, when it failed)."""
    try:
        status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    except Exception:
        return ""
    return status.message.strip()


@contextmanager
def replicas_running(
    store: str | Path,
    model: str | Path,
    *,
    replicas: int,
    host: str,
    port: int,
    ray_address: str | None = None,
    load: LoadOptions | None = None,
    settings: ServeSettings | None = None,
) -> Iterator[DeploymentHandle]:
    """The API on `replicas` Ray Serve replicas at http://HOST:PORT for the body of the block (ready when it starts).

    Ray: the caller's if it initialised one, the cluster at `ray_address` (or `RAY_ADDRESS`), else a local one
    started here. On exit Serve is shut down when the Ray is this block's own; otherwise only the application is
    deleted (Serve and the cluster go on)."""
    import ray

    from memvq.pipelines.local_ray import ray_for_build

    owns_ray = not ray.is_initialized() and (ray_address or os.environ.get("RAY_ADDRESS") or "local") == "local"
    with ray_for_build(ray_address):
        try:
            serve.start(http_options={"host": host, "port": port})
            app = replica_app(store, model, replicas=replicas, load=load, settings=settings)
            try:
                handle = serve.run(app, name=APP_NAME, route_prefix="/")
            except RuntimeError as error:  # say why (a replica's error is in its log, not in the driver's)
                raise RuntimeError(f"{error} {_deployment_message()}".strip()) from error
            yield handle
        finally:
            if owns_ray:
                with suppress(Exception):
                    serve.shutdown()
            else:
                with suppress(Exception):
                    serve.delete(APP_NAME)


def serve_replicas(store: str | Path, model: str | Path, **deployment: Any) -> None:
    """Serve the API on Ray Serve replicas until interrupted (Ctrl-C, SIGTERM); `deployment`: the keywords of
    `replicas_running` (replicas, host, port, ray_address, load, settings)."""
    with replicas_running(store, model, **deployment):
        logger.info(
            "serving on http://%s:%d with %d Ray Serve replicas (Ctrl-C to stop)",
            deployment["host"],
            deployment["port"],
            deployment["replicas"],
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            logger.info("stopping the replicas")

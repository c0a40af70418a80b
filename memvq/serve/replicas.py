"""`memvq serve --replicas N`: the same API as N Ray Serve replicas behind Ray Serve's HTTP proxy.

Each replica (`MemvqReplica`, one Ray actor) loads its own `RAGPipeline` (the store memory-mapped, so the
replicas of one machine share its pages) and builds the app with `create_app`, the one definition of the routes,
errors, API key, body guard, metrics and OpenAI routes. Only the batching differs: on a replica, questions go
through Ray Serve's `@serve.batch` (`ServeBatcher`) in place of the in-process `DynamicBatcher`.

- Ray Serve's proxy listens on HOST:PORT and routes each request to a replica (the one with fewer requests of two
  picked at random); every response names its replica in the `X-Memvq-Replica` header.
- /readyz and /metrics are answered by whichever replica gets the request: each replica has its own Prometheus
  registry (the response's `X-Memvq-Replica` tells which). Totals are the sum over replicas; Ray Serve exports its
  own per-replica metrics (`ray_serve_*`) on Ray's metrics port.
- A replica whose process dies is replaced by Serve; the requests it was working on get a 5xx from the proxy, the
  others go to the live replicas. A replica whose store files changed under it (the store watch) fails Serve's
  health check and is replaced by one that opens (and verifies) the store again.
- Limits: `max_queue` is also the number of requests the proxy queues before answering 503 (Ray Serve's
  `max_queued_requests`); a replica takes at most twice `max_batch_size` requests at a time. The request-header
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
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
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
from memvq.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

APP_NAME = "memvq"
DEPLOYMENT_NAME = "memvq"
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


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class MemvqReplica:
    """One replica: a pipeline loaded from the store and reader, and the API over it with Ray Serve's batching."""

    def __init__(self, store: str, model: str, load: LoadOptions, settings: ServeSettings) -> None:
        from memvq.pipelines.rag import RAGPipeline

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pipeline = RAGPipeline.load(store, model, **load.model_dump())
        self.settings = settings
        self.server: Any = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.pipeline, self.settings, watch=self.pipeline.store.watch, batcher=ServeBatcher)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        self.server = app.state.server
        return app

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose store changed under it is unhealthy (and replaced)."""
        if self.server is not None and self.server.watcher.damaged:
            raise RuntimeError(self.server.store_changed)


# -- deploying -----------------------------------------------------------------------------------------------------


def replica_app(
    store: str | Path,
    model: str | Path,
    *,
    replicas: int,
    load: LoadOptions | None = None,
    settings: ServeSettings | None = None,
) -> Any:
    """The Serve application of `replicas` replicas (Ray must be initialised: each replica's CPUs and GPUs are a
    share of the cluster's, at most one of each)."""
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
    store, model = str(Path(store).resolve()), str(Path(model).resolve())
    return deployment.bind(store, model, load, settings)


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

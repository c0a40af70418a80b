"""Dynamic batching: concurrent requests grouped into one model call.

It owns the queue between the asyncio side (request handlers `await submit(...)`) and the one worker thread that
runs the model. Requests with equal keys (the server's key: the operation and its resolved `QueryOptions`) are
grouped, oldest first, up to `max_batch_size`; a batch that is not full waits at most `max_wait_ms` for more,
counted from when its oldest request arrived or the model became free, whichever is later. Requests that piled up
while the model was busy go together in the next call. `max_batch_size=1` turns batching off (one request per
model call).

Each question has its own future: a batch that raises fails its own requests only, and the worker goes on. The
questions of one `submit_many` are admitted all or none (a refused request leaves nothing queued); those whose
caller is gone (its task cancelled, e.g. when the client disconnected) are dropped from the queue before they run,
and so are those still waiting when another question of their request failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from memvq.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

# run(questions, key) -> one result per question, in order; called on the worker thread.
BatchFn = Callable[[list[str], Any], Sequence[T]]
# observe(key, batch size, seconds the model call took, whether it raised); called on the event loop.
BatchObserver = Callable[[Any, int, float, bool], None]


class BatcherClosedError(RuntimeError):
    """The batcher is not running (not started yet, or shutting down)."""


class QueueFullError(RuntimeError):
    """Too many requests are already waiting."""


@dataclass(frozen=True)
class Completed(Generic[T]):
    """One request's result, the size of the batch it went in and how long it waited for its batch to start."""

    value: T
    batch_size: int
    queued_ms: float


@dataclass
class _Pending:
    question: str
    key: Hashable
    future: asyncio.Future[Completed[Any]]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher(Protocol):
    """What the server needs of a batcher: `DynamicBatcher` in process (`memvq serve`), or Ray Serve's batching on
    a replica (`memvq.serve.replicas.ServeBatcher`, `memvq serve --replicas N`)."""

    @property
    def running(self) -> bool: ...

    @property
    def pending(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit_many(self, questions: Sequence[str], key: Hashable = None) -> list[Completed[Any]]: ...


def call_model(run: BatchFn[T], questions: list[str], key: Hashable) -> Sequence[T]:
    """One model call (on the worker thread), with one result per question or a RuntimeError."""
    results = run(questions, key)
    if len(results) != len(questions):
        raise RuntimeError(f"the model returned {len(results)} results for {len(questions)} questions")
    return results


def notify(observe: BatchObserver | None, key: Hashable, size: int, seconds: float, failed: bool) -> None:
    """Tell the observer about one model call; an observer that raises is logged, never the batch's failure."""
    if observe is not None:
        try:
            observe(key, size, seconds, failed)
        except Exception:
            logger.exception("batch observer failed")


_DEFAULTS = ServeSettings()  # the defaults of a batcher built by hand (a server passes its own settings)


class DynamicBatcher(Generic[T]):
    """Groups `submit`ted questions with equal keys into calls of `run` on one worker thread."""

    def __init__(
        self,
        run: BatchFn[T],
        max_batch_size: int = _DEFAULTS.max_batch_size,
        max_wait_ms: float = _DEFAULTS.max_wait_ms,
        max_queue: int = _DEFAULTS.max_queue,
        observe: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.observe = observe
        self._pending: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def pending(self) -> int:
        """Requests waiting for a batch (not counting the batch the model is running)."""
        return len(self._pending)

    async def start(self) -> None:
        """Start the worker thread and the loop that forms batches (on the running event loop)."""
        if self.running:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memvq-model")
        self._task = asyncio.create_task(self._loop(), name="memvq-batcher")
        logger.info("batcher started: max batch size %d, max wait %.1f ms", self.max_batch_size, self.max_wait * 1e3)

    async def stop(self) -> None:
        """Stop forming batches, fail the requests still waiting, and let the running batch finish."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("the server is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True)
        logger.info("batcher stopped")

    async def submit(self, question: str, key: Hashable = None) -> Completed[T]:
        """Queue one question; returns its result once its batch has run (raises what the batch raised)."""
        [done] = await self.submit_many([question], key)
        return done

    async def submit_many(self, questions: Sequence[str], key: Hashable = None) -> list[Completed[T]]:
        """Queue several questions under one key, all or none (they go in the same batches while they fit).

        When one of them fails or the caller is cancelled, the others still waiting are withdrawn unrun."""
        if not self.running or self._wakeup is None:
            raise BatcherClosedError("the model worker is not running")
        if len(self._pending) + len(questions) > self.max_queue:
            raise QueueFullError(f"{len(self._pending)} questions already waiting, {len(questions)} more refused")
        loop = asyncio.get_running_loop()
        items = [_Pending(question, key, loop.create_future()) for question in questions]
        self._pending.extend(items)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except BaseException:  # one failed, or the caller was cancelled
            self._withdraw(items)
            raise

    def _withdraw(self, items: list[_Pending]) -> None:
        """Cancel these items' futures (a no-op for those resolved) and drop those still waiting from the queue;
        the results of the batch that is running are dropped for its withdrawn items."""
        for item in items:
            item.future.cancel()
        withdrawn = {id(item) for item in items}
        waiting = len(self._pending)
        self._pending = [item for item in self._pending if id(item) not in withdrawn]
        if waiting > len(self._pending):
            logger.debug("withdrew %d questions before they ran", waiting - len(self._pending))

    def _same_key(self, key: Hashable) -> int:
        return sum(1 for item in self._pending if item.key == key)

    def _take(self, key: Hashable) -> list[_Pending]:
        """Remove and return up to max_batch_size waiting requests with this key, oldest first."""
        batch: list[_Pending] = []
        rest: list[_Pending] = []
        for item in self._pending:
            if item.future.done():  # cancelled, not withdrawn yet
                continue
            (batch if item.key == key and len(batch) < self.max_batch_size else rest).append(item)
        self._pending = rest
        return batch

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        free_since = 0.0
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            oldest = self._pending[0]
            # Wait from when the model could first have taken the oldest request: clients whose answers just went
            # out come back within milliseconds, and a lone straggler would otherwise run alone each time.
            deadline = max(oldest.enqueued, free_since) + self.max_wait
            while self._same_key(oldest.key) < self.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            batch = self._take(oldest.key)
            if batch:
                await self._run_batch(loop, oldest.key, batch)
                free_since = time.perf_counter()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, key: Hashable, batch: list[_Pending]) -> None:
        assert self._executor is not None
        started = time.perf_counter()
        failed = False
        try:
            results = await loop.run_in_executor(
                self._executor, call_model, self.run, [item.question for item in batch], key
            )
        except asyncio.CancelledError:  # stopped while the model ran: nobody will resolve these otherwise
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherClosedError("the server is shutting down"))
            raise
        except Exception as error:  # a failing batch fails its own requests; the worker goes on
            failed = True
            logger.exception("a batch of %d failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            for item, value in zip(batch, results, strict=True):
                if not item.future.done():
                    queued_ms = (started - item.enqueued) * 1000.0
                    item.future.set_result(Completed(value, len(batch), queued_ms))
        notify(self.observe, key, len(batch), time.perf_counter() - started, failed)

"""The server's eye on its store: the store's files re-checked on a timer while the app runs.

A file that changes under a running server (a rebuild into the same directory, a copy over it, a damaged disk)
would be read through its memory map as if nothing happened. `StoreWatcher` runs `FileWatch.changed` (a stat per
file, a sha256 only for files whose stamp moved) every `interval_s` on a thread. When the store's manifest changed
(`memvq update` or `compact` published a new generation), it calls `reopen`, which opens and verifies the new
generation and serves it from the next batch on: no restart, no request refused. Any other change, or a new
generation that fails its check, is logged once and the server stops answering (503 `store_changed`, /readyz
503) until it is restarted on a store that verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from memvq.memory.artifact import MANIFEST_NAME
from memvq.memory.integrity import FileWatch

logger = logging.getLogger(__name__)

REOPEN_ATTEMPTS = 3  # a store changed under the server is opened again up to this many times before it is refused


class StoreWatcher:
    """Runs a `FileWatch` on a timer; `damaged` names the files that no longer match (empty while all is well).
    `reopen`: serve the store's new generation and return its watch (called when the manifest changed)."""

    def __init__(
        self, watch: FileWatch | None, interval_s: float, reopen: Callable[[], FileWatch | None] | None = None
    ) -> None:
        self.watch = watch
        self.interval_s = interval_s
        self.reopen = reopen
        self.damaged: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> list[str]:
        """One sweep (on a thread); records and logs what it found."""
        if self.watch is None or self.damaged:
            return self.damaged
        damaged = await asyncio.to_thread(self.watch.changed)
        if MANIFEST_NAME in damaged and self.reopen is not None:
            for attempt in range(REOPEN_ATTEMPTS):
                try:
                    self.watch = await asyncio.to_thread(self.reopen)
                    return []
                except Exception as error:  # e.g. a generation pruned while it was verified: the next one is read
                    logger.warning("the store's new generation does not open (%s): %s", attempt + 1, error)
            logger.error("the store's new manifest does not open after %d attempts", REOPEN_ATTEMPTS)
        if damaged:
            self.damaged = damaged
            logger.error(
                "store files changed under the server: %s in %s; not answering any more (503 store_changed). "
                "Restart `memvq serve` once the store verifies (rebuild it or restore its files)",
                ", ".join(damaged),
                self.watch.root,
            )
        return damaged

    async def _run(self) -> None:
        while not self.damaged:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # a failing sweep must not end the watch silently
                logger.exception("store watch sweep failed")

    def start(self) -> None:
        if self.watch is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="store-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

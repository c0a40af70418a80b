"""How `memvq serve` runs an app under uvicorn: the uvicorn options from the app's settings, an HTTP protocol with a
deadline for the request line and headers, and an access log without query strings (they may carry secrets).

uvicorn closes idle keep-alive connections but waits forever for a request's headers; `HeaderDeadlineProtocol`
closes connections whose headers are too slow (the body's deadline is the app's own: `guards.BodyGuard`).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from memvq.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol; a connection is closed when a request line and headers are not complete within
    `header_timeout_s` of it opening, or of the first bytes of a later request on it."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection failed)
            self._disarm()
        elif self._header_deadline is None:  # the start of a request on a kept-alive connection
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            logger.debug("closed a connection without request headers after %g s", self.header_timeout_s)
            self.transport.close()


class StripQueryString(logging.Filter):
    """Cuts the query string off the request target in uvicorn's access log records (`?api_key=...`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(arg.partition("?")[0] if isinstance(arg, str) else arg for arg in record.args)
        return True


def _log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, with the access logger's records stripped of query strings."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"strip_query_string": {"()": StripQueryString}}
    config["loggers"]["uvicorn.access"]["filters"] = ["strip_query_string"]
    return config


def uvicorn_options(app: FastAPI, *, host: str, port: int, access_log: bool = True) -> dict[str, Any]:
    """The keywords of `uvicorn.run(app, ...)` (or `uvicorn.Config(app, ...)`) that serve an app of `create_app`."""
    settings: ServeSettings = app.state.server.settings
    return {
        "host": host,
        "port": port,
        "http": functools.partial(HeaderDeadlineProtocol, header_timeout_s=settings.header_timeout_s),
        "log_config": _log_config(),
        "log_level": "info",
        "access_log": access_log,
        "timeout_graceful_shutdown": 30,
    }


def serve(app: FastAPI, *, host: str, port: int, access_log: bool = True) -> None:
    """Serve an app of `create_app` until interrupted."""
    uvicorn.run(app, **uvicorn_options(app, host=host, port=port, access_log=access_log))

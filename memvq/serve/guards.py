"""ASGI middleware that guards the query API around a request: the API key, the body (its size limit and read
deadline, then the client's presence while the app works on it) and the store (nothing but /healthz is answered
once its files changed under the server).

Both answer with the JSON error body of `memvq.serve.schema` and never let the app read a body they refuse.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memvq.serve.page import PAGE_PATHS
from memvq.serve.schema import error_response

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"}) | PAGE_PATHS  # reachable without the API key (the page has no data)


class StoreGuard:
    """While `changed()` gives a reason (the store's files changed under the server), every route but /healthz gets
    503 `store_changed` with it: the server cannot answer from a store it has not verified, and says why."""

    def __init__(self, app: ASGIApp, changed: Callable[[], str | None]) -> None:
        self.app = app
        self.changed = changed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = self.changed() if scope["type"] == "http" and scope["path"] != "/healthz" else None
        if reason is None:
            await self.app(scope, receive, send)
        else:
            await error_response(503, "store_changed", reason)(scope, receive, send)


class BodyGuard:
    """Reads the whole body before the app sees it, then runs the app while watching the connection.

    A body over `max_bytes` gets 413 (chunked bodies too); one that has not fully arrived `timeout_s` after the
    headers gets 408 and the connection is closed. When the client goes away before its response is complete, the
    app is cancelled (a request waiting for the model withdraws its questions)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self) -> JSONResponse:
        return error_response(413, "payload_too_large", f"request body over {self.max_bytes} bytes")

    async def _read(self, receive: Receive) -> bytes | JSONResponse | None:
        """The body, the error response that refuses it, or None when the client went away."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_bytes:
                        return self._too_large()
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            reason = f"the request body did not arrive within {self.timeout_s:g} s"
            return error_response(408, "request_timeout", reason, Connection="close")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await error_response(400, "bad_request", "invalid Content-Length")(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
        body = await self._read(receive)
        if isinstance(body, JSONResponse):
            await body(scope, receive, send)
        elif body is not None:
            await self._run_while_connected(scope, body, receive, send)

    async def _run_while_connected(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Run the app on the read body; cancel it if the client disconnects before the response is complete."""
        gone = asyncio.Event()
        replayed = complete = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def tracked(message: Message) -> None:
            nonlocal complete
            complete = complete or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        async def watch() -> None:  # the server answers http.disconnect once the client left or the response is done
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        app = asyncio.ensure_future(self.app(scope, replay, tracked))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait((app, watcher), return_when=asyncio.FIRST_COMPLETED)
            if gone.is_set() and not app.done() and not complete:
                logger.info("client went away: cancelled %s %s", scope["method"], scope["path"])
                app.cancel()
            await asyncio.wait((app,))
        finally:
            watcher.cancel()
            app.cancel()  # a no-op once it is done; here when this request itself is cancelled
        if not app.cancelled():
            app.result()  # what the app raised goes on to the outer middleware


class ApiKeyGuard:
    """Without the right key (`X-API-Key: KEY` or `Authorization: Bearer KEY`) all but OPEN_PATHS get 401."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    def _given(self, scope: Scope) -> bytes | None:
        headers = dict(scope["headers"])
        if (key := headers.get(b"x-api-key")) is not None:
            return key
        scheme, _, credentials = headers.get(b"authorization", b"").partition(b" ")
        return credentials.strip() if scheme.lower() == b"bearer" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = self._given(scope)
            if given is None or not secrets.compare_digest(given, self.key):
                message = "a valid API key is required (header X-API-Key: KEY or Authorization: Bearer KEY)"
                response = error_response(401, "unauthorized", message, **{"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

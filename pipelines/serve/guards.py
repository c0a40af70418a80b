"""ASGI middleware that guards the query API before a request reaches it: the API key and the body size limit.

Both answer with the JSON error body of `pipelines.serve.schema` and never let the app read a body they refuse.
"""

from __future__ import annotations

import secrets

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.serve.schema import error_response

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # reachable without the API key


class BodySizeLimit:
    """Requests whose body is over `max_bytes` get 413 before the app reads them (chunked bodies too)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> JSONResponse:
        return error_response(413, "payload_too_large", f"request body over {self.max_bytes} bytes")

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
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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

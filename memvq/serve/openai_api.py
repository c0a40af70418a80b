"""The OpenAI-compatible face of the query API, so that OpenAI's clients and tools can ask memvq:
`POST /v1/chat/completions` and `GET /v1/models`.

- The question is the last `user` message (a string, or OpenAI's list of `{"type": "text", "text"}` parts, joined
  by newlines); earlier messages are ignored: memvq answers one question from its passages, not a conversation.
- `model` may be any string: the one loaded reader answers, and the response's `model` names it as `/v1/models`
  does. `temperature`, `max_tokens` and OpenAI's other parameters are accepted and ignored; `return_passages` (a
  memvq extension: `extra_body` in OpenAI's Python client) puts the passages' text in the provenance.
- The question becomes the server's `AnswerRequest` and is answered by the `/v1/answer` endpoint itself: the same
  limits, batcher (batching, cancellation when the client goes away), metrics and errors.
- The assistant message is the answer, then its sources (`[n] title (passage_id)`: the passages read, best first);
  the extra top-level field `memvq` is the `/v1/answer` response (answer_span, provenance, timings_ms, batch_size).
- `stream: true` answers with server-sent events, `chat.completion.chunk`s (the role, the content, then the finish
  with the `memvq` field) and `data: [DONE]`.
- Errors on these paths are in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, whoever answered
  them (`OpenAIErrors`): the status is the API's own (422 for an invalid request), `code` the API's error type,
  `type` OpenAI's (`authentication_error`, `invalid_request_error`, `server_error`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memvq.serve.schema import AnswerResponse, ApiError, ErrorDetail, ErrorResponse, error_response

logger = logging.getLogger(__name__)

OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/models"})  # where errors are in OpenAI's shape

# -- requests ------------------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    """A part of a message's content; only text parts are understood."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # name, tool_calls, ...: ignored

    role: str
    content: list[TextPart] | str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat request, as far as memvq reads it; its other parameters are accepted and ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(description="any name: the loaded reader answers (GET /v1/models names it)")
    messages: list[ChatMessage] = Field(
        min_length=1, description="the last user message is the question; the others are ignored"
    )
    stream: bool = Field(default=False, description="answer as server-sent events (chat.completion.chunk, [DONE])")
    temperature: float | None = Field(default=None, description="accepted and ignored")
    max_tokens: int | None = Field(default=None, description="accepted and ignored (the reader's limit applies)")
    return_passages: bool = Field(default=False, description="memvq extension: passage text in memvq.provenance")


# -- responses -----------------------------------------------------------------------------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop"] = "stop"


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    memvq: AnswerResponse = Field(description="memvq extension: the /v1/answer response (provenance, answer_span)")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    memvq: AnswerResponse | None = Field(default=None, description="on the last chunk: as in chat.completion")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "memvq"
    precision: str = Field(description="memvq: what the reader computes in, fp32 or bf16")
    generation: int = Field(description="memvq: the generation of the store answers come from (updates add one)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="authentication_error, invalid_request_error or server_error")
    param: str | None = Field(description="the request field at fault (validation errors)")
    code: str = Field(description="the API's error type (unauthorized, invalid_request, overloaded, ...)")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


# -- the routes ----------------------------------------------------------------------------------------------------


class Configured(Protocol):
    """What these routes need of the pipeline: its reader's config and precision and its store's generation
    (`app.QAPipeline` has them)."""

    @property
    def config(self) -> Any: ...

    precision: str
    generation: int


AnswerFn = Callable[[Any], Awaitable[AnswerResponse]]  # the /v1/answer endpoint: AnswerRequest -> AnswerResponse


def reader_id(config: Any) -> str:
    """The model id of the loaded reader: its mode and answer head (e.g. `memvq-fid-extract`)."""
    return f"memvq-{config.mode}-{config.head}"


def _answer_request(answer_model: type[BaseModel], request: ChatCompletionRequest) -> BaseModel:
    """The last user message as the server's AnswerRequest (its limits are /v1/answer's)."""
    users = [index for index, message in enumerate(request.messages) if message.role == "user"]
    if not users:
        raise ApiError(422, "invalid_request", "messages: no user message (the last one is the question)")
    try:
        return answer_model(question=request.messages[users[-1]].text, return_passages=request.return_passages)
    except ValidationError as error:
        where = ("body", "messages", users[-1], "content")
        raise RequestValidationError([{**item, "loc": where} for item in error.errors()]) from error


NOT_FOUND = "I could not find the answer in the store."


def assistant_content(answer: AnswerResponse) -> str:
    """The answer (or, when it abstained, that the store holds none), then its sources: the passages read (looked
    at), best first."""
    sources = "\n".join(f"[{n}] {p.title} ({p.passage_id})" for n, p in enumerate(answer.provenance, 1))
    text = NOT_FOUND if answer.abstained else answer.answer or ""
    heading = "Passages looked at" if answer.abstained else "Sources"
    return f"{text}\n\n{heading}:\n{sources}" if sources else text


def _events(completion: ChatCompletion) -> Iterator[str]:
    """A completion as server-sent events: the role, the content, the finish (with `memvq`), then [DONE]."""
    content = completion.choices[0].message.content
    for delta, finish, memvq in (
        (Delta(role="assistant", content=""), None, None),
        (Delta(content=content), None, None),
        (Delta(), "stop", completion.memvq),
    ):
        chunk = ChatCompletionChunk(
            id=completion.id,
            created=completion.created,
            model=completion.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            memvq=memvq,
        )
        yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
    yield "data: [DONE]\n\n"


def openai_router(
    current: Callable[[], Configured],
    answer_model: type[BaseModel],
    answer: AnswerFn,
    dependencies: Sequence[Any],
    errors: dict[int | str, dict[str, Any]],
) -> APIRouter:
    """The routes; questions go to `answer` (the /v1/answer endpoint) as requests of `answer_model`; `current`: the
    pipeline served now (a new generation of the store gives a new one). `errors`: the
    API's documented error statuses (their bodies documented here in OpenAI's shape)."""
    created = int(time.time())
    responses = {status: {**spec, "model": OpenAIErrorResponse} for status, spec in errors.items()}
    router = APIRouter(prefix="/v1", tags=["openai"], dependencies=list(dependencies), responses=responses)

    @router.get("/models", response_model=ModelList)
    async def models() -> ModelList:
        """The one model: the loaded reader."""
        pipeline = current()
        card = ModelCard(
            id=reader_id(pipeline.config),
            created=created,
            precision=pipeline.precision,
            generation=pipeline.generation,
        )
        return ModelList(data=[card])

    @router.post(
        "/chat/completions",
        response_model=ChatCompletion,
        response_model_exclude_none=True,
        responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or events with stream: true"}},
    )
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        """Answer the last user message, with its sources; `stream: true` answers with server-sent events."""
        answered = await answer(_answer_request(answer_model, request))
        completion = ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=reader_id(current().config),
            choices=[Choice(message=AssistantMessage(content=assistant_content(answered)))],
            memvq=answered,
        )
        if request.stream:
            return StreamingResponse(
                _events(completion), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return completion

    return router


# -- errors --------------------------------------------------------------------------------------------------------


def openai_error(status: int, body: bytes) -> bytes:
    """An API error body (`schema.ErrorResponse`) in OpenAI's shape."""
    try:
        error = ErrorResponse.model_validate_json(body).error
    except ValidationError:  # not the API's error body: its text is the message
        error = ErrorDetail(type="http_error", message=body.decode(errors="replace") or f"HTTP {status}")
    loc = [str(part) for part in error.details[0].get("loc", [])] if error.details else []
    param = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or None
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    detail = OpenAIErrorDetail(message=error.message, type=kind, param=param, code=error.type)
    return OpenAIErrorResponse(error=detail).model_dump_json().encode()


class OpenAIErrors:
    """On OPENAI_PATHS, every error response (status >= 400: from a route, validation, the key or body guard) gets
    its body rewritten in OpenAI's shape; an exception no handler took is answered as OpenAI's 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in OPENAI_PATHS:
            await self.app(scope, receive, send)
            return
        error_start: Message | None = None
        chunks: list[bytes] = []
        started = False

        async def reshape(message: Message) -> None:
            nonlocal error_start, started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    error_start = message
                    return
            if error_start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = openai_error(error_start["status"], b"".join(chunks))
            kept = [(k, v) for k, v in error_start.get("headers", []) if k not in (b"content-length", b"content-type")]
            headers = [*kept, (b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
            await send({**error_start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        try:
            await self.app(scope, receive, reshape)
        except Exception:
            if started:
                raise
            logger.exception("unhandled error on %s", scope["path"])
            await error_response(500, "internal_error", "internal server error")(scope, receive, reshape)

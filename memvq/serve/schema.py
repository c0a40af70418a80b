"""The wire contract of the query API: request and response models, their limits, and JSON error bodies.

Request models are built per server (`request_models(settings)`) so that the limits a server enforces are the ones
its OpenAPI schema shows; their query knobs are `QueryOptions` fields (`query_options(request)` reads them back).
Every error, whatever raised it, is answered as `{"error": {"type", "message",
"details"?}}`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from memvq.encoders.options import QueryOptions
from memvq.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


class Provenance(BaseModel):
    """A passage read (answer) or found (retrieve), best first; `text` only when `return_passages` is true."""

    passage_id: str
    wikipedia_id: str
    title: str
    start_paragraph_id: int
    end_paragraph_id: int
    score: float
    text: str | None = None


class AnswerSpanModel(BaseModel):
    """Where an extracted answer stands: characters [start, end) of the text of passage `passage_id`."""

    passage_id: str
    start: int
    end: int


class AnswerResponse(BaseModel):
    question: str
    answer: str | None = Field(description="null when it abstained (no answer reached min_confidence)")
    abstained: bool = Field(default=False, description="no answer reached min_confidence: the store holds no support")
    confidence: float | None = Field(
        default=None,
        description="extract head: the probability that the answer is right (calibrated when the reader is); null "
        "for the generate head",
    )
    answer_span: AnswerSpanModel | None = Field(
        default=None, description="the answer's place in a passage read (readers with the extract head)"
    )
    provenance: list[Provenance]
    timings_ms: dict[str, float] = Field(
        description="model stages of the batch (retrieve, memory, live, rerank, decode, total) and queue wait"
    )
    batch_size: int = Field(description="questions in the model call that answered this one")


class BatchAnswerResponse(BaseModel):
    answers: list[AnswerResponse]


class RetrieveResponse(BaseModel):
    question: str
    passages: list[Provenance]
    timings_ms: dict[str, float]
    batch_size: int


class ErrorDetail(BaseModel):
    type: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class RequestModels(NamedTuple):
    answer: type[BaseModel]
    batch: type[BaseModel]
    retrieve: type[BaseModel]


def _knob(name: str, limit: float) -> tuple[Any, None]:
    """The `QueryOptions` field `name` as a request field, at most `limit` (this server's)."""
    info = QueryOptions.model_fields[name]
    limited = Field(le=limit, description=f"{info.description} (default: the reader's)")
    return Annotated[info.annotation, info, limited], None


def _retrieval() -> tuple[Any, None]:
    """The request's retrieval mode field (QueryOptions': dense, lexical or hybrid; null: the server's)."""
    info = QueryOptions.model_fields["retrieval"]
    return Annotated[info.annotation, Field(description=info.description)], None


def query_options(request: BaseModel) -> QueryOptions:
    """The query knobs of a request (those it does not expose: the reader's)."""
    return QueryOptions.model_validate(request.model_dump(include=set(QueryOptions.model_fields)))


def request_models(settings: ServeSettings) -> RequestModels:
    """The request bodies, with this server's limits in their fields (and so in the OpenAPI schema)."""
    question = Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=settings.max_question_chars),
        Field(description=f"1 to {settings.max_question_chars} characters (surrounding whitespace stripped)"),
    ]
    options: dict[str, Any] = {
        "top_k": _knob("top_k", settings.max_top_k),
        "rerank_k": _knob("rerank_k", settings.max_top_k),
        "max_answer_tokens": _knob("max_answer_tokens", settings.max_answer_tokens),
        "min_confidence": _knob("min_confidence", 1.0),
        "retrieval": _retrieval(),
        "return_passages": (bool, Field(default=False, description="include each passage's text in provenance")),
    }
    config = ConfigDict(strict=True, extra="forbid")
    answer = create_model("AnswerRequest", __config__=config, question=(question, ...), **options)
    batch = create_model(
        "BatchAnswerRequest",
        __config__=config,
        questions=(list[question], Field(..., min_length=1, max_length=settings.max_batch_questions)),
        **options,
    )
    retrieve = create_model(
        "RetrieveRequest",
        __config__=config,
        question=(question, ...),
        top_k=_knob("top_k", settings.max_top_k),
        retrieval=_retrieval(),
        return_passages=(bool, Field(default=True, description="include each passage's text")),
    )
    return RequestModels(answer, batch, retrieve)


class ApiError(Exception):
    """An error answered as `{"error": {"type", "message"}}` with its status code."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type, message, headers


def error_response(
    status: int, type: str, message: str, details: list[dict[str, Any]] | None = None, **headers: str
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(type=type, message=message, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers or None)


def _validation_details(error: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(part) for part in item.get("loc", ())], "msg": str(item.get("msg")), "type": item.get("type")}
        for item in error.errors()
    ]


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}
# What FastAPI's JSON decoding raises, besides a syntax error, as the cause of its 400: an invalid request too.
# What the JSON parser raised, when FastAPI answers a body it could not parse with a 400 (ValueError: an integer of
# more digits than Python converts, 4,300).
_UNPARSABLE: dict[type[BaseException], str] = {
    UnicodeDecodeError: "not UTF-8",
    RecursionError: "nested too deeply",
    ValueError: "a number too long to read",
}


def install_error_handlers(app: FastAPI) -> None:
    """Every error is a JSON body `{"error": {"type", "message", "details"?}}`."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.type, error.message, **(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        details = _validation_details(error)
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"])
        message = f"{where}: {first['msg']}" if where else first["msg"]
        if "json" not in request.headers.get("content-type", ""):
            message += " (send the body as JSON with the header Content-Type: application/json)"
        return error_response(422, "invalid_request", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        unparsable = _UNPARSABLE.get(type(error.__cause__)) if error.status_code == 400 else None
        if unparsable is not None:
            return error_response(422, "invalid_request", f"body: not valid JSON ({unparsable})")
        kind = _HTTP_TYPES.get(error.status_code, "http_error")
        return error_response(error.status_code, kind, str(error.detail), **(error.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", "internal server error")

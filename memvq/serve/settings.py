"""The limits, timeouts and batching of one server (what `memvq serve` flags set)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ServeSettings(BaseModel):
    """Batching, input limits and timeouts of one server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int = Field(default=16, ge=1, le=1024, description="questions per model call; 1: no batching")
    max_wait_ms: float = Field(default=10.0, ge=0.0, le=10_000.0, description="longest wait for a batch to fill")
    max_queue: int = Field(default=1024, ge=1, description="questions waiting for the model before 503")
    max_question_chars: int = Field(default=1000, ge=1)
    max_top_k: int = Field(default=100, ge=1, description="largest top_k (and rerank_k) a request may ask for")
    max_answer_tokens: int = Field(default=64, ge=1, description="largest max_answer_tokens a request may ask for")
    max_batch_questions: int = Field(default=64, ge=1, description="questions in one /v1/answer:batch request")
    max_body_bytes: int = Field(default=1 << 20, ge=1, description="request bodies above this get 413")
    header_timeout_s: float = Field(
        default=10.0, gt=0.0, description="connections without a complete request line and headers by then are closed"
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0.0, description="a request body not fully arrived this long after its headers gets 408"
    )
    watch_interval_s: float = Field(
        default=5.0, gt=0.0, description="seconds between checks that the store's files did not change under it"
    )
    retry_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="--replicas: a request whose replica dies is retried on another one for up to this long, then 503",
    )
    api_key: SecretStr | None = Field(default=None, description="when set, all but /, /healthz and /readyz need it")

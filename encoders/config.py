"""The reader's settings: mode, live fraction, passage counts, token budgets, answer head, decoding, loss weights.

`ReaderConfig` is saved with every reader (reader.json) and read back by `reader_io.load_reader`; the per-query knobs a
caller may override (`encoders.options.QueryOptions`) take their defaults from it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

Mode = Literal["fid", "lumen", "glimmer", "memory"]
Head = Literal["generate", "extract"]

# LUMEN's live fraction: the top third of the layers run at query time, the rest make the memory. The one home of
# the default split (the build's `encoder.alpha`, the backbone's, the memory readers').
LUMEN_ALPHA = 1 / 3
# The live fraction each mode implies when `alpha` is not given.
DEFAULT_ALPHA: dict[str, float] = {"fid": 1.0, "lumen": LUMEN_ALPHA, "glimmer": LUMEN_ALPHA, "memory": 0.0}


def memory_layer_count(num_layers: int, alpha: float) -> int:
    """Number of memory layers for a live fraction `alpha` (LUMEN: live = round(alpha * layers)); the one split
    of a backbone, with its inverse `live_fraction`."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return num_layers - round(alpha * num_layers)


def live_fraction(num_layers: int, memory_layers: int) -> float:
    """The live fraction of a backbone split after `memory_layers` of `num_layers` (`memory_layer_count`'s inverse)."""
    return (num_layers - memory_layers) / num_layers


class ReaderConfig(BaseModel):
    """How the reader reads: mode, live fraction, passage counts, token budgets, answer head, decoding, losses."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = Field(
        default="lumen",
        description="glimmer (rerank the K passages, read the best), lumen (read all K), fid (passage text, every "
        "layer live) or memory (no live layer)",
    )
    alpha: float | None = Field(default=None, ge=0.0, le=1.0, description="live fraction; None: the mode's default")
    top_k: int = Field(
        default=20,
        ge=1,
        validation_alias=AliasChoices("top_k", "retrieve_k"),  # retrieve_k: readers saved before the rename
        description="K: passages retrieved per question (the reader reads all given)",
    )
    rerank_k: int = Field(default=5, ge=1, description="glimmer: passages kept after reranking")
    rerank_layers: int = Field(default=1, ge=1, description="glimmer: Live-A layer count")
    retrieval_weight: float = Field(
        default=0.0, ge=0.0, description="glimmer: passages are kept by reranker score + this x retrieval score"
    )
    max_question_tokens: int = Field(
        default=32, ge=2, description="question tokens the reader puts before each passage (the retriever embeds more)"
    )
    max_passage_tokens: int = Field(
        default=128,
        ge=2,
        description="tokens of each passage the reader reads: the first ones of its stored memory (the build keeps "
        "`encoder.max_passage_tokens`), or of its text (fid)",
    )
    max_answer_tokens: int = Field(default=16, ge=2, description="answer length limit (extract: span tokens)")
    head: Head = Field(
        default="generate",
        description="generate: a Fusion-in-Decoder decoder writes the answer; extract: a span of a passage read "
        "(start / end logits over its tokens, spans scored with the passage's probability, equal answers added)",
    )
    span_objective: Literal["marginal", "hard_em"] = Field(
        default="marginal",
        description="extract: the loss over a passage's answer occurrences (their summed likelihood, or the best)",
    )
    passage_weight: float = Field(
        default=1.0, ge=0.0, description="extract: span score = log P(start) + log P(end) + this x log P(passage)"
    )
    decoder_layers: int | None = Field(default=None, ge=1, description="decoder depth; None: the checkpoint's")
    train_decoder_embeddings: bool = Field(
        default=False, description="False: the checkpoint's word embeddings (and tied LM head) stay frozen, unsaved"
    )
    copy_answers: bool = Field(
        default=False,
        description="pointer-generator decoder: answer tokens may be copied from the question and passages read",
    )
    train_memory_layers: bool = Field(
        default=False,
        description="the memory layers are trained (on memory recomputed from passage text) and saved with the "
        "reader; its store is then built with them: build-index --memory-from READER_DIR",
    )
    num_beams: int = Field(default=1, ge=1)
    min_confidence: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="extract: an answer whose confidence is below this abstains (0: always answer); a reader's "
        "calibration.json may set it",
    )
    distill_temperature: float = Field(default=1.0, gt=0.0)
    rerank_loss_weight: float = Field(default=1.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> ReaderConfig:
        alpha = self.live_fraction
        if self.mode == "fid" and alpha != 1.0:
            raise ValueError(f"fid re-encodes the passage text through every layer: alpha must be 1, got {alpha}")
        if self.mode == "memory" and alpha != 0.0:
            raise ValueError(f"memory mode has no live layers: alpha must be 0, got {alpha}")
        if self.mode in ("lumen", "glimmer") and alpha <= 0.0:
            raise ValueError(f"{self.mode} needs live layers: alpha must be > 0 (alpha = 0 is mode 'memory')")
        if self.mode == "fid" and self.train_memory_layers:
            raise ValueError("fid has no memory layers (every layer is live): train_memory_layers needs memory")
        if self.head == "extract" and self.copy_answers:
            raise ValueError("copy_answers is a decoder option: the extract head has no decoder")
        if self.mode == "glimmer" and self.rerank_k > self.top_k:
            raise ValueError(f"rerank_k ({self.rerank_k}) must be <= top_k ({self.top_k})")
        return self

    @property
    def live_fraction(self) -> float:
        return DEFAULT_ALPHA[self.mode] if self.alpha is None else self.alpha

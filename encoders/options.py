"""The query knobs: how passages are retrieved and how many are kept, how long the answer may be, the beam size and
the confidence below which the answer abstains.

`QueryOptions` is the one carrier of these knobs, from the CLI flags, `EvalSettings`, the HTTP request and the
server's batch key through `RAGPipeline` to the reader; a field left None means the reader config's value, and
`resolved` is the one place where those defaults are filled in.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from memvq.encoders.config import ReaderConfig

# How passages are retrieved (`retrieval.retriever`): the store's FAISS index, its BM25 index, or both fused.
RetrievalMode = Literal["dense", "lexical", "hybrid"]
RETRIEVAL_MODES: tuple[RetrievalMode, ...] = get_args(RetrievalMode)


class QueryOptions(BaseModel):
    """Per-query knobs (frozen, so hashable: the server batches requests with equal options); None: the reader's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    top_k: int | None = Field(default=None, ge=1, description="K: passages retrieved per question")
    rerank_k: int | None = Field(default=None, ge=1, description="glimmer: passages kept after reranking")
    max_answer_tokens: int | None = Field(default=None, ge=1, description="answer length limit")
    num_beams: int | None = Field(default=None, ge=1, description="generate head: beam size (1: greedy)")
    min_confidence: float | None = Field(
        default=None, ge=0.0, le=1.0, description="extract head: abstain below this confidence (0: always answer)"
    )
    retrieval: RetrievalMode | None = Field(
        default=None, description="dense, lexical (BM25) or hybrid retrieval (default: the pipeline's)"
    )

    def resolved(self, config: ReaderConfig) -> QueryOptions:
        """Every knob set: the ones left None from `config`; the default rerank_k is cut to top_k.

        A glimmer reader refuses a rerank_k above top_k (ValueError); other modes do not rerank."""
        top_k = self.top_k or config.top_k
        rerank_k = self.rerank_k or min(config.rerank_k, top_k)
        if config.mode == "glimmer" and rerank_k > top_k:
            raise ValueError(f"rerank_k ({rerank_k}) must be <= top_k ({top_k})")
        return QueryOptions(
            top_k=top_k,
            rerank_k=rerank_k,
            max_answer_tokens=self.max_answer_tokens or config.max_answer_tokens,
            num_beams=self.num_beams or config.num_beams,
            min_confidence=config.min_confidence if self.min_confidence is None else self.min_confidence,
            retrieval=self.retrieval,
        )

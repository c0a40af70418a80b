"""What the reader reads for a batch of questions: their K passages, as memory tensors or (fid) as text.

`ReaderInputs` is built by the pipeline (`pipelines.rag.reader_inputs` / `recomputed_inputs`) or by hand, and
taken by every reader method (`Reader.encode`, `answer`, `loss`, `distillation_target`). Each field is optional,
so that what one reader kind needs (memory token ids for a copying decoder, the retriever's scores for glimmer)
is one more field, not one more argument through every method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PassageText = tuple[str, str]  # (title, text)


@dataclass(frozen=True, eq=False)
class PassageOffsets:
    """Where the memory's tokens sit in the passages' text (what an extractive head needs to answer with a span):
    texts 'b k', offsets 'b k l 2' (character offsets of memory token i into its passage's text) and text_mask
    'b k l' (memory token i is a piece of the text, not of the title, a special token or padding)."""

    texts: Sequence[Sequence[str]]
    offsets: torch.Tensor
    text_mask: torch.Tensor


@dataclass(frozen=True, eq=False)
class ReaderInputs:
    """The passages of b questions, K each: either their memory or (fid) their text.

    memory 'b k l d' with memory_mask 'b k l' (bool or 0/1) and, for a copying decoder, the passage tokens' ids
    memory_ids 'b k l' and, for an extractive head, passage_offsets; or passage_texts 'b k' of (title, text).
    retrieval_scores 'b k': the retriever's scores (glimmer adds them to the reranker's, weighted by
    `retrieval_weight`).
    """

    memory: torch.Tensor | None = None
    memory_mask: torch.Tensor | None = None
    memory_ids: torch.Tensor | None = None
    passage_texts: Sequence[Sequence[PassageText]] | None = None
    retrieval_scores: torch.Tensor | None = None
    passage_offsets: PassageOffsets | None = None

    def __post_init__(self) -> None:
        if (self.memory is None) == (self.passage_texts is None):
            raise ValueError("give exactly one of memory (with memory_mask) and passage_texts")
        if self.memory is not None and self.memory_mask is None:
            raise ValueError("memory needs its memory_mask")
        if self.memory is None and (
            self.memory_mask is not None or self.memory_ids is not None or self.passage_offsets is not None
        ):
            raise ValueError("memory_mask / memory_ids / passage_offsets come with memory, not with passage_texts")
        if self.passage_offsets is not None and self.passage_offsets.text_mask.shape != self.memory_mask.shape:
            raise ValueError(
                f"passage_offsets {tuple(self.passage_offsets.text_mask.shape)} do not match the memory "
                f"{tuple(self.memory_mask.shape)}"
            )
        if self.passage_texts is not None and len({len(row) for row in self.passage_texts}) > 1:
            raise ValueError("every question needs the same number of passages")
        if self.retrieval_scores is not None and tuple(self.retrieval_scores.shape) != (self.batch, self.k):
            raise ValueError(
                f"retrieval_scores {tuple(self.retrieval_scores.shape)} do not match {self.batch} questions x "
                f"{self.k} passages"
            )

    @property
    def batch(self) -> int:
        """b: the number of questions."""
        return self.memory.shape[0] if self.memory is not None else len(self.passage_texts or ())

    @property
    def k(self) -> int:
        """K: the passages per question."""
        if self.memory is not None:
            return self.memory.shape[1]
        return len(self.passage_texts[0]) if self.passage_texts else 0

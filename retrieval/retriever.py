"""The retriever: questions -> dense embeddings (the store's own encoder, frozen) -> the store's top-K passages (its
FAISS index; an approximate one's candidates re-scored exactly: `MemoryStore.search`).

It owns the question side of dense retrieval and what a retrieved passage carries (KILT provenance: wikipedia_id,
title, paragraph range, score). The question encoder is the full backbone the store was built with, untouched by
reader training, so questions and passages live in the same embedding space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from memvq.encoders.backbone import Backbone
from memvq.encoders.hardware import Resolved, autocast
from memvq.memory.store import MemoryStore


@dataclass(frozen=True)
class RetrievedPassage:
    """One retrieved passage: its store row, identity, KILT provenance fields and score (higher is better)."""

    row: int
    passage_id: str
    wikipedia_id: str
    title: str
    start_paragraph_id: int
    end_paragraph_id: int
    score: float
    text: str

    def provenance(self, with_text: bool = False) -> dict[str, Any]:
        """A KILT provenance record (plus passage_id and score; text on request)."""
        record = asdict(self)
        record.pop("row")
        if not with_text:
            record.pop("text")
        return record

    def with_score(self, score: float) -> RetrievedPassage:
        return RetrievedPassage(**{**asdict(self), "score": float(score)})


# Question tokens the retriever embeds: the whole question, as the encoder was trained to embed sentences (NQ
# questions are under 30 tokens); the reader keeps fewer of them beside each passage (`ReaderConfig`).
QUESTION_TOKENS = 64


class Retriever:
    """Dense retrieval over a store's FAISS index with the store's encoder."""

    def __init__(
        self,
        store: MemoryStore,
        encoder: Backbone,
        precision: Resolved = "fp32",
        max_question_tokens: int = QUESTION_TOKENS,
    ) -> None:
        self.store = store
        self.encoder = encoder
        self.precision = precision
        self.max_question_tokens = max_question_tokens

    @classmethod
    def for_store(
        cls, store: MemoryStore, device: str | torch.device = "cpu", precision: Resolved = "fp32"
    ) -> Retriever:
        """The retriever of a store, with the encoder named in its manifest, run in `precision`."""
        info = store.manifest["backbone"]
        encoder = Backbone.from_pretrained(info["model_path"], memory_layers=info["memory_layers"])
        return cls(store, encoder.to(device), precision)

    @torch.no_grad()
    def embed(self, questions: list[str]) -> np.ndarray:
        """Question embeddings 'b d' float32, L2-normalised (as the passages' are)."""
        with autocast(self.encoder.device, self.precision):
            embedded = self.encoder.embed_texts(questions, self.max_question_tokens)
        return embedded.float().cpu().numpy()

    def search(self, questions: list[str], k: int) -> list[list[RetrievedPassage]]:
        """The top-k passages of each question, best first (fewer when the store holds fewer)."""
        if not questions:
            return []
        k = min(k, self.store.num_passages)
        scores, rows = self.store.search(self.embed(questions), k)
        found = [
            [(int(row), float(score)) for row, score in zip(r, s, strict=True) if row >= 0]
            for r, s in zip(rows, scores, strict=True)
        ]
        records = self.store.passages([row for hits in found for row, _ in hits])
        out, position = [], 0
        for hits in found:
            out.append([passage_from_record(records[position + i], score) for i, (_, score) in enumerate(hits)])
            position += len(hits)
        return out


def passage_from_record(record: dict[str, Any], score: float) -> RetrievedPassage:
    """A RetrievedPassage from a `MemoryStore.passages` record and a score."""
    return RetrievedPassage(
        row=int(record["row"]),
        passage_id=str(record["passage_id"]),
        wikipedia_id=str(record["doc_id"]),
        title=str(record["title"]),
        start_paragraph_id=int(record["start_paragraph_id"]),
        end_paragraph_id=int(record["end_paragraph_id"]),
        score=score,
        text=str(record["text"]),
    )

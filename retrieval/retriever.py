"""The retriever: questions -> the store's top-K passages, by one of three modes: `dense` (the store's own encoder,
frozen, over its FAISS index; an approximate index's candidates re-scored exactly: `MemoryStore.search`), `lexical`
(BM25 over the passages' words: `retrieval.lexical`) or `hybrid` (both lists' union ranked by a fused score).

It owns the question side of dense retrieval and what a retrieved passage carries (KILT provenance: wikipedia_id,
title, paragraph range, score). The question encoder is the full backbone the store was built with, untouched by
reader training, so questions and passages live in the same embedding space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from memvq.encoders.backbone import Backbone
from memvq.encoders.hardware import Resolved, autocast
from memvq.encoders.options import RETRIEVAL_MODES, RetrievalMode
from memvq.memory.index import top_k_by
from memvq.memory.store import MemoryStore
from memvq.retrieval.lexical import LexicalIndex


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


RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009): a passage scores sum(1 / (RRF_K + rank))
HYBRID_DEPTH = 50  # each mode's candidates fused for hybrid retrieval (at least K)


@dataclass(frozen=True)
class Fusion:
    """How hybrid retrieval ranks the union of the dense and the lexical top-HYBRID_DEPTH. "score": dense inner
    product + weight x the passage's BM25 score / the question's best BM25 score (0 outside the lexical list), a
    convex-combination fusion; "rrf": reciprocal rank fusion, the dense list weighted 1 and the lexical one
    `weight`. Each weight was tuned on the train split's questions (docs/benchmarks.md, "Retrieval modes")."""

    method: Literal["score", "rrf"]
    weight: float


FUSION = Fusion("score", 0.2)  # the hybrid mode's fusion: the better of the two on the train split

# Question tokens the retriever embeds: the whole question, as the encoder was trained to embed sentences (NQ
# questions are under 30 tokens); the reader keeps fewer of them beside each passage (`ReaderConfig`).
QUESTION_TOKENS = 64


class Retriever:
    """Retrieval over a store: its FAISS index with the store's encoder, its BM25 index, or both; `mode` is what a
    search gets unless it asks for another (default: the store's, set at build time)."""

    def __init__(
        self,
        store: MemoryStore,
        encoder: Backbone,
        precision: Resolved = "fp32",
        max_question_tokens: int = QUESTION_TOKENS,
        mode: RetrievalMode | None = None,
        fusion: Fusion = FUSION,
    ) -> None:
        self.store = store
        self.encoder = encoder
        self.precision = precision
        self.max_question_tokens = max_question_tokens
        self.mode: RetrievalMode = mode or store.default_retrieval  # type: ignore[assignment]
        self.fusion = fusion
        self.lexical: LexicalIndex | None = None  # loaded with a store whose default needs it, else on first use
        if self.mode != "dense":
            self._lexical(self.mode)

    @classmethod
    def for_store(
        cls,
        store: MemoryStore,
        device: str | torch.device = "cpu",
        precision: Resolved = "fp32",
        mode: RetrievalMode | None = None,
    ) -> Retriever:
        """The retriever of a store, with the encoder named in its manifest, run in `precision`."""
        info = store.manifest["backbone"]
        encoder = Backbone.from_pretrained(info["model_path"], memory_layers=info["memory_layers"])
        return cls(store, encoder.to(device), precision, mode=mode)

    @torch.no_grad()
    def embed(self, questions: list[str]) -> np.ndarray:
        """Question embeddings 'b d' float32, L2-normalised (as the passages' are)."""
        with autocast(self.encoder.device, self.precision):
            embedded = self.encoder.embed_texts(questions, self.max_question_tokens)
        return embedded.float().cpu().numpy()

    def search(self, questions: list[str], k: int, mode: RetrievalMode | None = None) -> list[list[RetrievedPassage]]:
        """The top-k passages of each question, best first (fewer when the store holds fewer; lexical: those that
        share a word with the question, then dense ones if they are fewer than k). Each passage's score is its
        dense inner product with the question, whatever ranked it (the scale the reader's confidence is calibrated
        on)."""
        if not questions:
            return []
        k = min(k, self.store.num_passages)
        mode = mode or self.mode
        embedded = self.embed(questions)
        if mode == "dense":
            scores, rows = self.store.search(embedded, k)
        else:
            rows, scores = self._by_words(questions, embedded, k, mode)
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

    def _by_words(self, questions: list[str], embedded: np.ndarray, k: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """Lexical or hybrid retrieval: (rows 'q k', their dense scores 'q k'), -1 / -inf padded."""
        depth = min(max(k, HYBRID_DEPTH), self.store.num_passages)
        lexical = self._lexical(mode).search(questions, depth if mode == "hybrid" else k)
        if mode == "lexical":  # fewer passages may share a word with the question than asked: dense ones follow
            rows = lexical[1] if (lexical[1] >= 0).all() else topped_up(lexical[1], self.store.search(embedded, k)[1])
            return rows, self.store.scores(embedded, rows)
        # as many candidates as a dense search of k re-ranks (an approximate index's rerank x k), at least depth
        dense = self.store.search(embedded, depth, rerank=-(-self.store.index.config.rerank * k // depth))[1]
        if self.fusion.method == "score":
            return score_fusion(embedded, dense, lexical, self.store.scores, k, self.fusion.weight)
        rows = reciprocal_rank_fusion([dense, lexical[1]], k, weights=[1.0, self.fusion.weight])
        return rows, self.store.scores(embedded, rows)

    def _lexical(self, mode: str) -> LexicalIndex:
        if mode not in RETRIEVAL_MODES:
            raise ValueError(f"unknown retrieval mode {mode!r}: one of {', '.join(RETRIEVAL_MODES)}")
        if self.lexical is None:
            if self.store.lexical_dir is None:
                raise ValueError(
                    f"{mode} retrieval needs the store's BM25 index, and {self.store.layout.root} has none (built "
                    "with lexical = false, or by an older memvq): rebuild it, or ask for dense retrieval"
                )
            self.lexical = LexicalIndex.load(self.store.lexical_dir)
        return self.lexical


def reciprocal_rank_fusion(
    rankings: list[np.ndarray], k: int, constant: int = RRF_K, weights: list[float] | None = None
) -> np.ndarray:
    """Rows 'q k' ranked by the sum over `rankings` (each 'q n', best first, -1 for none) of weight / (constant +
    rank), rank from 1 (weights: 1 each unless given); ties go to the row ranked first by the first ranking that has
    it. -1 pads."""
    weights = weights or [1.0] * len(rankings)
    fused = np.full((len(rankings[0]), k), -1, dtype=np.int64)
    for q in range(len(fused)):
        scores: dict[int, float] = {}
        for ranking, weight in zip(rankings, weights, strict=True):
            for rank, row in enumerate(ranking[q].tolist(), start=1):
                if row >= 0:
                    scores[row] = scores.get(row, 0.0) + weight / (constant + rank)
        best = sorted(scores, key=lambda row: -scores[row])[:k]  # sorted is stable: first seen wins a tie
        fused[q, : len(best)] = best
    return fused


def score_fusion(
    queries: np.ndarray,
    dense: np.ndarray,
    lexical: tuple[np.ndarray, np.ndarray],
    dense_scores: Callable[[np.ndarray, np.ndarray], np.ndarray],
    k: int,
    weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows 'q k', their dense scores 'q k') of the union of each question's dense rows 'q n' and lexical (BM25
    scores, rows) 'q n' (-1: none), ranked by dense score (`dense_scores(queries, rows)` -> 'q m', -inf for -1) +
    weight x BM25 score / the question's best (0 for a row the lexical list lacks); ties in union order (dense
    first). -1 / -inf pad."""
    lexical_scores, lexical_rows = lexical
    union = np.full((len(dense), dense.shape[1] + lexical_rows.shape[1]), -1, dtype=np.int64)
    bonus = np.zeros(union.shape, dtype=np.float32)
    for q in range(len(dense)):
        found = [row for row in lexical_rows[q].tolist() if row >= 0]
        best = float(lexical_scores[q, 0]) if found else 1.0
        normalised = dict(zip(found, (lexical_scores[q, : len(found)] / best).tolist(), strict=True))
        rows = list(dict.fromkeys([row for row in dense[q].tolist() if row >= 0] + found))
        union[q, : len(rows)] = rows
        bonus[q, : len(rows)] = [normalised.get(row, 0.0) for row in rows]
    exact = dense_scores(queries, union)
    rows, scores = top_k_by(exact + weight * bonus, k, union, exact)  # -1 rows score -inf: they come last
    return rows, scores


def topped_up(rows: np.ndarray, more: np.ndarray) -> np.ndarray:
    """Rows 'q k' with their -1 slots filled, in order, by the rows of `more` 'q n' they do not hold yet."""
    out = rows.copy()
    for q in range(len(rows)):
        kept = [row for row in rows[q].tolist() if row >= 0]
        extra = [row for row in more[q].tolist() if row >= 0 and row not in kept]
        filled = (kept + extra)[: rows.shape[1]]
        out[q] = filled + [-1] * (rows.shape[1] - len(filled))
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

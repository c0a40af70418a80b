"""`memvq calibrate`: fit a reader's answer confidence on questions with known answers and choose its default
threshold, written as `calibration.json` beside the reader (`memvq.pipelines.confidence`).

The questions should be ones the reader is not evaluated on (its training split: `memvq split`). Every
`unsupported_every`-th question has its gold pages hidden from retrieval (the passages retrieved are the best ones
of other pages, as from a store built without those pages), so that the fit also sees questions the store holds
no answer to. The threshold saved with it: `min_confidence` when given (a rule on held-out questions chose it), else
the largest one that keeps at least `keep_right` of the right answers of these questions (answers abstained on are
the ones of lowest confidence).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from memvq.data.kilt.records import gold_answers, gold_evidence_sets, read_kilt_file, record_input
from memvq.data.kilt.selective import auroc, expected_calibration_error, is_right
from memvq.encoders.options import QueryOptions
from memvq.memory.artifact import sha256_file
from memvq.pipelines.confidence import Calibration, Evidence, fit_calibration

if TYPE_CHECKING:
    from memvq.pipelines.rag import RAGPipeline
    from memvq.retrieval.retriever import RetrievedPassage

logger = logging.getLogger(__name__)


class CalibrateSettings(BaseModel):
    """How a calibration is fitted (saved as the config of calibration.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    query: QueryOptions = Field(default_factory=QueryOptions, description="the query knobs (None: the reader's)")
    batch_size: int = Field(16, ge=1, description="questions per pipeline call")
    skip: int = Field(0, ge=0, description="leave out the first N questions of each file (those held out for reports)")
    limit: int | None = Field(None, ge=1, description="at most N questions of each file (after --skip)")
    unsupported_every: int = Field(2, ge=0, description="hide the gold pages of every Nth question (0: none)")
    keep_right: float = Field(0.9, gt=0.0, le=1.0, description="the threshold keeps this share of right answers")
    min_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="the default threshold to save (None: the keep_right rule on these questions)"
    )
    l2: float = Field(1.0, ge=0.0, description="L2 penalty of the logistic regression (standardised features)")


def hidden_pages(record: dict[str, Any]) -> set[str]:
    """The gold pages of a KILT record (wikipedia ids of its provenance)."""
    return set().union(*gold_evidence_sets(record)) if gold_evidence_sets(record) else set()


def retrieve_without(
    pipeline: RAGPipeline, questions: list[str], hidden: Sequence[set[str]], top_k: int
) -> list[list[RetrievedPassage]]:
    """The top_k passages of each question that are not from its `hidden` pages (searching deeper as needed)."""
    depth = top_k + 64
    while True:
        found = pipeline.retriever.search(questions, depth)
        pairs = zip(found, hidden, strict=True)
        kept = [[p for p in hits if p.wikipedia_id not in pages][:top_k] for hits, pages in pairs]
        if all(len(hits) == top_k for hits in kept) or depth >= pipeline.store.num_passages:
            return kept
        depth *= 4


def threshold_for(confidence: Sequence[float], correct: Sequence[bool], keep_right: float) -> float:
    """The largest threshold t such that answering at confidence >= t keeps >= keep_right of the right answers."""
    right = sorted((c for c, ok in zip(confidence, correct, strict=True) if ok), reverse=True)
    if not right:
        return 0.0
    return float(right[math.ceil(len(right) * keep_right) - 1])


def calibrate(
    pipeline: RAGPipeline, data_files: Sequence[str | Path], settings: CalibrateSettings, progress: bool = True
) -> tuple[Calibration, dict[str, Any]]:
    """Answer the questions of `data_files` (every `unsupported_every`-th one without its gold pages), fit the
    calibration and choose its threshold; returns it and what the fit saw (saved in calibration.json)."""
    options = settings.query.resolved(pipeline.config)
    end = settings.skip + settings.limit if settings.limit else None
    records = [
        r for path in data_files for r in read_kilt_file(path, limit=end, need_input=True).records[settings.skip :]
    ]
    records = [r for r in records if gold_answers(r)]
    if not records:
        raise ValueError("no questions with a gold answer in the calibration data")
    evidence: list[Evidence] = []
    correct: list[bool] = []
    unsupported: list[bool] = []
    bar = tqdm(total=len(records), desc="calibrate", unit="q", disable=not progress)
    with bar:
        for start in range(0, len(records), settings.batch_size):
            batch = records[start : start + settings.batch_size]
            positions = range(start, start + len(batch))
            hide = [settings.unsupported_every > 0 and i % settings.unsupported_every == 1 for i in positions]
            questions = [str(record_input(r)) for r in batch]
            pages = [hidden_pages(r) if h else set() for r, h in zip(batch, hide, strict=True)]
            retrieved = retrieve_without(pipeline, questions, pages, options.top_k or 1)
            for record, answer, hidden in zip(batch, pipeline.read(questions, retrieved, options), hide, strict=True):
                if answer.evidence is None:
                    raise ValueError("only an extract-head reader has a confidence to calibrate")
                evidence.append(answer.evidence)
                correct.append(is_right(answer.answer, gold_answers(record)))
                unsupported.append(hidden)
            bar.update(len(batch))
    calibration = fit_calibration(evidence, correct, settings.l2)
    fitted = [calibration.confidence(e) for e in evidence]
    threshold = settings.min_confidence
    if threshold is None:
        threshold = threshold_for(fitted, correct, settings.keep_right)
    calibration = replace(calibration, min_confidence=round(threshold, 4))
    kept = [c >= threshold for c in fitted]
    wrong = [not ok for ok in correct]
    fit = {
        "questions": len(records),
        "unsupported": sum(unsupported),
        "accuracy": sum(correct) / len(correct),
        "auroc": auroc(fitted, correct),
        "ece_raw": expected_calibration_error([e.raw_confidence() for e in evidence], correct),
        "ece_fitted": expected_calibration_error(fitted, correct),
        "wrong_removed": sum(w and not k for w, k in zip(wrong, kept, strict=True)) / max(1, sum(wrong)),
        "unsupported_abstained": sum(u and not k for u, k in zip(unsupported, kept, strict=True))
        / max(1, sum(unsupported)),
        "data": {str(path): sha256_file(Path(path)) for path in data_files},
        "store_manifest_sha256": sha256_file(pipeline.store.layout.manifest),
    }
    return calibration, fit

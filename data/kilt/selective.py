"""Scores of answers that may abstain: how well a confidence separates right answers from wrong ones (AUROC), how
well it is calibrated (expected calibration error) and what a threshold trades (coverage against the accuracy of
the answers given: the risk-coverage curve). Inputs are per question: the confidence of the answer it would give
and whether that answer is right (exact match), whether or not it was given."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from memvq.data.kilt.metrics import exact_match, metric_max_over_ground_truths

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def is_right(answer: str, gold: Iterable[str]) -> bool:
    """Whether an answer matches one of the gold answers exactly (KILT normalisation): what "right" means here."""
    return metric_max_over_ground_truths(exact_match, answer, gold) == 1.0


def auroc(confidence: Sequence[float], correct: Sequence[bool]) -> float | None:
    """P(a right answer's confidence > a wrong one's), ties counted half (None without both kinds)."""
    scores, labels = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=bool)
    right, wrong = scores[labels], scores[~labels]
    if not len(right) or not len(wrong):
        return None
    above = (right[:, None] > wrong[None, :]).sum() + 0.5 * (right[:, None] == wrong[None, :]).sum()
    return float(above / (len(right) * len(wrong)))


def calibration_bins(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width confidence bins: questions, mean confidence and accuracy of each non-empty bin."""
    scores, labels = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    index = np.minimum((scores * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        if members.any():
            rows.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "questions": int(members.sum()),
                    "confidence": float(scores[members].mean()),
                    "accuracy": float(labels[members].mean()),
                }
            )
    return rows


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """Sum over equal-width bins of (bin share) x |mean confidence - accuracy|."""
    rows = calibration_bins(confidence, correct, bins)
    total = sum(row["questions"] for row in rows)
    return float(sum(row["questions"] / total * abs(row["confidence"] - row["accuracy"]) for row in rows))


def at_threshold(confidence: Sequence[float], correct: Sequence[bool], threshold: float) -> dict[str, float | None]:
    """What answering only at confidence >= threshold keeps: coverage (share answered), the accuracy of the
    answered part, the share of right answers kept and of wrong answers removed."""
    answered = np.asarray(confidence, dtype=float) >= threshold
    return {"threshold": threshold, **_answering(np.asarray(correct, dtype=bool), answered)}


def _answering(labels: np.ndarray, answered: np.ndarray) -> dict[str, float | None]:
    """Coverage, accuracy of the answered, right answers kept and wrong ones removed, of the answers given where
    `answered` (labels: right or not)."""
    right, wrong = labels.sum(), (~labels).sum()
    return {
        "coverage": float(answered.mean()),
        "accuracy_answered": float(labels[answered].mean()) if answered.any() else None,
        "right_kept": float((labels & answered).sum() / right) if right else None,
        "wrong_removed": float((~labels & ~answered).sum() / wrong) if wrong else None,
    }


def risk_coverage(confidence: Sequence[float], correct: Sequence[bool]) -> list[tuple[float, float]]:
    """(coverage, risk = 1 - accuracy of the answered) answering the most confident first, one point per question."""
    order = np.argsort(-np.asarray(confidence, dtype=float), kind="stable")
    labels = np.asarray(correct, dtype=float)[order]
    answered = np.arange(1, len(labels) + 1)
    risk = 1.0 - np.cumsum(labels) / answered
    return [(float(c), float(r)) for c, r in zip(answered / len(labels), risk, strict=True)]


def selective_scores(confidence: Sequence[float], correct: Sequence[bool], abstained: Sequence[bool]) -> dict[str, Any]:
    """The selective-answering report of one task: AUROC, ECE, the calibration bins, what the run's threshold did
    (`abstained`), the same at each of `THRESHOLDS`, the risk-coverage curve (at most ~100 points) and the area
    under it."""
    if not len(confidence):
        raise ValueError("no confidences to score")
    labels = np.asarray(correct, dtype=bool)
    skipped = np.asarray(abstained, dtype=bool)
    curve = risk_coverage(confidence, correct)
    step = max(1, len(curve) // 100)
    return {
        "questions": len(labels),
        "auroc": auroc(confidence, correct),
        "ece": expected_calibration_error(confidence, correct),
        "accuracy_all": float(labels.mean()),
        "abstain_rate": float(skipped.mean()),
        **_answering(labels, ~skipped),
        "area_under_risk_coverage": float(np.mean([risk for _, risk in curve])),
        "risk_coverage": [list(point) for point in curve[step - 1 :: step]],
        "thresholds": [at_threshold(confidence, correct, t) for t in THRESHOLDS],
        "bins": calibration_bins(confidence, correct),
    }

"""How sure an answer is: the evidence it is computed from, the calibration that turns the evidence into a
probability of being right, and the file that keeps a calibration beside its reader.

An extract-head answer's evidence is what the pipeline already computes: the answer's log-probability under the
span head (its spans' probabilities added up), its margin over the second-best answer, how many of the passages
read hold it, the log of the head's "no answer in what was read" mass and the retrieval score of the best passage
retrieved. A calibration is a logistic regression on them (Platt scaling with five inputs), fitted by `memvq
calibrate` on questions with known answers, so that among answers of confidence 0.8 about 80% are right on
questions like those. A reader without one reports the raw answer probability, which
is not calibrated. The generate head has no confidence (None: it never abstains).

    READER_DIR/calibration.json   memvq-calibration header: the fit's settings (config), the weights, the
                                  default `min_confidence` chosen with them, the reader weights' sha256 and the fit's
                                  numbers (questions, calibration error before / after)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memvq.memory.artifact import ArtifactFormat, read_artifact, write_artifact

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = ArtifactFormat("memvq-calibration", 1, remake="run `memvq calibrate` again")
FEATURES = ("answer_log_prob", "margin", "support", "no_answer_log_prob", "retrieval_score")
_LOG_FLOOR = -50.0  # log-probabilities below this carry no more information


@dataclass(frozen=True)
class Evidence:
    """What an answer's confidence is computed from (see the module docstring)."""

    answer_log_prob: float
    runner_up_log_prob: float
    support: int
    no_answer_log_prob: float
    retrieval_score: float

    def vector(self) -> np.ndarray:
        """The features in `FEATURES` order (margin: answer minus runner-up log-probability)."""
        answer = max(self.answer_log_prob, _LOG_FLOOR)
        return np.array(
            [
                answer,
                answer - max(self.runner_up_log_prob, _LOG_FLOOR),
                float(self.support),
                max(self.no_answer_log_prob, _LOG_FLOOR),
                self.retrieval_score,
            ]
        )

    def raw_confidence(self) -> float:
        """The span head's own probability of the answer (uncalibrated)."""
        return math.exp(min(self.answer_log_prob, 0.0))


@dataclass(frozen=True)
class Calibration:
    """P(right | evidence) = sigmoid(weights . evidence + bias); `min_confidence`: the threshold chosen with it
    (None: the reader config's)."""

    weights: tuple[float, ...]
    bias: float
    min_confidence: float | None = None

    def confidence(self, evidence: Evidence) -> float:
        return float(_sigmoid(float(np.dot(self.weights, evidence.vector())) + self.bias))


def _sigmoid(x: float | np.ndarray) -> Any:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def fit_calibration(
    evidence: Sequence[Evidence], correct: Sequence[bool], l2: float = 1.0, steps: int = 50
) -> Calibration:
    """The logistic regression of `correct` on the evidence (Newton's method on standardised features, an L2
    penalty `l2` on the weights); ValueError unless both right and wrong answers are given."""
    if len(evidence) != len(correct):
        raise ValueError(f"{len(evidence)} evidence rows for {len(correct)} labels")
    y = np.asarray(correct, dtype=float)
    if y.min(initial=1.0) == y.max(initial=0.0):
        raise ValueError("calibration needs both right and wrong answers among the questions")
    x = np.stack([e.vector() for e in evidence])
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    penalty = np.diag([l2] * x.shape[1] + [0.0])
    theta = np.zeros(z.shape[1])
    for _ in range(steps):
        p = _sigmoid(z @ theta)
        gradient = z.T @ (p - y) + penalty @ theta
        hessian = (z * (p * (1 - p))[:, None]).T @ z + penalty + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    weights = theta[:-1] / scale
    return Calibration(tuple(float(w) for w in weights), float(theta[-1] - np.dot(weights, mean)))


def save_calibration(
    directory: str | Path, calibration: Calibration, settings: Mapping[str, Any], fit: Mapping[str, Any]
) -> Path:
    """Write `directory/calibration.json` (settings: how it was fitted; fit: what it was fitted on and its numbers)."""
    write_artifact(
        Path(directory),
        CALIBRATION_FILE,
        CALIBRATION_FORMAT,
        settings,
        extra={
            "features": list(FEATURES),
            "weights": list(calibration.weights),
            "bias": calibration.bias,
            "min_confidence": calibration.min_confidence,
            "fit": dict(fit),
        },
    )
    return Path(directory) / CALIBRATION_FILE


def load_calibration(directory: str | Path, reader_sha256: str | None = None) -> Calibration | None:
    """The calibration saved beside a reader (None: it has none); a calibration fitted for other reader weights
    than `reader_sha256` is ignored with a warning (its numbers describe another model)."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return None
    header = read_artifact(path, CALIBRATION_FORMAT, "calibration")
    extra = header.extra
    if list(extra.get("features") or []) != list(FEATURES):
        raise ValueError(f"{path}: features {extra.get('features')}, this memvq computes {list(FEATURES)}")
    fitted_for = (extra.get("fit") or {}).get("reader_sha256")
    if reader_sha256 is not None and fitted_for not in (None, reader_sha256):
        logger.warning("%s was fitted for other reader weights: ignored (run `memvq calibrate` again)", path)
        return None
    threshold = extra.get("min_confidence")
    return Calibration(
        tuple(float(w) for w in extra["weights"]),
        float(extra["bias"]),
        None if threshold is None else float(threshold),
    )

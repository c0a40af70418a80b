"""The extractive answer head: start / end logits over the tokens of each [question; passage] pair plus a passage
score, its training loss and span decoding.

It reads the reader's final pair states, hidden 'b k n d' (b questions, k passages each, n pair positions).
Position 0 of each pair (the question's first token: [CLS] for BERT) gives the passage score and is the
"no answer in this passage" position; it is never part of a span. Which positions may start or end a span is the
caller's `span_mask` 'b k n' (the passage's text tokens in pair coordinates, see `encoders.spans`). Start and
end are each a softmax over the allowed positions plus position 0 of a pair; the passage score a softmax over the
k pairs of a question, so that log P(passage) + log P(start) + log P(end) compares spans across passages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from einops import rearrange
from torch import nn

Objective = Literal["marginal", "hard_em"]
Span = tuple[int, int]  # (start, end) pair positions, end inclusive


@dataclass
class SpanLogits:
    """start 'b k n', end 'b k n' (token logits per pair), passage 'b k' (passage score per pair)."""

    start: torch.Tensor
    end: torch.Tensor
    passage: torch.Tensor


class SpanCandidate(NamedTuple):
    """A decoded span: the pair (passage index j of the k read), start / end pair positions (inclusive) and
    score = log P(start) + log P(end) + passage_weight x log P(passage)."""

    passage: int
    start: int
    end: int
    score: float


class SpanHead(nn.Module):
    """Linear(d, 2) start / end logits per token; passage score from position 0 (optional tanh pooler, Linear(d, 1))."""

    def __init__(self, hidden_size: int, pooler: bool = True) -> None:
        super().__init__()
        # No bias on the score layers: a constant shift cancels in the softmax over positions / passages.
        self.span = nn.Linear(hidden_size, 2, bias=False)
        score = nn.Linear(hidden_size, 1, bias=False)
        self.passage = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), score) if pooler else score

    def forward(self, hidden: torch.Tensor) -> SpanLogits:
        """hidden 'b k n d' -> SpanLogits(start 'b k n', end 'b k n', passage 'b k')."""
        start, end = self.span(hidden).unbind(dim=-1)
        return SpanLogits(start=start, end=end, passage=self.passage(hidden[:, :, 0]).squeeze(-1))


def token_log_probs(logits: SpanLogits, span_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end log-probabilities 'b k n' per pair over the positions of `span_mask` 'b k n' plus position 0
    (-inf elsewhere). Computed in float32."""
    allowed = span_mask.bool().clone()
    allowed[..., 0] = True
    start = logits.start.float().masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)
    end = logits.end.float().masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)
    return start, end


def _positive_index(positives: Sequence[Sequence[Span]], rows: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per pair (r = b k rows) its occurrences padded to the longest list: starts, ends, valid 'r m'; a pair
    without an answer gets the single occurrence (0, 0)."""
    if len(positives) != rows:
        raise ValueError(f"positives for {len(positives)} pairs, but the logits hold {rows}")
    width = max([1, *(len(spans) for spans in positives)])
    starts = torch.zeros(rows, width, dtype=torch.long)
    ends = torch.zeros(rows, width, dtype=torch.long)
    valid = torch.zeros(rows, width, dtype=torch.bool)
    for row, spans in enumerate(positives):
        spans = list(spans) or [(0, 0)]
        starts[row, : len(spans)] = torch.tensor([start for start, _ in spans])
        ends[row, : len(spans)] = torch.tensor([end for _, end in spans])
        valid[row, : len(spans)] = True
    return starts.to(device), ends.to(device), valid.to(device)


def _occurrences(
    start_lp: torch.Tensor, end_lp: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """log P(start) + log P(end) of each listed occurrence 'r m' (-inf where not valid); log-probs 'b k n'."""
    start_lp, end_lp = (rearrange(values, "b k n -> (b k) n") for values in (start_lp, end_lp))
    return (start_lp.gather(1, starts) + end_lp.gather(1, ends)).masked_fill(~valid, float("-inf"))


@torch.no_grad()
def answer_log_likelihood(
    logits: SpanLogits, span_mask: torch.Tensor, positives: Sequence[Sequence[Span]], floor: float = -1e4
) -> torch.Tensor:
    """log P(answer | question, passage) per pair 'b k': the summed likelihood of the passage's answer occurrences
    (positives in '(b k)' order, as for `span_loss`), `floor` for a passage that holds none (GLIMMER's
    perplexity-distillation target reads it: such passages get no weight)."""
    batch = logits.start.shape[0]
    start_lp, end_lp = token_log_probs(logits, span_mask)
    starts, ends, valid = _positive_index(positives, start_lp.shape[0] * start_lp.shape[1], start_lp.device)
    has_answer = torch.tensor([len(spans) > 0 for spans in positives], device=valid.device)
    likelihood = _occurrences(start_lp, end_lp, starts, ends, valid).logsumexp(dim=-1)
    return rearrange(likelihood.masked_fill(~has_answer, floor), "(b k) -> b k", b=batch)


def span_loss(
    logits: SpanLogits,
    span_mask: torch.Tensor,
    positives: Sequence[Sequence[Span]],
    objective: Objective = "marginal",
    passage_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The extractive loss: {"span_loss", "passage_loss", "loss" = span_loss + passage_weight x passage_loss}.

    span_mask 'b k n': True where a token may start / end an answer (position 0 is always the no-answer one).
    positives: per pair in '(b k)' order, its answer occurrences (start, end) in pair coordinates, [] when the
    passage holds no answer. span_loss, averaged over the pairs: with occurrences, -log sum over them of
    P(start) P(end) ("marginal") or -max over them ("hard_em"); without, -log P(start = 0) P(end = 0).
    passage_loss, averaged over the questions with an answer in some pair (0 when none has):
    -log sum of P(passage) over the pairs that hold an answer.
    """
    batch, k, _ = logits.start.shape
    start_lp, end_lp = token_log_probs(logits, span_mask)
    starts, ends, valid = _positive_index(positives, batch * k, logits.start.device)
    allowed = rearrange(span_mask.bool(), "b k n -> (b k) n").clone()
    allowed[:, 0] = True
    if not (allowed.gather(1, starts)[valid].all() and allowed.gather(1, ends)[valid].all()):
        raise ValueError("a positive span starts or ends outside the span mask")
    if (ends < starts)[valid].any():
        raise ValueError("a positive span ends before it starts")
    occurrence = _occurrences(start_lp, end_lp, starts, ends, valid)  # 'r m'
    if objective == "marginal":
        per_pair = -occurrence.logsumexp(dim=-1)
    elif objective == "hard_em":
        per_pair = -occurrence.max(dim=-1).values
    else:
        raise ValueError(f"unknown objective {objective!r} (marginal or hard_em)")
    has_answer = torch.tensor([len(spans) > 0 for spans in positives], device=valid.device)
    has_answer = rearrange(has_answer, "(b k) -> b k", b=batch)
    passage_lp = logits.passage.float().log_softmax(dim=-1).masked_fill(~has_answer, float("-inf"))
    answered = has_answer.any(dim=-1)
    passage = -passage_lp[answered].logsumexp(dim=-1).mean() if answered.any() else passage_lp.new_zeros(())
    span = per_pair.mean()
    return {"span_loss": span, "passage_loss": passage, "loss": span + passage_weight * passage}


@torch.no_grad()
def no_answer_log_prob(logits: SpanLogits, span_mask: torch.Tensor, passage_weight: float = 1.0) -> torch.Tensor:
    """log of the "no answer in what was read" mass per question 'b': the sum over its k pairs of P(start = 0)
    P(end = 0) P(passage)^passage_weight, the position-0 counterpart of a span's score."""
    start_lp, end_lp = token_log_probs(logits, span_mask)
    passage_lp = logits.passage.float().log_softmax(dim=-1)
    return (start_lp[..., 0] + end_lp[..., 0] + passage_weight * passage_lp).logsumexp(dim=-1)


@torch.no_grad()
def best_spans(
    logits: SpanLogits,
    span_mask: torch.Tensor,
    max_span_tokens: int,
    passage_weight: float = 1.0,
    top_n: int = 20,
) -> list[list[SpanCandidate]]:
    """The `top_n` best spans of each question over its k pairs, best first.

    A span starts and ends on `span_mask` 'b k n' positions (never position 0), end >= start and
    end - start < max_span_tokens; its score is log P(start) + log P(end) + passage_weight x log P(passage).
    Fewer than `top_n` when fewer spans are allowed. The outer sum 'b k n n' is formed in memory.
    """
    if max_span_tokens < 1:
        raise ValueError(f"max_span_tokens must be >= 1, got {max_span_tokens}")
    n = logits.start.shape[-1]
    start_lp, end_lp = token_log_probs(logits, span_mask)
    passage_lp = logits.passage.float().log_softmax(dim=-1)
    edge = span_mask.bool().clone()
    edge[..., 0] = False
    offset = torch.arange(n, device=edge.device)
    offset = offset[None, :] - offset[:, None]  # [i, j] = j - i
    band = (offset >= 0) & (offset < max_span_tokens)
    allowed = band & edge[..., :, None] & edge[..., None, :]  # 'b k n n'
    scores = start_lp[..., :, None] + end_lp[..., None, :] + passage_weight * passage_lp[..., None, None]
    scores = rearrange(scores.masked_fill(~allowed, float("-inf")), "b k i j -> b (k i j)")
    count = min(top_n, scores.shape[1])
    values, index = scores.topk(count, dim=-1)
    found = allowed.flatten(1).sum(dim=-1).clamp(max=count).tolist()
    passage, rest = index.div(n * n, rounding_mode="floor"), index % (n * n)
    start, end = rest.div(n, rounding_mode="floor"), rest % n
    columns = (passage.tolist(), start.tolist(), end.tolist(), values.tolist())
    return [
        [SpanCandidate(*candidate) for candidate in zip(*(column[row][:kept] for column in columns), strict=True)]
        for row, kept in enumerate(found)
    ]

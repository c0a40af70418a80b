"""The GLIMMER reranker: a shallow head that scores [question; passage] pairs, and its distillation objective.

It owns the scoring head and GLIMMER/Atlas perplexity distillation (the target and the loss). Which layers run
before it (Live-A, the first `rerank_layers` live layers), top-k selection and where the target's likelihoods come
from live in `encoders.reader`.

Pooling: a pair's states 'b k n d' are split by two masks into its question tokens and its passage tokens; each
part is a masked mean over its real tokens, giving q and p 'b k d' (question-side special tokens count as question,
passage-side ones as passage). The features [q; p; q * p] 'b k 3d' go through LayerNorm(3d) and Linear(3d, 1),
one score per pair. After Live-A the question tokens have attended to the passage and vice versa, so the
interaction term q * p is the cheap part of a cross-encoder score, the two means its context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where mask is true: 'b k n d', 'b k n' -> 'b k d' (zeros where no token is set)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=-2) / weights.sum(dim=-2).clamp(min=1.0)


class RerankerHead(nn.Module):
    """Scores 'b k' of K [question; passage] pairs from their states after Live-A."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.norm = nn.LayerNorm(3 * hidden_size)
        self.score = nn.Linear(3 * hidden_size, 1)

    def forward(self, hidden: torch.Tensor, question_mask: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
        """hidden 'b k n d', question_mask 'b k n', passage_mask 'b k n' (true = token of that part) -> 'b k'."""
        question = masked_mean(hidden, question_mask)
        passage = masked_mean(hidden, passage_mask)
        features = torch.cat([question, passage, question * passage], dim=-1)
        return self.score(self.norm(features)).squeeze(-1)


def perplexity_distillation_target(log_likelihood: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Atlas/GLIMMER target: softmax over the K passages of log p(answer | question, passage k alone).

    log_likelihood 'b k' (summed over the answer tokens) -> target 'b k', rows summing to 1, detached.
    """
    return torch.softmax(log_likelihood.detach().float() / temperature, dim=-1)


def perplexity_distillation_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(scores)), averaged over questions: scores 'b k', target 'b k' -> scalar.

    This is Atlas' `KLDivLoss(log_softmax(scores), target)`: zero exactly when softmax(scores) equals the target,
    and its gradient w.r.t. the scores is softmax(scores) - target.
    """
    return F.kl_div(torch.log_softmax(scores.float(), dim=-1), target.float(), reduction="batchmean")

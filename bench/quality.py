"""Reconstruction-quality metrics of memory codecs (the codec benchmarks' and tests', not the runtime's)."""

from __future__ import annotations

import torch

__all__ = ["nn_agreement", "relative_error"]

_CHUNK = 8192


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t).detach().to(torch.float32)


def relative_error(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over tokens of ||x - x_hat|| / ||x||; x, x_hat: 'n d'."""
    x, x_hat = _as_float(x), _as_float(x_hat).to(x.device)
    if x.shape != x_hat.shape or x.ndim != 2:
        raise ValueError(f"expected two 'n d' tensors of one shape, got {tuple(x.shape)}, {tuple(x_hat.shape)}")
    if x.shape[0] == 0:
        raise ValueError("relative_error of zero tokens")
    num = torch.linalg.vector_norm(x - x_hat, dim=1).double()
    den = torch.linalg.vector_norm(x, dim=1).double().clamp_min(eps)
    return float((num / den).mean())


def _topk_ids(queries: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """'nq d', 'n d' -> 'nq k' indices of the k largest inner products (exact, chunked over queries)."""
    out = []
    for s in range(0, queries.shape[0], _CHUNK):
        scores = queries[s : s + _CHUNK] @ base.T  # 'chunk n'
        out.append(torch.topk(scores, k, dim=1, sorted=False).indices)
    return torch.cat(out)


def nn_agreement(x: torch.Tensor, x_hat: torch.Tensor, queries: torch.Tensor, k: int = 10) -> float:
    """Overlap@k of inner-product nearest neighbours among x vs among x_hat, averaged over queries.

    For every query q ('nq d'), A = top-k of <q, x_i> over the rows of x ('n d') and
    B = top-k of <q, x_hat_i> over the rows of x_hat; the score is mean_q |A & B| / k (1.0 = the
    codec preserves every query's exact top-k). Queries are used as given (uncompressed).
    """
    x, x_hat, queries = _as_float(x), _as_float(x_hat), _as_float(queries)
    if x.shape != x_hat.shape or x.ndim != 2:
        raise ValueError(f"expected two 'n d' tensors of one shape, got {tuple(x.shape)}, {tuple(x_hat.shape)}")
    if queries.ndim != 2 or queries.shape[1] != x.shape[1]:
        raise ValueError(f"queries must be 'nq {x.shape[1]}', got {tuple(queries.shape)}")
    if not 0 < k <= x.shape[0]:
        raise ValueError(f"k={k} must be in [1, n={x.shape[0]}]")
    a = _topk_ids(queries, x, k)  # 'nq k'
    b = _topk_ids(queries, x_hat.to(x.device), k)  # 'nq k'
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)  # 'nq'
    return float(hits.double().mean() / k)

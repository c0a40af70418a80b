"""EMA codebooks through `vector_quantize_pytorch.VectorQuantize` (heads with separate codebooks, dead-code reset,
no commitment loss): what the VQ codec's fit refines its codebooks with, and what `memvq train` fine-tunes them
with (`finetune.CodebookFinetuner`)."""

from __future__ import annotations

import torch
from vector_quantize_pytorch import VectorQuantize


def ema_quantizer(codebooks: torch.Tensor, decay: float, threshold_ema_dead_code: float) -> VectorQuantize:
    """A train-mode ``VectorQuantize`` holding codebooks 'h k c' (one per head): EMA updates with dead-code reset,
    no commitment loss (nothing upstream of the codec takes its gradients)."""
    h, k, c = codebooks.shape
    vq = VectorQuantize(
        dim=h * c,
        codebook_size=k,
        codebook_dim=c,  # heads * codebook_dim == dim: no projection in / out
        heads=h,
        separate_codebook_per_head=True,
        decay=decay,
        kmeans_init=True,  # never runs: the codebooks below are marked initialised
        threshold_ema_dead_code=threshold_ema_dead_code,
        commitment_weight=0.0,
        rotation_trick=False,
        sync_codebook=False,
    ).to(codebooks.device)
    vq._codebook.embed.copy_(codebooks)
    vq._codebook.initted.fill_(True)
    return vq.train()


def seed_usage(vqs: list[VectorQuantize], codes: torch.Tensor, batch: int) -> None:
    """Start every EMA codebook's cluster sizes (and sums) at the usage of codes 'n m' (laid out as the codec's),
    scaled to a batch of `batch` vectors: the scale the EMA statistics live on."""
    col, n = 0, codes.shape[0]
    for vq in vqs:
        book = vq._codebook
        h, k = book.cluster_size.shape
        usage = torch.stack([torch.bincount(codes[:, col + j], minlength=k) for j in range(h)]).float()
        usage = usage.to(book.cluster_size.device) * (batch / n)  # 'h k'
        book.cluster_size.copy_(usage)
        book.embed_avg.copy_(book.embed * usage.unsqueeze(-1))
        col += h


def quantize_levels(
    layout: list[tuple[int, int, list[int]]], vqs: list[VectorQuantize], z: torch.Tensor
) -> torch.Tensor:
    """Rotated 'n e' -> its quantization 'n e' through the EMA quantizers (segment by segment, level by level on
    the residuals); in train mode every call updates the codebooks."""
    zq = torch.empty_like(z)
    for off, dims, levels in layout:
        r = z[:, off : off + dims].unsqueeze(0)  # '1 n dims'
        acc = torch.zeros_like(r)
        for qi in levels:
            quantized, _, _ = vqs[qi](r)
            acc = acc + quantized
            r = r - quantized
        zq[:, off : off + dims] = acc[0]
    return zq

"""MEMORY-VQ fine-tuning: a fitted VQ codec's codebooks trained with the model that reads its memory (EMA updates,
straight-through gradients), for a store re-encoded with them (`build-index --codec-from`)."""

from __future__ import annotations

import torch

from memvq.memory.codecs.ema import ema_quantizer, quantize_levels, seed_usage
from memvq.memory.codecs.vq import VQCodec


class CodebookFinetuner(torch.nn.Module):
    """MEMORY-VQ fine-tuning of a fitted :class:`VQCodec`'s codebooks jointly with the model that reads its memory.

    ``forward`` quantizes memory vectors 'n d' with the codec's rotation and mean (fixed) and EMA codebooks: in
    train mode every batch updates them (``decay``, the codec's dead-code reset, no commitment loss), in eval
    mode they are read only and the output equals ``codec.decode(codec.encode(x))``. The output passes gradients
    to x unchanged (straight-through). ``codec()`` is a new codec with the current codebooks, to re-encode a
    store with; the state dict (EMA statistics included) resumes a run.
    """

    def __init__(self, codec: VQCodec, decay: float = 0.99) -> None:
        super().__init__()
        if not codec.is_fitted:
            raise ValueError("the codec to fine-tune is not fitted")
        self.base = codec
        cfg = codec.config
        self.quantizers = torch.nn.ModuleList(
            ema_quantizer(quant.codebooks, decay, cfg.threshold_ema_dead_code) for quant in codec._quantizers
        )
        # the EMA statistics start at the first training batch's usage
        self.register_buffer("seeded", torch.tensor(False, device=codec.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """'n d' memory vectors -> their quantization 'n d' (straight-through)."""
        base = self.base
        with torch.no_grad():
            z = base._rotate(x.detach().float())
            if self.training and not bool(self.seeded):
                seed_usage(list(self.quantizers), base._encode_rotated(z, recon=False)[0], z.shape[0])
                self.seeded.fill_(True)
            zq = quantize_levels(base._layout(), list(self.quantizers), z)
            x_hat = torch.addmm(base.mean, zq, base._rotation_t).to(x.dtype)
        return x + (x_hat - x).detach()

    def codec(self) -> VQCodec:
        """A fitted codec: the base codec's config, mean and rotation with the current codebooks (on CPU)."""
        out = VQCodec(self.base.config)
        out.mean, out.rotation = self.base.mean.cpu().clone(), self.base.rotation.cpu().clone()
        out._set_codebooks([vq.codebook.cpu() for vq in self.quantizers])
        out._fitted = True
        return out

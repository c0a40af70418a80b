"""Baseline memory codec: a faiss standalone codec built from a factory string.

``faiss.index_factory(d, factory)`` (e.g. ``PQ48x8``, ``OPQ48,PQ48x8``, ``PCA192,PQ24x8``); ``train``,
``sa_encode`` / ``sa_decode``; saved with ``faiss.write_index``. The code array has one uint8 column
per stored byte (``sa_code_size``), so bytes_per_token is exact for any bit packing faiss uses.
Decoding runs in faiss on the CPU and the result is moved to the codec's device.

Determinism: the k-means of the product quantizers is seeded with ``config.seed``; OPQ's random
init and faiss's training subsample use fixed internal seeds; so two fits on the same input give
the same codes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np
import torch

from memvq.memory.codecs.base import MemoryCodec
from memvq.memory.codecs.config import CodecConfig

__all__ = ["FaissCodec"]

LOG = logging.getLogger(__name__)


def _seed_everything(index: faiss.Index, seed: int) -> None:
    """Seed the k-means of every product / residual quantizer reachable from `index`.

    (faiss's OPQ rotation init and its training subsampling use fixed internal seeds, so they are
    deterministic too.)
    """
    stack: list[object] = [index]
    while stack:
        obj = stack.pop()
        if isinstance(obj, faiss.IndexPreTransform):
            stack.extend(obj.chain.at(i) for i in range(obj.chain.size()))
            stack.append(faiss.downcast_index(obj.index))
        for name in ("pq", "rq", "aq"):
            quantizer = getattr(obj, name, None)
            cp = getattr(quantizer, "cp", None)
            if cp is not None:
                cp.seed = seed


class FaissCodec(MemoryCodec):
    """A faiss standalone codec (``index_factory`` string) behind the MemoryCodec interface."""

    weights_file = "codec.faiss"

    def __init__(self, config: CodecConfig) -> None:
        if config.kind != "faiss":
            raise ValueError(f"FaissCodec needs kind='faiss', got {config.kind!r}")
        self.config = config
        self._device = torch.device("cpu")
        try:
            self.index = faiss.index_factory(config.dim, config.factory)
        except RuntimeError as e:
            raise ValueError(f"bad faiss factory string {config.factory!r}: {e}") from e
        _seed_everything(self.index, config.seed)
        self._width = int(self.index.sa_code_size())

    @property
    def code_width(self) -> int:
        return self._width

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_fitted(self) -> bool:
        return bool(self.index.is_trained)

    def to(self, device: torch.device | str) -> FaissCodec:
        self._device = torch.device(device)
        return self

    def fit(self, x: torch.Tensor) -> FaissCodec:
        """Train the faiss codec on 'n d' float32 vectors (faiss subsamples internally, seeded)."""
        xn = self._as_numpy(x)
        self.index = faiss.index_factory(self.config.dim, self.config.factory)
        _seed_everything(self.index, self.config.seed)
        self.index.train(xn)
        self._width = int(self.index.sa_code_size())
        return self

    def encode(self, x: torch.Tensor) -> np.ndarray:
        """'n d' -> 'n m' uint8 (m = sa_code_size)."""
        if not self.is_fitted:
            raise RuntimeError("codec is not fitted; call fit() or load_codec()")
        return self.index.sa_encode(self._as_numpy(x))

    def decode(self, codes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """'... m' uint8 -> '... d' float32 on self.device."""
        if not self.is_fitted:
            raise RuntimeError("codec is not fitted; call fit() or load_codec()")
        t = self._check_codes(codes)
        if bool(((t < 0) | (t > 255)).any()):
            raise ValueError("faiss codes are bytes: values must be in [0, 255]")
        flat = np.ascontiguousarray(t.reshape(-1, self.code_width).cpu().numpy().astype(np.uint8))
        out = torch.from_numpy(self.index.sa_decode(flat))  # 'N d'
        return out.reshape(*t.shape[:-1], self.config.dim).to(self._device)

    def _as_numpy(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        xn = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, torch.Tensor) else x
        xn = np.ascontiguousarray(xn, dtype=np.float32)
        if xn.ndim != 2 or xn.shape[1] != self.config.dim:
            raise ValueError(f"expected 'n {self.config.dim}' vectors, got shape {xn.shape}")
        return xn

    def _weights_bytes(self) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, self.weights_file)
            faiss.write_index(self.index, path)
            return Path(path).read_bytes()

    def _load_weights(self, path: Path) -> None:
        index = faiss.read_index(str(path))
        if index.d != self.config.dim:
            raise ValueError(f"index dim {index.d} != config.dim {self.config.dim}")
        if not index.is_trained:
            raise ValueError("saved faiss index is not trained")
        self.index = index
        self._width = int(index.sa_code_size())

"""Memory codecs: the common interface (`MemoryCodec`) and its file format (the codec header).

A codec compresses per-token memory vectors ('n d' float32, the output of the encoder's memory
layers) into a small integer code array ('n m', uint8 or uint16) that is stored on disk, and
decodes codes back into vectors with a cheap gather at query time.

Two kinds:

* ``vq``: a VQ-VAE in the MEMORY-VQ sense (:mod:`memvq.memory.codecs.vq`): a learned orthogonal rotation, then
  product (multi-head) vector quantisation with EMA codebooks, k-means init and dead-code reset,
  optionally residual (several levels of product codebooks).
* ``faiss``: the baseline, a faiss standalone codec built from a factory string such as
  ``OPQ48,PQ48x8`` (:mod:`memvq.memory.codecs.faiss_codec`).

On disk a codec is a directory holding ``codec.json`` (its ``memvq-codec`` header, see
:mod:`memvq.memory.artifact`: config, the weights file's size and sha256, code width, dtype and bytes per
token) and the weights file. Weights are written first and ``codec.json`` last, each through a
temporary file and ``os.replace``, so a directory with a readable ``codec.json`` is always complete.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from memvq.memory.artifact import ArtifactError, ArtifactFormat, atomic_write, write_artifact
from memvq.memory.codecs.config import CodecConfig

__all__ = ["CODEC_FILE", "CODEC_FORMAT", "CodecLoadError", "MemoryCodec", "compression_ratio"]

CODEC_FILE = "codec.json"
CODEC_FORMAT = ArtifactFormat("memvq-codec", 2, remake="rebuild the store with `memvq build-index`")


class CodecLoadError(ArtifactError):
    """A codec directory is missing, incomplete or corrupt."""


class MemoryCodec(ABC):
    """Compresses 'n d' float32 memory vectors into 'n m' integer codes and back."""

    config: CodecConfig

    @property
    @abstractmethod
    def code_width(self) -> int:
        """Number of integer codes per token (columns m of the code array)."""

    @property
    @abstractmethod
    def code_dtype(self) -> np.dtype:
        """uint8 when every codebook has <= 256 codes, else uint16."""

    @property
    def bytes_per_token(self) -> int:
        """Bytes actually stored per token vector: code_width * code_dtype.itemsize."""
        return self.code_width * self.code_dtype.itemsize

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where decode() puts its output."""

    @property
    @abstractmethod
    def is_fitted(self) -> bool: ...

    @abstractmethod
    def fit(self, x: torch.Tensor) -> MemoryCodec:
        """Train on 'n d' float32 real memory vectors; deterministic given x and config.seed."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> np.ndarray:
        """'n d' float32 -> 'n m' code_dtype; deterministic, no codebook update."""

    @abstractmethod
    def decode(self, codes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """'... m' integer codes -> '... d' float32 on self.device (a gather, run at query time)."""

    @abstractmethod
    def _weights_bytes(self) -> bytes:
        """Serialized trained state (the weights file)."""

    @abstractmethod
    def _load_weights(self, path: Path) -> None:
        """Restore the trained state from the weights file written by save()."""

    @abstractmethod
    def to(self, device: torch.device | str) -> MemoryCodec: ...

    weights_file: str = "weights.bin"

    def save(self, directory: Path) -> None:
        """Write weights then codec.json into `directory`, each atomically (tmp + os.replace)."""
        if not self.is_fitted:
            raise RuntimeError("cannot save an unfitted codec; call fit() first")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self._weights_bytes()
        atomic_write(directory / self.weights_file, lambda tmp: tmp.write_bytes(data))
        write_artifact(
            directory,
            CODEC_FILE,
            CODEC_FORMAT,
            self.config.model_dump(mode="json"),
            files={self.weights_file: directory / self.weights_file},
            extra={
                "kind": self.config.kind,
                "code_width": self.code_width,
                "code_dtype": self.code_dtype.name,
                "bytes_per_token": self.bytes_per_token,
            },
        )

    def _check_codes(self, codes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """'... m' integer array/tensor -> int64 tensor on self.device, validated."""
        t = torch.from_numpy(np.asarray(codes)) if isinstance(codes, np.ndarray) else codes
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"codes must be integers, got {t.dtype}")
        if t.ndim < 1 or t.shape[-1] != self.code_width:
            raise ValueError(f"codes must be '... {self.code_width}', got shape {tuple(t.shape)}")
        return t.to(device=self.device, dtype=torch.int64)


def compression_ratio(codec: MemoryCodec, dtype_bytes: int = 2) -> float:
    """Uncompressed bytes per token (dim * dtype_bytes; bf16 by default) over bytes_per_token."""
    return codec.config.dim * dtype_bytes / codec.bytes_per_token

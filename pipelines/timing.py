"""Milliseconds per named stage, for what the jobs and the query pipeline report (a build's seconds per step, a
query's milliseconds per stage). CUDA is synchronised around each stage, so that a stage is charged its own work."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the eval report names the stages without loading torch
    import torch

# The stages of answering a batch of questions (`RAGPipeline.answer`), in order; the answer also reports "total".
QUERY_STAGES = ("retrieve", "memory", "live", "rerank", "decode")


class Stopwatch:
    """Milliseconds per named stage, summed over the times a stage runs; `stages` start at 0."""

    def __init__(self, device: torch.device | None = None, stages: Sequence[str] = ()) -> None:
        self.device = device
        self.ms: dict[str, float] = dict.fromkeys(stages, 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0

    @property
    def seconds(self) -> dict[str, float]:
        return {name: ms / 1000.0 for name, ms in self.ms.items()}

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

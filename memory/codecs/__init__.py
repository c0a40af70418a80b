"""Memory codecs: a token vector <-> a few bytes of codes (MEMORY-VQ), one algorithm per module: `config`
(CodecConfig, what a manifest saves), `base` (the MemoryCodec interface and its files), `vq` (the VQ-VAE), `faiss_codec`
(the faiss baseline), `ema` and `finetune` (EMA codebooks; their fine-tuning with a reader), `factory` (a codec by
kind, and loading a saved one). The names below are imported on first
use, so that reading a config does not load the numerical libraries."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CODEC_FILE": "base",
    "CodecLoadError": "base",
    "MemoryCodec": "base",
    "compression_ratio": "base",
    "CodecConfig": "config",
    "Segment": "config",
    "preset": "config",
    "load_codec": "factory",
    "make_codec": "factory",
    "FaissCodec": "faiss_codec",
    "CodebookFinetuner": "finetune",
    "VQCodec": "vq",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from memvq.memory.codecs.base import CODEC_FILE as CODEC_FILE
    from memvq.memory.codecs.base import CodecLoadError as CodecLoadError
    from memvq.memory.codecs.base import MemoryCodec as MemoryCodec
    from memvq.memory.codecs.base import compression_ratio as compression_ratio
    from memvq.memory.codecs.config import CodecConfig as CodecConfig
    from memvq.memory.codecs.config import Segment as Segment
    from memvq.memory.codecs.config import preset as preset
    from memvq.memory.codecs.factory import load_codec as load_codec
    from memvq.memory.codecs.factory import make_codec as make_codec
    from memvq.memory.codecs.faiss_codec import FaissCodec as FaissCodec
    from memvq.memory.codecs.finetune import CodebookFinetuner as CodebookFinetuner
    from memvq.memory.codecs.vq import VQCodec as VQCodec


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

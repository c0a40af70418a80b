"""Memory codecs: a token vector <-> a few bytes of codes (MEMORY-VQ), one algorithm per module."""

from memory.codecs.base import (
    CODEC_FILE,
    CodecConfig,
    CodecLoadError,
    MemoryCodec,
    Segment,
    compression_ratio,
    preset,
)
from memory.codecs.factory import load_codec, make_codec
from memory.codecs.faiss_codec import FaissCodec
from memory.codecs.vq import CodebookFinetuner, VQCodec

__all__ = [
    "CODEC_FILE",
    "CodebookFinetuner",
    "CodecConfig",
    "CodecLoadError",
    "FaissCodec",
    "MemoryCodec",
    "Segment",
    "VQCodec",
    "compression_ratio",
    "load_codec",
    "make_codec",
    "preset",
]

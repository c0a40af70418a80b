"""Choosing a codec class by its config's kind, and loading a saved codec of any kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic
import torch

from memory.artifact import sha256_file
from memory.codecs.base import CODEC_FILE, FORMAT_VERSION, CodecConfig, CodecLoadError, MemoryCodec
from memory.codecs.faiss_codec import FaissCodec
from memory.codecs.vq import VQCodec

CODECS: dict[str, type[MemoryCodec]] = {"vq": VQCodec, "faiss": FaissCodec}


def make_codec(config: CodecConfig) -> MemoryCodec:
    """An unfitted codec of config.kind."""
    return CODECS[config.kind](config)


def load_codec(directory: Path, device: torch.device | str = "cpu") -> MemoryCodec:
    """Load a codec saved by MemoryCodec.save; CodecLoadError if missing, incomplete or corrupt."""
    directory = Path(directory)
    meta_path = directory / CODEC_FILE
    if not directory.is_dir():
        raise CodecLoadError(f"codec directory {directory} does not exist")
    if not meta_path.is_file():
        raise CodecLoadError(f"{meta_path} is missing: {directory} is not a (complete) saved codec")
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {meta.get('format_version')!r}")
        config = CodecConfig.model_validate(meta["config"])
        if meta.get("kind") != config.kind:
            raise ValueError(f"kind {meta.get('kind')!r} disagrees with config.kind {config.kind!r}")
        weights_name = str(meta["weights_file"])
        expected_sha = str(meta["weights_sha256"])
    except (ValueError, KeyError, TypeError, pydantic.ValidationError) as e:
        raise CodecLoadError(f"corrupt {meta_path}: {e}") from e
    weights = directory / weights_name
    if not weights.is_file():
        raise CodecLoadError(f"weights file {weights} is missing")
    if sha256_file(weights) != expected_sha:
        raise CodecLoadError(f"weights file {weights} is corrupt (sha256 mismatch with {CODEC_FILE})")
    codec = make_codec(config)
    if codec.weights_file != weights_name:
        raise CodecLoadError(f"{meta_path} names weights {weights_name!r}, expected {codec.weights_file!r}")
    try:
        codec._load_weights(weights)
    except Exception as e:
        raise CodecLoadError(f"cannot load weights {weights}: {e}") from e
    return codec.to(device)

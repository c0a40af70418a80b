"""Choosing a codec class by its config's kind, and loading a saved codec of any kind."""

from __future__ import annotations

from pathlib import Path

import pydantic
import torch

from memvq.memory.artifact import ArtifactError, read_artifact
from memvq.memory.codecs.base import CODEC_FILE, CODEC_FORMAT, CodecLoadError, MemoryCodec
from memvq.memory.codecs.config import CodecConfig
from memvq.memory.codecs.faiss_codec import FaissCodec
from memvq.memory.codecs.vq import VQCodec

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
        header = read_artifact(meta_path, CODEC_FORMAT, "codec header")
        header.verify(directory)
    except ArtifactError as e:
        raise CodecLoadError(str(e)) from e
    try:
        config = CodecConfig.model_validate(header.config)
        if header.extra.get("kind") != config.kind:
            raise ValueError(f"kind {header.extra.get('kind')!r} disagrees with config.kind {config.kind!r}")
    except (ValueError, pydantic.ValidationError) as e:
        raise CodecLoadError(f"corrupt {meta_path}: {e}") from e
    codec = make_codec(config)
    if set(header.files) != {codec.weights_file}:
        raise CodecLoadError(f"{meta_path} lists the files {sorted(header.files)}, expected {codec.weights_file!r}")
    weights = directory / codec.weights_file
    try:
        codec._load_weights(weights)
    except Exception as e:
        raise CodecLoadError(f"cannot load weights {weights}: {e}") from e
    return codec.to(device)

"""Typed configuration of the build job, read from TOML/JSON files and saved in every store's manifest."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from memory.codec import CodecConfig
from retrieval.index import IndexConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChunkingConfig(_Frozen):
    """How documents become passages."""

    words_per_passage: int = Field(100, ge=1)
    skip_title_paragraph: bool = True


class EncoderConfig(_Frozen):
    """Which backbone encodes the memory, and how it is split."""

    model: str | None = Field(None, description="local checkpoint path; None = the embedded all-MiniLM-L6-v2")
    alpha: float = Field(1 / 3, ge=0.0, le=1.0, description="fraction of layers that stay live")
    max_passage_tokens: int = Field(192, ge=8)
    batch_size: int = Field(64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class BuildConfig(_Frozen):
    """Everything that decides the bytes of a store (where the corpus and Ray live are run arguments)."""

    format: str | None = Field(None, description="corpus format; None = detected per file")
    chunking: ChunkingConfig = ChunkingConfig()
    encoder: EncoderConfig = EncoderConfig()
    codec: CodecConfig = CodecConfig()
    index: IndexConfig = IndexConfig()
    shard_size: int = Field(256, ge=1, description="passages per shard (one Ray task each)")
    codec_sample_passages: int = Field(1024, ge=1, description="passages encoded to train the codec")
    codec_train_vectors: int = Field(100_000, ge=256, description="token vectors the codec is fitted on")
    num_workers: int | None = Field(None, ge=1, description="encoder actors; None = one per GPU, else 1")
    seed: int = 0

    @classmethod
    def from_file(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> BuildConfig:
        """Read a TOML or JSON file (or nothing), then merge `overrides` (nested dicts; None values ignored)."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls.model_validate(_merge(data, overrides or {}))

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged[key] = _merge(merged.get(key, {}), value)
        elif value is not None:
            merged[key] = value
    return merged

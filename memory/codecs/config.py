"""The codec config saved in manifests (`CodecConfig`, its `Segment`s), the chosen 16x / 32x defaults and the named
presets: plain pydantic, importable without the codecs' numerical libraries."""

from __future__ import annotations

from typing import Any, Literal

import pydantic

__all__ = ["DEFAULT_16X", "DEFAULT_32X", "CodecConfig", "Segment", "preset"]


class Segment(pydantic.BaseModel):
    """`levels` residual product quantizers of `heads` heads over the next `dims` rotated dims."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    dims: int = pydantic.Field(gt=0)
    heads: int = pydantic.Field(gt=0)
    levels: int = pydantic.Field(1, gt=0)

    @pydantic.model_validator(mode="after")
    def _check(self) -> Segment:
        if self.dims % self.heads:
            raise ValueError(f"segment dims={self.dims} is not divisible by heads={self.heads}")
        return self

    @property
    def sub_dim(self) -> int:
        return self.dims // self.heads


class CodecConfig(pydantic.BaseModel):
    """Everything needed to rebuild a codec before training; frozen, saved in manifests as JSON.

    The defaults are the chosen 16x-vs-bf16 VQ codec (48 bytes per 384-d token); see
    :data:`DEFAULT_32X` for the 32x one and :func:`preset` for both.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    kind: Literal["vq", "faiss"] = "vq"
    dim: int = pydantic.Field(384, gt=0, description="memory vector width d")
    seed: int = 0

    # --- vq -------------------------------------------------------------------------------------
    segments: tuple[Segment, ...] = pydantic.Field(
        default=(),
        description="bit allocation over the leading rotated (PCA-ordered) dims, in order; "
        "rotated dims past the last segment are dropped. Default: one segment of all dims in "
        "sub-vectors of 8 (dim/8 heads: 16x vs bf16 with 256 codes)",
    )
    codebook_size: int = pydantic.Field(256, gt=1, le=65536, description="codes per codebook")
    rotation: Literal["none", "pca", "opq"] = pydantic.Field(
        "opq",
        description="none: identity; pca: PCA, eigen-directions balanced across heads; "
        "opq: start from opq_init, then alternating Lloyd / orthogonal-Procrustes rounds (OPQ-style)",
    )
    opq_init: Literal["pca", "random"] = pydantic.Field(
        "random",
        description="start of the opq rounds: the balanced PCA basis, or it times a random "
        "rotation within each segment (better for wide sub-vectors over all dims)",
    )
    rotation_iters: int = pydantic.Field(80, ge=0, description="Lloyd + Procrustes rounds (rotation=opq)")
    kmeans_iters: int = pydantic.Field(15, ge=0, description="Lloyd iterations of the codebook k-means init")
    epochs: int = pydantic.Field(1, ge=0, description="EMA epochs over the training sample, then frozen")
    decay: float = pydantic.Field(0.9, gt=0.0, lt=1.0, description="EMA decay of the codebooks")
    threshold_ema_dead_code: float = pydantic.Field(
        0.5, ge=0.0, description="codes whose EMA usage per batch falls below this are reset"
    )
    batch_size: int = pydantic.Field(8192, gt=0, description="EMA batch size")
    max_train_vectors: int = pydantic.Field(
        100_000, gt=0, description="fit() subsamples (seeded) to at most this many vectors"
    )

    # --- faiss ----------------------------------------------------------------------------------
    factory: str = pydantic.Field("OPQ48,PQ48x8", description="faiss.index_factory string")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _default_segments(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("segments"):
            dim = int(data.get("dim", 384))
            data = {**data, "segments": ({"dims": dim, "heads": dim // 8 if dim % 8 == 0 else 1},)}
        return data

    @pydantic.model_validator(mode="after")
    def _check(self) -> CodecConfig:
        if self.kind == "vq":
            if not self.segments:
                raise ValueError("kind='vq' needs at least one segment")
            if sum(seg.dims for seg in self.segments) > self.dim:
                raise ValueError(f"segments cover {sum(s.dims for s in self.segments)} dims > dim={self.dim}")
        if self.kind == "faiss" and not self.factory.strip():
            raise ValueError("kind='faiss' needs a non-empty factory string")
        return self

    @property
    def kept_dims(self) -> int:
        """Rotated dims that are quantized (the rest are dropped)."""
        return sum(seg.dims for seg in self.segments)

    @classmethod
    def uniform(cls, heads: int, levels: int = 1, dims: int | None = None, **kw: Any) -> CodecConfig:
        """A plain (residual) product VQ: one segment of `dims` (default: all) dims."""
        dim = int(kw.get("dim", 384))
        return cls(segments=(Segment(dims=dims or dim, heads=heads, levels=levels),), **kw)


# The chosen defaults (bench/bench_codec.py has the table that picked them). Both encode with
# faiss's 8-dim sub-vector SIMD kernel, well above the 100k tokens/s the build pipeline needs.
# 16x: 48 heads x 8 dims x 256 codes over all 384 dims, OPQ rotation from a random start, 80 rounds.
DEFAULT_16X = CodecConfig()
# 32x: 24 heads x 8 dims x 256 codes over the leading 192 rotated dims (the rest dropped).
DEFAULT_32X = CodecConfig(segments=(Segment(dims=192, heads=24),))


def preset(name: str) -> CodecConfig:
    """Named configs: ``vq16x``/``vq32x`` (the defaults), ``opq16x``/``opq32x`` (faiss baselines)."""
    table = {
        "vq16x": DEFAULT_16X,
        "vq32x": DEFAULT_32X,
        "opq16x": CodecConfig(kind="faiss", factory="OPQ48,PQ48x8"),
        "opq32x": CodecConfig(kind="faiss", factory="OPQ24,PQ24x8"),
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown codec preset {name!r}; known: {sorted(table)}") from None

"""Typed configuration of the jobs (build-index, train), read from TOML/JSON files and saved with what they make, and
of loading a query pipeline (`LoadOptions`)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from memvq.data.tasks import TaskConfig
from memvq.encoders.config import LUMEN_ALPHA, ReaderConfig
from memvq.encoders.hardware import PRECISION_HELP, Precision, Resolved, resolve_device, resolve_precision
from memvq.encoders.options import RetrievalMode
from memvq.memory.codecs.config import CodecConfig
from memvq.memory.index import IndexConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileConfig(_Frozen):
    """A job config: read from a TOML or JSON file with overrides, saved as JSON."""

    @classmethod
    def from_file(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> Self:
        """Read a TOML or JSON file (or nothing), then merge `overrides` (nested dicts; None values ignored)."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls.model_validate(_merge(data, overrides or {}))

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ChunkingConfig(_Frozen):
    """How documents become passages: at most `words_per_passage` words and `max_passage_chars` characters each,
    whatever the whitespace (a longer word, or text without spaces, is cut into pieces of `max_passage_chars`
    characters; see data.ingest.passages)."""

    words_per_passage: int = Field(100, ge=1)
    skip_title_paragraph: bool = True
    max_passage_chars: int | None = Field(
        None, ge=1, description="None = 20 per word of words_per_passage (2000 at 100 words)"
    )


class EncoderConfig(_Frozen):
    """Which backbone encodes the memory, and how it is split."""

    model: str | None = Field(None, description="local checkpoint path; None = the embedded all-MiniLM-L6-v2")
    alpha: float = Field(LUMEN_ALPHA, ge=0.0, le=1.0, description="fraction of layers that stay live")
    max_passage_tokens: int = Field(
        192, ge=8, description="tokens of a passage (title and text) the memory keeps; readers read up to this many"
    )
    batch_size: int = Field(64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = Field(
        "auto",
        description=f"{PRECISION_HELP}. The memory's bytes depend on it: a build records what auto resolved to "
        "and refuses to resume with another",
    )
    memory_from: str | None = Field(
        None,
        description="a reader trained with train_memory_layers: its memory layers make the memory (the dense "
        "index keeps the pretrained encoder, as the retriever does)",
    )

    @property
    def resolved_precision(self) -> Resolved:
        """The precision of a resolved config (`BuildConfig.resolved`)."""
        if self.precision == "auto":
            raise ValueError("the build config's precision is not resolved (BuildConfig.resolved)")
        return self.precision


# The default retrieval mode of a store whose record predates `BuildConfig.retrieval`'s "auto" (or the setting).
RETRIEVAL_BEFORE_THE_SETTING = "dense"


class BuildConfig(FileConfig):
    """Everything that decides the bytes of a store (where the corpus and Ray live are run arguments)."""

    format: str | None = Field(None, description="corpus format; None = detected per file")
    chunking: ChunkingConfig = ChunkingConfig()
    encoder: EncoderConfig = EncoderConfig()
    memory: bool = Field(
        True,
        description="keep the per-token memory (codes of the memory layers' output) that lumen and glimmer readers "
        "read; false: passages and the dense index only, what a fid reader (passage text) reads: no codec, no "
        "codes on disk",
    )
    codec: CodecConfig = CodecConfig()
    index: IndexConfig = IndexConfig()
    lexical: bool = Field(
        True, description="build a BM25 index of the passages beside the dense one (lexical and hybrid retrieval)"
    )
    retrieval: Literal["auto", RetrievalMode] = Field(
        "auto",
        description="the store's default retrieval mode (a query may ask for another: QueryOptions); auto: hybrid "
        "when the store keeps a BM25 index (lexical), else dense",
    )
    shard_size: int = Field(256, ge=1, description="passages per shard (one Ray task each)")
    codec_source: Literal["auto", "fit"] = Field(
        "auto",
        description="auto: the codec shipped for the embedded encoder's memory (encoders.embedded) when it fits "
        "this build (the embedded encoder at its default split, this `codec` config), saving the fit; else, and "
        "with fit, a codec fitted on this corpus (codec_sample_passages, codec_train_vectors). --codec-from wins",
    )
    codec_sample_passages: int = Field(1024, ge=1, description="passages encoded to train the codec")
    codec_train_vectors: int = Field(100_000, ge=256, description="token vectors the codec is fitted on")
    num_workers: int | None = Field(
        None, ge=1, description="encoder actors at most; None = as many as the Ray cluster's nodes hold"
    )
    cpus_per_actor: int = Field(
        1,
        ge=1,
        description="CPUs each encoder actor asks Ray for, and its torch threads: CPU nodes run one actor per "
        "cpus_per_actor CPUs, GPU nodes one per GPU; fixed, not taken from the node, because torch on CPU gives "
        "other bits with another thread count",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _memory_from_needs_memory(self) -> Self:
        if self.encoder.memory_from is not None and not self.memory:
            raise ValueError("encoder.memory_from makes the memory, but this build keeps none (memory = false)")
        return self

    def resolved(self) -> Self:
        """This config with its "auto" settings made concrete, as a store records them: `encoder.precision` for
        the device this machine encodes on (the store's bytes depend on it, so that a resume elsewhere or in
        another precision is refused) and `retrieval` (hybrid with the BM25 index, else dense)."""
        if self.retrieval in ("lexical", "hybrid") and not self.lexical:  # checked at build time: a store's
            # manifest of an older memvq, read again by update and compact, may hold both
            raise ValueError(f"retrieval = {self.retrieval!r} needs the BM25 index, but this build keeps none")
        precision = resolve_precision(self.encoder.precision, resolve_device(self.encoder.device))
        retrieval = self.retrieval if self.retrieval != "auto" else "hybrid" if self.lexical else "dense"
        encoder = self.encoder.model_copy(update={"precision": precision})
        return self.model_copy(update={"encoder": encoder, "retrieval": retrieval})


class OptimConfig(_Frozen):
    """The optimiser and the schedule."""

    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="questions per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0.0)
    head_lr: float | None = Field(
        None, gt=0.0, description="the answer head's (decoder with its new cross-attention, or span head); None = lr"
    )
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_steps: int = Field(50, ge=0)
    max_grad_norm: float = Field(1.0, gt=0.0)


class TrainConfig(FileConfig):
    """Everything that decides a trained reader (the store and the output directory are run arguments)."""

    reader: ReaderConfig = ReaderConfig()
    model: str | None = Field(None, description="backbone checkpoint; None = the embedded all-MiniLM-L6-v2")
    init_from: str | None = Field(
        None,
        description="a saved reader (READER_DIR) to start from: its backbone layers this reader trains and its "
        "answer head (and reranker) where both have one; the rest starts as usual. A FiD reader's upper layers "
        "can start a GLIMMER or LUMEN reader of the same backbone",
    )
    tasks: list[TaskConfig] = Field(min_length=1)
    optim: OptimConfig = OptimConfig()
    eval_every: int = Field(100, ge=1, description="steps between dev evaluations (and checkpoints)")
    max_minutes: float | None = Field(None, gt=0.0, description="stop (and save) after this wall-clock budget")
    precision: Precision = Field(
        "auto", description=f"{PRECISION_HELP}. A run records what auto resolved to and resumes only with it"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto (the GPU when there is one), cpu, cuda")
    seed: int = 0
    finetune_codec: bool = Field(
        False,
        description="MEMORY-VQ: the memory is recomputed from passage text by the memory layers and "
        "quantized by the store's VQ codebooks, which EMA updates train with the reader (straight-through); the "
        "codec is saved to OUT/codec, to rebuild the store with (build-index --codec-from)",
    )
    codec_decay: float = Field(0.99, gt=0.0, lt=1.0, description="EMA decay of the fine-tuned codebooks")

    @model_validator(mode="after")
    def _codec_needs_memory(self) -> Self:
        if self.finetune_codec and self.reader.mode == "fid":
            raise ValueError("finetune_codec needs a reader that reads memory; a fid reader reads passage text")
        return self


class LoadOptions(_Frozen):
    """How a pipeline is loaded: where it runs, in what precision, and whether the store is checked first."""

    device: str = Field("auto", description="auto (the GPU when there is one), cpu, cuda, cuda:N")
    precision: Precision = Field("auto", description=PRECISION_HELP)
    verify: bool = Field(
        True,
        description="check the store before reading it: its manifest, every file's sha256 (files unchanged since "
        "they were last verified are not hashed again) and its shard counts",
    )
    retrieval: RetrievalMode | None = Field(
        None,
        description="retrieval mode of the questions that name none: dense (FAISS), lexical (BM25) or hybrid (both, "
        "their scores fused); default: the store's (its build config's retrieval)",
    )


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged[key] = _merge(merged.get(key, {}), value)
        elif value is not None:
            merged[key] = value
    return merged

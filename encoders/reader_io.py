"""A saved reader on disk: writing and reading it, apart from the reader's model code (:mod:`encoders.reader`).

    READER_DIR/reader.json   its memvq-reader header (:mod:`memory.artifact`): the ReaderConfig, the backbone it
                             was trained on (type, depth, width, memory split, portable model path), the dtype, the
                             precision it was trained in, and the size and sha256 of reader.pt
    READER_DIR/reader.pt     the trained tensors (`Reader.trained_state`), keyed by part: live.*, memory.*
                             (`train_memory_layers`), reranker.*, decoder.*, copy.*

`Reader.save` and `Reader.load` go through `save_reader`, `read_reader`, `load_backbone` and `load_state`;
`load_memory_layers` takes only the fine-tuned memory layers of one (the encoder its store is built with);
`Reader.warm_start` takes what fits of one into a reader of another mode or alpha (training's `init_from`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from encoders.backbone import Backbone, BackboneInfo
from encoders.embedded import portable_model_path
from memory.artifact import ArtifactFormat, ArtifactHeader, atomic_write, read_artifact, write_artifact

logger = logging.getLogger(__name__)

READER_FILE = "reader.json"
WEIGHTS_FILE = "reader.pt"
READER_FORMAT = ArtifactFormat("memvq-reader", 2, remake="retrain it with `memvq train`")

_LAYER_KEY = re.compile(r"^encoder\.(?:layer|block)\.(\d+)\.")


def layer_index(key: str) -> int | None:
    """The encoder layer a backbone state_dict key belongs to (None: embeddings, final norm, ...)."""
    match = _LAYER_KEY.match(key)
    return None if match is None else int(match.group(1))


def save_reader(
    directory: str | Path,
    config: Mapping[str, Any],
    backbone: BackboneInfo,
    state: Mapping[str, torch.Tensor],
    fp16: bool = False,
    trained_precision: str | None = None,
) -> Path:
    """Write reader.pt (the trained tensors, fp16 if asked) then reader.json (`config`: the ReaderConfig as JSON,
    `backbone`: what it was trained on, `trained_precision`: fp32 or bf16, if known); returns `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Tied tensors (the BERT2BERT LM head and word embeddings) stay one tensor in the file.
    converted: dict[tuple[int, torch.Size, torch.dtype], torch.Tensor] = {}
    saved = {}
    for key, value in state.items():
        ident = (value.data_ptr(), value.shape, value.dtype)
        if ident not in converted:
            tensor = value.detach().to("cpu")
            converted[ident] = tensor.half() if fp16 and tensor.is_floating_point() else tensor
        saved[key] = converted[ident]
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: torch.save(saved, tmp))
    dtype = next((tensor.dtype for tensor in saved.values() if tensor.is_floating_point()), torch.float32)
    write_artifact(
        directory,
        READER_FILE,
        READER_FORMAT,
        config,
        files={WEIGHTS_FILE: directory / WEIGHTS_FILE},
        extra={
            "backbone": asdict(backbone) | {"model_path": portable_model_path(backbone.model_path)},
            "dtype": str(dtype).removeprefix("torch."),
            "trained_precision": trained_precision,
        },
    )
    logger.info("saved reader (%s, %d tensors) to %s", config.get("mode"), len(saved), directory)
    return directory


def read_reader(directory: str | Path) -> ArtifactHeader:
    """The header of the reader saved in `directory`, after checking reader.pt's size and sha256 against it;
    ArtifactError if it is not a reader this memvq reads or its weights are damaged."""
    directory = Path(directory)
    header = read_artifact(directory / READER_FILE, READER_FORMAT, "reader header")
    header.verify(directory)
    return header


def check_backbone(backbone: Backbone, header: ArtifactHeader) -> None:
    """Refuse a backbone of another type, depth, width or memory split than the one a saved reader was trained on."""
    info = header.extra["backbone"]
    for name in ("model_type", "num_layers", "hidden_size", "memory_layers"):
        if getattr(backbone.info, name) != info[name]:
            raise ValueError(
                f"backbone {backbone.info.model_path} has {name}={getattr(backbone.info, name)}, "
                f"the reader was trained on {info[name]}"
            )


def load_backbone(header: ArtifactHeader, path: str | Path | None = None) -> Backbone:
    """The backbone a saved reader was trained on, freshly loaded (its saved path, or `path`) with its memory split."""
    info = header.extra["backbone"]
    backbone = Backbone.from_pretrained(path or info["model_path"], memory_layers=info["memory_layers"])
    check_backbone(backbone, header)
    return backbone


def load_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The trained tensors of the reader saved in `directory` (on CPU, as saved)."""
    return torch.load(Path(directory) / WEIGHTS_FILE, map_location="cpu", weights_only=True)


def load_memory_layers(backbone: Backbone, directory: str | Path) -> Backbone:
    """Put the fine-tuned memory layers of a saved reader (`train_memory_layers`) into `backbone` (which must
    be the reader's: same checkpoint and split) and return it: the encoder a store for that reader is built with."""
    directory = Path(directory)
    header = read_reader(directory)
    if not header.config.get("train_memory_layers"):
        raise ValueError(
            f"the reader in {directory} kept the pretrained memory layers (train_memory_layers off): "
            "build its store without --memory-from"
        )
    check_backbone(backbone, header)
    state = load_state(directory)
    memory = {key.removeprefix("memory."): value for key, value in state.items() if key.startswith("memory.")}
    expected = {
        key
        for key in backbone.model.state_dict()
        if (layer := layer_index(key)) is not None and layer < backbone.memory_layers
    }
    if set(memory) != expected:
        raise ValueError(f"the memory layers in {directory} do not match the backbone's {backbone.memory_layers}")
    backbone.model.load_state_dict(memory, strict=False)
    return backbone

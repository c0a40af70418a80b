"""A saved reader on disk: writing and reading it, apart from the reader's model code (:mod:`memvq.encoders.reader`).

    READER_DIR/reader.json   its memvq-reader header (:mod:`memvq.memory.artifact`): the ReaderConfig, the backbone it
                             was trained on (type, depth, width, memory split, portable model path), the dtype, the
                             precision it was trained in, and the size and sha256 of reader.pt
    READER_DIR/reader.pt     the trained tensors (`Reader.trained_state`), keyed by part: live.*, memory.*
                             (`train_memory_layers`), reranker.*, and span.* (extract head) or decoder.*, copy.*

`save_reader` and `load_reader` write and read one (`read_reader`: its checked header); `load_trained_state` puts
trained tensors (a file's, or a training checkpoint's) into a reader; `load_memory_layers` takes only the
fine-tuned memory layers of one (the encoder its store is built with); `warm_start` takes what fits of one into a
reader of another mode or alpha (training's `init_from`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from memvq.encoders.backbone import Backbone, layer_index
from memvq.encoders.config import ReaderConfig
from memvq.encoders.embedded import portable_model_path
from memvq.encoders.reader import Reader
from memvq.memory.artifact import ArtifactFormat, ArtifactHeader, atomic_write, read_artifact, write_artifact

logger = logging.getLogger(__name__)

READER_FILE = "reader.json"
WEIGHTS_FILE = "reader.pt"
READER_FORMAT = ArtifactFormat("memvq-reader", 2, remake="retrain it with `memvq train`")


def save_reader(
    reader: Reader, directory: str | Path, fp16: bool = False, trained_precision: str | None = None
) -> Path:
    """Write reader.pt (the trained tensors, `Reader.trained_state`, fp16 if asked) then reader.json (the
    ReaderConfig, the backbone it was trained on, `trained_precision`: fp32 or bf16, if known); returns `directory`."""
    config, backbone, state = reader.config.model_dump(), reader.backbone.info, reader.trained_state()
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


def reader_weights_sha256(directory: str | Path) -> str:
    """The sha256 of a saved reader's weights, as its header records it (not hashed again)."""
    header = read_artifact(Path(directory) / READER_FILE, READER_FORMAT, "reader header")
    return header.files[WEIGHTS_FILE]["sha256"]


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


def load_reader(
    directory: str | Path, backbone_path: str | Path | None = None, device: str | torch.device = "cpu"
) -> Reader:
    """A saved reader on top of a freshly loaded backbone (its saved path, or `backbone_path`), in eval mode."""
    header = read_reader(directory)
    backbone = load_backbone(header, backbone_path).to(device)
    reader = Reader.from_backbone(backbone, ReaderConfig(**header.config))
    load_trained_state(reader, load_state(directory))
    return reader.eval()


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


def warm_start(reader: Reader, directory: str | Path) -> dict[str, int]:
    """Copy into `reader` the tensors of the reader saved in `directory` that `reader` trains: its backbone layers that
    are trained here (a FiD reader's layers start a GLIMMER reader's memory and live layers), and its span head,
    decoder, copy head or reranker where both readers have one. Both must share the backbone's type, depth and
    width (the memory split may differ). Returns the number of tensors copied per part; ValueError if none
    fits."""
    directory = Path(directory)
    info = read_reader(directory).extra["backbone"]
    for name in ("model_type", "num_layers", "hidden_size"):
        if getattr(reader.backbone.info, name) != info[name]:
            raise ValueError(
                f"init_from {directory}: its backbone has {name}={info[name]}, "
                f"this run's {getattr(reader.backbone.info, name)}"
            )
    own = reader.trained_state()
    copied: dict[str, int] = {}
    backbone: dict[str, torch.Tensor] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_state(directory).items():
        part, _, name = key.partition(".")
        if part in ("live", "memory"):
            target = reader.trained_part(name)
            if target is not None and f"{target}.{name}" in own:
                backbone[name] = value
                copied[target] = copied.get(target, 0) + 1
        elif key in own and own[key].shape == value.shape:
            heads.setdefault(part, {})[name] = value
            copied[part] = copied.get(part, 0) + 1
    if not copied:
        raise ValueError(f"init_from {directory}: none of its tensors fits this reader")
    reader.backbone.model.load_state_dict(backbone, strict=False)
    modules: dict[str, nn.Module | None] = {"span": reader.span_head, "reranker": reader.reranker}
    if reader.decoder is not None:
        modules |= {"decoder": reader.decoder.model, "copy": reader.decoder.copy_head}
    for part, tensors in heads.items():
        module = modules.get(part)
        if module is not None:
            module.load_state_dict(tensors, strict=False)
    logger.info("started from %s: %s", directory, ", ".join(f"{n} {p} tensors" for p, n in sorted(copied.items())))
    return copied


def load_trained_state(reader: Reader, state: dict[str, torch.Tensor]) -> None:
    """Load `Reader.trained_state` tensors (any float dtype) into a reader's live (and memory) layers, reranker, and
    decoder or span head."""
    parts: dict[str, dict[str, torch.Tensor]] = {
        p: {} for p in ("live", "memory", "reranker", "decoder", "copy", "span")
    }
    for key, value in state.items():
        part, _, name = key.partition(".")
        if part not in parts:
            raise ValueError(f"unexpected tensor {key!r} in a reader state")
        parts[part][name] = value
    if parts["memory"] and not reader.config.train_memory_layers:
        raise ValueError("memory layers were saved but the config has train_memory_layers off")
    missing, unexpected = reader.backbone.model.load_state_dict(parts["live"] | parts["memory"], strict=False)
    trained_missing = [key for key in missing if reader.trained_part(key) is not None]
    if trained_missing or unexpected:
        raise ValueError(f"backbone layers do not match: missing {trained_missing}, unexpected {unexpected}")
    if reader.reranker is not None:
        reader.reranker.load_state_dict(parts["reranker"])
    elif parts["reranker"]:
        raise ValueError(f"a reranker state was saved but mode {reader.config.mode!r} has no reranker")
    if reader.span_head is not None:
        if parts["decoder"] or parts["copy"]:
            raise ValueError("a decoder was saved but the config's head is extract")
        reader.span_head.load_state_dict(parts["span"])
        return
    if parts["span"]:
        raise ValueError("a span head was saved but the config's head is generate")
    assert reader.decoder is not None
    missing, unexpected = reader.decoder.model.load_state_dict(parts["decoder"], strict=False)
    frozen = set() if reader.config.train_decoder_embeddings else reader.decoder.embedding_keys()
    if set(missing) - frozen or unexpected:
        raise ValueError(f"decoder does not match: missing {sorted(set(missing) - frozen)}, unexpected {unexpected}")
    if reader.decoder.copy_head is not None:
        reader.decoder.copy_head.load_state_dict(parts["copy"])
    elif parts["copy"]:
        raise ValueError("a copy head was saved but the config has copy_answers off")

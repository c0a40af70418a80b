"""Whether a reader fits a store: the same backbone (type, depth, width), split where the store's memory was made,
and the memory layers that made it (`check_compatible`); and the split a reader to train on a store takes from it
(`split_for_store`). The query pipeline, training and the benchmarks all ask here."""

from __future__ import annotations

from memvq.encoders.config import ReaderConfig, live_fraction, memory_layer_count
from memvq.encoders.reader import Reader
from memvq.memory.store import MemoryStore


class IncompatibleModelError(ValueError):
    """The reader was trained on another backbone (or split) than the store's memory was built with."""


def check_compatible(store: MemoryStore, reader: Reader, stored_memory: bool = True) -> None:
    """Refuse a reader whose backbone differs from the store's (type, depth, width, memory split) and, when it
    reads the store's memory (`stored_memory`), whose memory layers are not the ones the memory was made with."""
    reads_memory = stored_memory and reader.config.mode != "fid"
    if reads_memory:  # first: a store without memory is no store for it, whatever its backbone
        _require_memory(store, reader.config.mode)
    stored = store.manifest["backbone"]
    info = reader.backbone.info
    if reader.config.mode == "fid":
        names = ("model_type", "hidden_size")  # fid reads passage text: the memory split does not matter
    else:
        names = ("model_type", "num_layers", "hidden_size", "memory_layers")
    wrong = {name: (stored[name], getattr(info, name)) for name in names if stored[name] != getattr(info, name)}
    if wrong:
        details = ", ".join(f"{name}: store {a} vs reader {b}" for name, (a, b) in wrong.items())
        raise IncompatibleModelError(f"the reader does not fit the store's memory ({details})")
    if not reads_memory:
        return
    built_with, reads_with = stored.get("memory_digest"), reader.memory_digest()
    if built_with == reads_with:
        return
    if built_with is None:
        raise IncompatibleModelError(
            "the reader fine-tuned its memory layers (train_memory_layers) but the store's memory was made by the "
            "pretrained ones: build a store for it with `memvq build-index --memory-from READER_DIR`"
        )
    raise IncompatibleModelError(
        f"the store's memory was made by fine-tuned memory layers (sha256 {built_with[:12]}) that the reader does "
        "not have: use the reader the store was built for (build-index --memory-from), or rebuild the store"
    )


def split_for_store(reader: ReaderConfig, store: MemoryStore) -> tuple[ReaderConfig, int]:
    """The reader config and backbone memory layer count to train on `store`. lumen, glimmer and memory read the
    memory the store's lower layers made, so the split is the store's (`backbone.memory_layers` of its manifest):
    an unset alpha takes it, an explicit one must give the same; fid (every layer live) has no memory layers."""
    if reader.mode == "fid":
        return reader, 0
    _require_memory(store, reader.mode)
    info = store.manifest["backbone"]
    layers, stored = info["num_layers"], info["memory_layers"]
    if reader.alpha is None and reader.mode != "memory":
        reader = ReaderConfig.model_validate(reader.model_dump() | {"alpha": live_fraction(layers, stored)})
    needed = memory_layer_count(layers, reader.live_fraction)
    if needed != stored:
        raise IncompatibleModelError(
            f"the store {store.layout.root} holds memory made by {stored} memory layers of {layers}, but a "
            f"{reader.mode} reader with alpha={reader.live_fraction:.4g} reads memory made by {needed}: build a "
            f"store with that alpha (build-index, encoder.alpha = {reader.live_fraction:.4g}) and train on it"
        )
    return reader, stored


def _require_memory(store: MemoryStore, mode: str) -> None:
    """Refuse a store built without memory to a reader of memory."""
    if not store.has_memory:
        raise IncompatibleModelError(
            f"the store {store.layout.root} was built without memory (memory = false): it serves fid readers, "
            f"which read passage text; a {mode} reader reads memory: build a store with memory for it "
            "(build-index --memory)"
        )

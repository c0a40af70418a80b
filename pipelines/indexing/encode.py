"""The encoding of passages, shared by the codec sample and the shard encoder: the build's encoders, passages in
length-sorted batches through the memory layers (per-token memory) and on through the top layers (the dense
embedding), and one planned shard encoded into the store's files (codes and offsets with memory, embeddings, done
marker)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from memvq.encoders.backbone import Backbone
from memvq.encoders.hardware import autocast
from memvq.encoders.reader_io import load_memory_layers
from memvq.memory.artifact import file_record, save_npy, write_json
from memvq.memory.codecs import MemoryCodec
from memvq.memory.store import StoreLayout, shard_suffixes
from memvq.pipelines.config import BuildConfig


@dataclass
class Encoders:
    """The build's encoders: `index` embeds passages for the dense index (the pretrained backbone, which the
    retriever embeds questions with), `memory` makes the memory: the same backbone, or a copy with a reader's
    fine-tuned memory layers (`encoder.memory_from`)."""

    index: Backbone
    memory: Backbone

    @classmethod
    def load(cls, config: BuildConfig, device: torch.device) -> Encoders:
        def pretrained() -> Backbone:
            return Backbone.from_pretrained(config.encoder.model, alpha=config.encoder.alpha)

        index = pretrained().to(device)
        if config.encoder.memory_from is None:
            return cls(index, index)
        return cls(index, load_memory_layers(pretrained(), config.encoder.memory_from).to(device))

    @property
    def memory_digest(self) -> str | None:
        """What the store's manifest records of fine-tuned memory layers (None: the pretrained ones)."""
        return None if self.memory is self.index else self.memory.memory_digest()


def length_sorted_batches(titles: list[str], texts: list[str], batch_size: int) -> list[list[int]]:
    """Passage indices in batches of similar length (little padding); deterministic, so re-encoding gives the same
    bytes."""
    lengths = [len(title) + len(text) for title, text in zip(titles, texts, strict=True)]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def encode_passages(
    encoders: Encoders, titles: list[str], texts: list[str], config: BuildConfig
) -> Iterator[tuple[list[int], list[torch.Tensor], torch.Tensor]]:
    """Yield (passage indices, memory 'l d' per passage, embeddings 'b d') in `length_sorted_batches`, computed in
    the config's precision (resolved: `BuildConfig.resolved`)."""
    backbone = encoders.index
    precision = config.encoder.resolved_precision
    for chosen in length_sorted_batches(titles, texts, config.encoder.batch_size):
        batch = backbone.tokenize_passages(
            [titles[i] for i in chosen], [texts[i] for i in chosen], config.encoder.max_passage_tokens
        )
        batch = batch.to(backbone.device)
        args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        with torch.inference_mode(), autocast(backbone.device, precision):
            memory, embedding = backbone.encode_with_embedding(*args)
            if encoders.memory is not backbone:
                memory = encoders.memory.encode_memory(*args)
        lengths_b = batch["attention_mask"].sum(dim=1).tolist()
        memory = memory.float()
        yield chosen, [memory[i, :n] for i, n in enumerate(lengths_b)], embedding.float()


def encode_shard(
    layout: StoreLayout, shard: int, encoders: Encoders, codec: MemoryCodec | None, config: BuildConfig
) -> int:
    """Encode one planned shard into embeddings and, with a `codec` (a store with memory), codes and offsets;
    write them, then the done marker (first removing the temporary files of a writer of this shard that was
    killed). Returns its token count."""
    for stale in layout.shards_dir.glob(f".shard-{shard:05d}.*.tmp-*"):
        stale.unlink(missing_ok=True)
    table = pq.read_table(layout.shard_file(shard, "passages.parquet"), columns=["title", "text"])
    titles, texts = table.column("title").to_pylist(), table.column("text").to_pylist()
    codes: list[np.ndarray | None] = [None] * len(texts)
    lengths = np.zeros(len(texts), dtype=np.int64)
    embeddings = np.zeros((len(texts), encoders.index.hidden_size), dtype=np.float16)
    for chosen, memories, embedding in encode_passages(encoders, titles, texts, config):
        lengths[chosen] = [len(memory) for memory in memories]
        embeddings[chosen] = embedding.cpu().numpy().astype(np.float16)
        if codec is None:
            continue
        batch_codes = codec.encode(torch.cat(memories))
        bounds = np.cumsum([0] + [len(memory) for memory in memories])
        for j, i in enumerate(chosen):
            codes[i] = batch_codes[bounds[j] : bounds[j + 1]]
    arrays: dict[str, np.ndarray] = {"emb.npy": embeddings}
    if codec is not None:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays |= {"codes.npy": np.concatenate(codes), "offsets.npy": offsets}
    for suffix, array in arrays.items():
        save_npy(layout.shard_file(shard, suffix), array)
    files = {
        layout.relative(layout.shard_file(shard, s)): file_record(layout.shard_file(shard, s))
        for s in shard_suffixes(codec is not None)
    }
    tokens = int(lengths.sum())
    write_json(layout.shard_done(shard), {"passages": len(texts), "tokens": tokens, "files": files})
    return tokens

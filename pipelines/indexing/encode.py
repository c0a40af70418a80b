"""The encoding of passages, shared by the codec sample and the shard encoder: the build's encoders, passages in
batches of one padded length through the memory layers (per-token memory) and on through the top layers (the dense
embedding), and one planned shard encoded into the store's files (codes and offsets with memory, embeddings, done
marker)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import BatchEncoding

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


# A passage is padded to its own token count rounded up to this, and batched only with passages padded alike: its
# bytes then do not depend on its batch-mates (measured: other padding changes a few memory values by up to 0.02 in
# bf16), so a passage encoded by an update equals the same passage encoded by a rebuild.
PAD_MULTIPLE = 16


def padded_batches(
    backbone: Backbone, titles: list[str], texts: list[str], config: BuildConfig
) -> Iterator[tuple[list[int], BatchEncoding]]:
    """(passage indices, tokens) in batches of one padded length (the passage's token count rounded up to
    `PAD_MULTIPLE`), shortest first, at most `encoder.batch_size` each; deterministic, so re-encoding gives the same
    bytes."""
    tokens = backbone.tokenize_passages(titles, texts, config.encoder.max_passage_tokens)
    lengths = tokens["attention_mask"].sum(dim=1).tolist()
    padded = [-(-length // PAD_MULTIPLE) * PAD_MULTIPLE for length in lengths]
    order = sorted(range(len(texts)), key=lambda i: (padded[i], i))
    size = config.encoder.batch_size
    for _, group in itertools.groupby(order, key=lambda i: padded[i]):
        members = list(group)
        for start in range(0, len(members), size):
            chosen = members[start : start + size]
            width = padded[chosen[0]]
            yield chosen, BatchEncoding({name: value[chosen, :width] for name, value in tokens.items()})


def encode_passages(
    encoders: Encoders, titles: list[str], texts: list[str], config: BuildConfig
) -> Iterator[tuple[list[int], list[torch.Tensor], torch.Tensor]]:
    """Yield (passage indices, memory 'l d' per passage, embeddings 'b d') in `padded_batches`, computed in the
    config's precision (resolved: `BuildConfig.resolved`)."""
    backbone = encoders.index
    precision = config.encoder.resolved_precision
    for chosen, batch in padded_batches(backbone, titles, texts, config):
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
    return save_shard(layout, shard, arrays, len(texts), int(lengths.sum()))


def save_shard(layout: StoreLayout, shard: int, arrays: dict[str, np.ndarray], passages: int, tokens: int) -> int:
    """Write a shard's arrays (emb.npy, and codes.npy and offsets.npy with memory; its passages.parquet is written
    already), then its done marker with their records and counts; returns `tokens`."""
    for suffix, array in arrays.items():
        save_npy(layout.shard_file(shard, suffix), array)
    files = {
        layout.relative(layout.shard_file(shard, s)): file_record(layout.shard_file(shard, s))
        for s in shard_suffixes("codes.npy" in arrays)
    }
    write_json(layout.shard_done(shard), {"passages": passages, "tokens": tokens, "files": files})
    return tokens

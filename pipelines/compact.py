"""The compaction job: rewrite a store without the rows its updates deleted, as a new generation.

`compact_store` copies the searchable rows, in row order, into new shards (passages, codes, offsets and embeddings
as they are: nothing is encoded again), builds a new index over them (trained again for the index types that
train), publishes the generation like an update (`pipelines.generations`) and then, `grace_s` later (servers
reading the store switch to the new generation within their watch interval and finish the batches they started on
the old one), removes every file the new generation does not name: that is the space won back. Resumable like an
update: a shard is written with its done marker, the index with its header, the manifest last.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel
from transformers import AutoTokenizer

from memvq.encoders.backbone import tokenize_passage_pairs
from memvq.encoders.embedded import resolve_model_path
from memvq.memory.artifact import atomic_write, read_json, write_artifact
from memvq.memory.store import STORE_FORMAT, MemoryStore, StoreLayout
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.generations import (
    Pending,
    begin,
    generation_fields,
    local_store,
    pending_indexes,
    prune,
    publish,
    store_bytes,
    writer_lock,
)
from memvq.pipelines.indexing.encode import save_shard
from memvq.pipelines.indexing.finalize import build_lexical_index, build_passage_index, shard_entries
from memvq.pipelines.indexing.kept import check_kept_shards
from memvq.pipelines.timing import Stopwatch
from memvq.pipelines.update import check_generation

log = logging.getLogger(__name__)

# Seconds between publishing the compacted generation and removing the old files: three times `memvq serve`'s
# default watch interval (5 s), so that a server has moved to the new generation before its files go.
PRUNE_GRACE_S = 15.0
HASH_SECONDS_PER_GB = 2.0  # and twice the time a first open takes to hash the new generation's files (1 s per GB)


class CompactReport(BaseModel):
    """What a compaction did, printed at the end and saved in its generation's manifest."""

    generation: int
    passages: int
    rows_dropped: int
    shards: int
    bytes_before: int  # the files the previous generation named
    bytes_after: int
    bytes_freed: int  # removed from disk (files of the older generations included)
    seconds: dict[str, float]


def compact_store(store: str | Path, grace_s: float = PRUNE_GRACE_S) -> CompactReport | None:
    """Rewrite `store` without its deleted rows as its next generation; None when it has none to drop. The old
    files are removed `grace_s` seconds (plus 2 s per GB of the new generation, the time a server takes to verify
    it) after the new generation is published."""
    layout = StoreLayout(local_store(store))
    MemoryStore.open(layout.root)  # a store, verified, before anything is locked or written
    with writer_lock(layout, "compact"):
        parent = MemoryStore.open(layout.root)
        if not len(parent.deleted_rows()):
            made_by = (parent.manifest.get("job") or {}).get("kind")
            if made_by == "compact":  # finish a compaction killed before it pruned
                prune(layout, [parent.manifest])
            log.info("%s has no deleted rows: nothing to compact", layout.root)
            return None
        if parent.num_passages == 0:
            raise ValueError(f"every passage of {layout.root} is deleted: build a new store instead of compacting")
        config = BuildConfig.model_validate(parent.manifest["config"])
        pending = begin(layout, parent, {"kind": "compact"})
        clock = Stopwatch()
        live = np.setdiff1d(np.arange(parent.num_rows, dtype=np.int64), parent.deleted_rows())
        groups = np.array_split(live, max(1, -(-len(live) // config.shard_size)))
        shards = {pending.first_shard + i: len(rows) for i, rows in enumerate(groups)}
        with clock.stage("copy"):
            kept = check_kept_shards(layout, shards, parent.has_memory)
            for (shard, _), rows in zip(shards.items(), groups, strict=True):
                if shard not in kept:
                    _copy_rows(parent, rows, shard)
        with clock.stage("index"):
            build_passage_index(layout, config, shards, parent.index.dim, pending.index_dir)
        if parent.lexical_dir is not None:
            with clock.stage("lexical"):
                build_lexical_index(layout, shards, pending.lexical_dir)
        with clock.stage("publish"):
            manifest = _write_manifest(pending, shards, clock.seconds)
            check_generation(pending)
            publish(pending, manifest)
        # a server verifies the new generation's files (about 1 s per GB) before it moves to it
        time.sleep(grace_s + store_bytes(manifest["files"]) / 1e9 * HASH_SECONDS_PER_GB)
        with clock.stage("prune"):
            freed = prune(layout, [manifest])
        report = CompactReport.model_validate({**manifest["compact"], "bytes_freed": freed, "seconds": clock.seconds})
        log.info("compacted %s: %d rows dropped, %d bytes freed", layout.root, report.rows_dropped, freed)
        return report


def _copy_rows(store: MemoryStore, rows: np.ndarray, shard: int) -> None:
    """Write the store's `rows` (sorted) as the new shard `shard`: passages, embeddings and memory as they are."""
    layout = store.layout
    tables, embeddings, codes, lengths = [], [], [], []
    for source, start, size in store.shard_rows():
        local = rows[(rows >= start) & (rows < start + size)] - start
        if not len(local):
            continue
        table = pq.read_table(layout.shard_file(source, "passages.parquet"), memory_map=True)
        tables.append(table.take(pa.array(local)))
        embeddings.append(np.asarray(store.embeddings(source)[local]))
        if store.has_memory:
            shard_codes = np.load(layout.shard_file(source, "codes.npy"), mmap_mode="r")
            offsets = np.load(layout.shard_file(source, "offsets.npy"), mmap_mode="r")
            codes.extend(np.asarray(shard_codes[offsets[i] : offsets[i + 1]]) for i in local.tolist())
            lengths.extend(int(offsets[i + 1] - offsets[i]) for i in local.tolist())
    table = pa.concat_tables(tables)
    atomic_write(
        layout.shard_file(shard, "passages.parquet"), lambda tmp: pq.write_table(table, tmp, compression="zstd")
    )
    arrays = {"emb.npy": np.concatenate(embeddings)}
    if store.has_memory:
        arrays |= {
            "codes.npy": np.concatenate(codes),
            "offsets.npy": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        }
    save_shard(layout, shard, arrays, len(rows), _tokens(store, table, lengths))


def _tokens(store: MemoryStore, table: pa.Table, lengths: list[int]) -> int:
    """The tokens of the passages of `table`: their memory's length, or for a store without memory (which records no
    per-passage count) their count by the store's tokenizer, as the build counted them."""
    if store.has_memory:
        return int(sum(lengths))
    config = BuildConfig.model_validate(store.manifest["config"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.encoder.model))
    titles, texts = table.column("title").to_pylist(), table.column("text").to_pylist()
    tokens = tokenize_passage_pairs(tokenizer, titles, texts, config.encoder.max_passage_tokens)
    return sum(sum(mask) for mask in tokens["attention_mask"])


def _write_manifest(pending: Pending, shards: dict[int, int], seconds: dict[str, float]) -> dict:
    """The compacted generation's manifest: the new shards from row 0, the new indexes, the parent's codec."""
    layout, parent = pending.layout, pending.parent.manifest
    markers = {shard: read_json(layout.shard_done(shard), "shard marker") for shard in shards}
    entries, shard_files, row = shard_entries(markers)
    indexes, index_fields = pending_indexes(pending)
    codec = {name: record for name, record in parent["files"].items() if name.startswith("codec/")}
    files = codec | shard_files | indexes
    report = CompactReport(
        generation=pending.generation,
        passages=row,
        rows_dropped=int(parent["num_rows"]) - row,
        shards=len(entries),
        bytes_before=store_bytes(parent["files"]),
        bytes_after=store_bytes(files),
        bytes_freed=0,
        seconds=dict(seconds),
    )
    extra = (
        generation_fields(pending)
        | index_fields
        | {
            "num_rows": row,
            "num_passages": row,
            "num_tokens": sum(entry["tokens"] for entry in entries),
            "shards": entries,
            "deleted": None,
            "compact": report.model_dump(),
        }
    )
    return write_artifact(pending.dir, "manifest.json", STORE_FORMAT, parent["config"], files, extra).to_json()

"""Step 4 of a build, finalize: the FAISS passage index from the shards' embeddings (streamed shard by shard), the
build report, and the manifest, written last: it names every file of the store with its sha256."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel

from memvq.memory.artifact import MANIFEST_NAME, FileRecord, file_record, write_artifact
from memvq.memory.codecs import MemoryCodec, compression_ratio
from memvq.memory.index import PassageIndex, training_rows
from memvq.memory.location import RemoteStore
from memvq.memory.store import STORE_FORMAT, StoreLayout
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.indexing.plan import Plan
from memvq.retrieval.lexical import HEADER as LEXICAL_HEADER
from memvq.retrieval.lexical import LexicalIndex


class BuildReport(BaseModel):
    """What a build did, printed at the end and saved in the manifest."""

    documents: int
    passages: int
    tokens: int
    bad_records: int
    duplicate_ids: int  # of the bad records: documents whose id an earlier one had (the first is kept)
    split_words: int  # words longer than chunking's character limit, cut into pieces
    shards: int
    bytes_per_token: int  # 0 without memory
    compression_vs_bf16: float | None  # None without memory
    codes_bytes: int
    seconds: dict[str, float]
    passages_per_second: float
    encode_passages_per_second: float
    encode_busy_passages_per_second: float | None


@dataclass(frozen=True)
class Built:
    """What the manifest records of a build besides its files: the config, the plan, the corpus record, the
    backbone, and the codec with where it came from (None: a store without memory)."""

    config: BuildConfig
    plan: Plan
    corpus: dict[str, Any]
    backbone: dict[str, Any]
    codec: MemoryCodec | None
    codec_source: str | None


@contextlib.contextmanager
def _shard_file(layout: StoreLayout, remote: RemoteStore | None, shard: int, suffix: str) -> Iterator[Path]:
    """The path of a shard's file: in the store, or downloaded from `remote` into staging (removed after)."""
    path = layout.shard_file(shard, suffix)
    if remote is None:
        yield path
        return
    try:
        yield remote.download(layout.relative(path), path)
    finally:
        path.unlink(missing_ok=True)


def build_passage_index(
    layout: StoreLayout,
    config: BuildConfig,
    shard_sizes: Mapping[int, int],
    dim: int,
    out: Path,
    remote: RemoteStore | None = None,
) -> PassageIndex:
    """FAISS index over the embeddings of the shards `shard_sizes` (shard -> passages, in row order from row 0), of
    the config's type (auto: by the number of passages, `IndexConfig.resolved`), streamed shard by shard, saved in
    `out`: memory is one shard's embeddings, the training sample (at most
    `config.index.train_size` rows) and the index itself, never the whole corpus. With `remote` (a store at a URI),
    each shard's embeddings are downloaded into staging one at a time."""
    shards = list(shard_sizes.items())
    starts = np.concatenate([[0], np.cumsum([size for _, size in shards])]).astype(np.int64)
    index_config = config.index.resolved(int(starts[-1]), dim)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for (shard, _), start in zip(shards, starts, strict=False):
            with _shard_file(layout, remote, shard, "emb.npy") as path:
                emb = np.load(path).astype(np.float32)
            yield np.arange(start, start + len(emb), dtype=np.int64), emb

    sample = None
    if index_config.factory != "Flat":
        # only the training rows are read (through memory maps), straight into one preallocated array
        rows = training_rows(int(starts[-1]), index_config)
        sample = np.empty((len(rows), dim), dtype=np.float32)
        for (shard, size), start in zip(shards, starts, strict=False):
            lo, hi = np.searchsorted(rows, [start, start + size])
            if hi > lo:
                with _shard_file(layout, remote, shard, "emb.npy") as path:
                    sample[lo:hi] = np.load(path, mmap_mode="r")[rows[lo:hi] - start]
    index = PassageIndex.build(batches(), dim=dim, config=index_config, train_sample=sample)
    index.save(out)
    return index


def build_lexical_index(
    layout: StoreLayout,
    shard_sizes: Mapping[int, int],
    out: Path,
    remote: RemoteStore | None = None,
    deleted: np.ndarray | None = None,
) -> None:
    """The BM25 index of the shards' passages (title and text; the shards in row order) in `out`, without the
    `deleted` rows; kept when its header is there (a resumed build; at `remote`, its files are fetched instead of
    the passages). With `remote`, each shard's passages are downloaded into staging one at a time."""
    if LexicalIndex.complete(out):
        return
    if remote is not None and remote.exists(layout.relative(out / LEXICAL_HEADER)):
        for name in sorted(remote.files(layout.relative(out)), key=lambda name: name.endswith(LEXICAL_HEADER)):
            remote.download(name, layout.root / name)  # the manifest hashes them; the header last
        if LexicalIndex.complete(out):
            return
    gone = set() if deleted is None else set(np.asarray(deleted).tolist())

    def passages() -> Iterator[tuple[int, str, str]]:
        row = 0
        for shard in shard_sizes:
            with _shard_file(layout, remote, shard, "passages.parquet") as path:
                table = pq.read_table(path, columns=["title", "text"])
            for title, text in zip(table.column("title").to_pylist(), table.column("text").to_pylist(), strict=True):
                if row not in gone:
                    yield row, title, text
                row += 1

    LexicalIndex.build(passages(), out)


def build_report(
    plan: Plan,
    markers: list[dict[str, Any]],
    codec: MemoryCodec | None,
    seconds: dict[str, float],
    busy: float | None,
) -> BuildReport:
    """The report of a build from its plan, the shards' done markers and the seconds per step; `busy`: the actors'
    encoding seconds when this run encoded every shard (else None: a resumed build's rate would mislead)."""
    tokens = sum(marker["tokens"] for marker in markers)
    total = sum(seconds.values())
    bytes_per_token = 0 if codec is None else codec.bytes_per_token
    return BuildReport(
        documents=plan.documents,
        passages=plan.passages,
        tokens=tokens,
        bad_records=plan.bad_records,
        duplicate_ids=plan.duplicate_ids,
        split_words=plan.split_words,
        shards=len(plan.shard_sizes),
        bytes_per_token=bytes_per_token,
        compression_vs_bf16=None if codec is None else compression_ratio(codec),
        codes_bytes=tokens * bytes_per_token,
        seconds={key: round(value, 3) for key, value in (seconds | {"total": total}).items()},
        passages_per_second=plan.passages / total,
        encode_passages_per_second=plan.passages / max(seconds["encode"], 1e-9),
        encode_busy_passages_per_second=plan.passages / busy if busy else None,
    )


def shard_entries(
    markers: Mapping[int, dict[str, Any]], row: int = 0
) -> tuple[list[dict[str, Any]], dict[str, FileRecord], int]:
    """The manifest's entries of shards (shard -> its done marker, in row order, the first at `row`), the records of
    their files (as their encoder hashed them) and the row after the last."""
    entries, files = [], {}
    for shard, done in markers.items():
        entries.append({"shard": shard, "row_start": row, "passages": done["passages"], "tokens": done["tokens"]})
        files.update(done["files"])
        row += done["passages"]
    return entries, files, row


def directory_files(layout: StoreLayout, directories: Iterable[Path | None]) -> dict[str, FileRecord]:
    """The records (size, sha256) of the files of `directories` (None: none) by their name in the store, hidden
    ones (temporaries) left out."""
    paths = [path for directory in directories if directory is not None for path in directory.iterdir()]
    return {
        layout.relative(path): file_record(path)
        for path in sorted(paths)
        if path.is_file() and not path.name.startswith(".")
    }


def write_manifest(
    layout: StoreLayout, built: Built, markers: list[dict[str, Any]], report: BuildReport
) -> dict[str, Any]:
    """The store manifest (its memvq-store header), from what was built, the shards' done markers (in shard order,
    with the records of the shard files their encoder hashed) and the build report."""
    plan, codec = built.plan, built.codec
    shards, files, _ = shard_entries(dict(enumerate(markers)))
    codec_dir = layout.codec_dir if codec is not None else None
    files |= directory_files(
        layout, [codec_dir, layout.index_dir, layout.lexical_dir if built.config.lexical else None]
    )
    header = write_artifact(
        layout.root,
        MANIFEST_NAME,
        STORE_FORMAT,
        built.config.to_json(),
        files=files,
        extra={
            "backbone": built.backbone,
            "codec": None
            if codec is None
            else {
                "config": codec.config.model_dump(mode="json"),
                "code_width": codec.code_width,
                "code_dtype": np.dtype(codec.code_dtype).name,
                "bytes_per_token": codec.bytes_per_token,
                "source": built.codec_source,
            },
            "corpus": built.corpus,
            "num_documents": plan.documents,
            "num_passages": plan.passages,
            "num_rows": plan.passages,
            "num_tokens": report.tokens,
            "shards": shards,
            "index": layout.relative(layout.index_dir),
            "lexical": layout.relative(layout.lexical_dir) if built.config.lexical else None,
            "deleted": None,
            "generation": 0,
            "parent": None,
            "report": report.model_dump(),
        },
    )
    return header.to_json()

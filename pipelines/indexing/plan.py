"""Step 1 of a build, plan: record the corpus (path, size and sha256 of each file), stream it once, cut it into
passages (at most `chunking.words_per_passage` words and `max_passage_chars` characters each) and write them as
parquet shards (bad records and duplicate document ids reported and skipped). A resume refuses another corpus."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from memvq.data.ingest.corpus import corpus_files, iter_documents
from memvq.data.ingest.passages import ChunkReport, Passage, iter_passages
from memvq.data.ingest.sources import Document, IngestReport
from memvq.memory.artifact import ManifestError, atomic_write, file_record, read_json, write_json
from memvq.memory.store import StoreLayout
from memvq.pipelines.config import BuildConfig

log = logging.getLogger(__name__)

# The passage shards' columns: the fields of a Passage, in order (strings, and int32 paragraph ids and offsets).
PASSAGE_SCHEMA = pa.schema(
    [(f.name, pa.string() if f.type == "str" else pa.int32()) for f in dataclasses.fields(Passage)]
)


@dataclass(frozen=True)
class Plan:
    """What the plan step found: documents, passages, bad records, and the passages of each shard."""

    documents: int
    passages: int
    bad_records: int
    duplicate_ids: int
    split_words: int
    shard_sizes: list[int]

    @property
    def row_starts(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(int).tolist()


def plan_passages(corpus: Path, layout: StoreLayout, config: BuildConfig) -> Plan:
    """Stream the corpus into passage shards; skip if an earlier run finished this step."""
    if layout.plan.is_file():
        saved = read_json(layout.plan, "plan marker")
        return Plan(**{field.name: saved[field.name] for field in dataclasses.fields(Plan)})
    report, chunking = IngestReport(), ChunkReport()
    documents = iter_documents(corpus, fmt=config.format, report=report)
    shard_sizes = write_passage_shards(chunk(documents, config, chunking), layout, config.shard_size, 0, "plan")
    bad = [f"{record.path}:{record.line}: {record.reason}" for record in report.bad_records]
    plan = Plan(report.documents, sum(shard_sizes), len(bad), report.duplicate_ids, chunking.split_words, shard_sizes)
    write_json(layout.plan, dataclasses.asdict(plan) | {"bad_record_examples": bad[:100]})
    if bad:
        log.warning(
            "skipped %d bad records, %d of them duplicate document ids (first: %s); listed in %s",
            len(bad),
            plan.duplicate_ids,
            bad[0],
            layout.plan,
        )
    if plan.split_words:
        log.warning(
            "cut %d words longer than a passage's character limit into pieces (chunking.max_passage_chars)",
            plan.split_words,
        )
    return plan


def chunk(documents: Iterable[Document], config: BuildConfig, report: ChunkReport) -> Iterator[Passage]:
    """The passages of documents, cut by the config's chunking."""
    return iter_passages(
        documents,
        words_per_passage=config.chunking.words_per_passage,
        skip_title_paragraph=config.chunking.skip_title_paragraph,
        max_passage_chars=config.chunking.max_passage_chars,
        report=report,
    )


def write_passage_shards(
    passages: Iterable[Passage], layout: StoreLayout, shard_size: int, first_shard: int, step: str
) -> list[int]:
    """Write passages as parquet shards `first_shard`, `first_shard + 1`, ... of `shard_size` passages; returns
    their sizes."""
    shard_sizes: list[int] = []
    with tqdm(desc=f"{step}: chunking corpus", unit=" passages") as bar:
        for rows in _batched(iter(passages), shard_size):
            table = pa.Table.from_pylist(
                [{name: getattr(passage, name) for name in PASSAGE_SCHEMA.names} for passage in rows],
                schema=PASSAGE_SCHEMA,
            )
            path = layout.shard_file(first_shard + len(shard_sizes), "passages.parquet")
            atomic_write(path, lambda tmp, table=table: pq.write_table(table, tmp, compression="zstd"))
            shard_sizes.append(len(rows))
            bar.update(len(rows))
    return shard_sizes


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_rows(layout: StoreLayout, plan: Plan, rows: np.ndarray) -> tuple[list[str], list[str]]:
    """(titles, texts) of planned passages by store row (sorted rows), read from their shards."""
    titles: list[str] = []
    texts: list[str] = []
    starts = np.asarray(plan.row_starts)
    shards = np.searchsorted(starts, rows, side="right") - 1
    for shard in np.unique(shards).tolist():
        table = pq.read_table(layout.shard_file(shard, "passages.parquet"), columns=["title", "text"])
        local = rows[shards == shard] - starts[shard]
        picked = table.take(pa.array(local))
        titles.extend(picked.column("title").to_pylist())
        texts.extend(picked.column("text").to_pylist())
    return titles, texts


def record_corpus(corpus: Path) -> dict[str, Any]:
    """What a store is built from: the corpus path and the path, size and sha256 of each of its files (in reading
    order; each file streamed once to hash it)."""
    files = [{"path": str(path.resolve()), **file_record(path)} for path in corpus_files(corpus)]
    return {"path": str(corpus.resolve()), "files": files}


def check_corpus(layout: StoreLayout, corpus: Path) -> dict[str, Any]:
    """Record the corpus (`record_corpus`) until the build is planned; from then on refuse another one, even to say
    the store is complete. The same bytes (each file's size and sha256, in order) at another path are the same
    corpus: accepted, the record keeps the first path. Sizes are compared first: only the same sizes are hashed."""
    path = layout.corpus_record
    if not layout.plan.is_file():
        record = record_corpus(corpus)
        write_json(path, record)
        return record
    if not path.is_file():
        raise ManifestError(
            f"{layout.root} was started by an older memvq that did not record its corpus, so resuming it could mix "
            f"corpora: remove {layout.root} or pass another --out"
        )
    saved = read_json(path, "corpus record")
    sizes = [file.stat().st_size for file in corpus_files(corpus)]
    if sizes == [file["bytes"] for file in saved["files"]]:
        current = record_corpus(corpus)
        if [file["sha256"] for file in current["files"]] == [file["sha256"] for file in saved["files"]]:
            if current["path"] != saved["path"]:
                log.info("corpus %s holds the bytes %s was built from (%s)", corpus, layout.root, saved["path"])
            return saved
        what = _describe(current["files"])
    else:
        what = f"{len(sizes)} file(s), {sum(sizes):,} bytes"
    raise ManifestError(
        f"{layout.root} was built from {saved['path']} ({_describe(saved['files'])}), not {corpus} ({what}): "
        f"remove {layout.root} or pass another --out to build from {corpus}"
    )


def _describe(files: list[dict[str, Any]]) -> str:
    if len(files) == 1:
        return f"sha256 {files[0]['sha256'][:16]}…, {files[0]['bytes']:,} bytes"
    return f"{len(files)} files, {sum(file['bytes'] for file in files):,} bytes"

"""The update job: add, replace and delete documents of a finished store without a rebuild, as a new generation.

`update_store` runs its steps in the pending generation (`pipelines.generations`), each resumable:

1. plan      the store's live documents by id; the delete list; the added corpora cut into passages (the store's
             chunking) and written as new shards after the last; the rows deleted so far (`deleted.npy`)
2. encode    the new shards, by the build's Ray encoder actors, with the store's own encoder, precision and codec
             (never refitted), so a passage's memory and embedding are the bytes a build would write
3. index     the parent's index, less the deleted rows, plus the new ones (its trained structure kept); the BM25
             index built again over the live rows (its word statistics are those of a rebuild)
4. publish   the manifest of the new generation, checked like a finished build, then made the store's in one step

A document whose id the store holds is replaced: its passages are deleted and the new ones added. Deletions are
applied first, then additions. An unknown id to delete is counted and reported. Killed at any point and run again
with the same arguments, the update resumes and ends with the same files; killed and not run again, the store is
its previous generation, which readers kept reading throughout.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel

from memvq.data.ingest.corpus import iter_documents
from memvq.data.ingest.passages import ChunkReport
from memvq.data.ingest.sources import Document, IngestReport
from memvq.memory.artifact import (
    ArtifactError,
    ManifestError,
    file_record,
    read_json,
    save_npy,
    write_artifact,
    write_json,
)
from memvq.memory.index import PassageIndex
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
    published_job,
    published_parent,
    writer_lock,
)
from memvq.pipelines.indexing.actors import encode_all_shards
from memvq.pipelines.indexing.finalize import build_lexical_index, shard_entries
from memvq.pipelines.indexing.kept import check_kept_shards
from memvq.pipelines.indexing.plan import chunk, record_corpus, write_passage_shards
from memvq.pipelines.local_ray import stop_orphaned_ray
from memvq.pipelines.timing import Stopwatch

log = logging.getLogger(__name__)

UNKNOWN_EXAMPLES = 20


class UpdateReport(BaseModel):
    """What an update did, printed at the end and saved in its generation's manifest."""

    generation: int
    documents_added: int  # new ids
    documents_replaced: int  # ids the store held, given again
    documents_deleted: int
    unknown_ids: int  # ids to delete that the store does not hold
    unknown_examples: list[str]
    bad_records: int
    passages_added: int
    passages_deleted: int
    passages: int  # searchable after the update
    documents: int
    shards_added: int
    seconds: dict[str, float]
    encode_busy_seconds: float  # the encoder actors' time on the new shards (the encode step less Ray's start)


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
    """The plan step's result (`plan.json` of the pending generation)."""

    first_shard: int
    shard_sizes: list[int]
    added: int
    replaced: int
    deleted: int
    unknown: int
    unknown_examples: list[str]
    bad_records: int
    passages_deleted: int  # rows deleted by this update

    @property
    def shards(self) -> dict[int, int]:
        return {self.first_shard + i: size for i, size in enumerate(self.shard_sizes)}


def update_store(
    store: str | Path, add: Iterable[str | Path] = (), delete: str | Path | None = None, ray_address: str | None = None
) -> UpdateReport:
    """Add the documents of the corpora `add` (replacing those whose id the store holds) and delete the ids listed
    in the file `delete` (one per line), as the store's next generation; returns the report."""
    corpora = [Path(path) for path in add]
    for path in [*corpora, *([] if delete is None else [Path(delete)])]:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    if not corpora and delete is None:
        raise ValueError("nothing to update: give --add CORPUS and/or --delete IDS_FILE")
    layout = StoreLayout(local_store(store))
    MemoryStore.open(layout.root)  # a store, verified, before anything is locked or written
    with writer_lock(layout, "update"):
        parent = MemoryStore.open(layout.root)  # the generation published when the lock was taken
        job = {
            "kind": "update",
            "add": [record_corpus(path) for path in corpora],
            "delete": None if delete is None else {"path": str(Path(delete).resolve()), **file_record(Path(delete))},
        }
        if published_job(parent, job):
            log.info("%s already holds this update (generation %d)", layout.root, parent.generation)
            prune(layout, [parent.manifest, published_parent(layout, parent)])  # if killed before it pruned
            return UpdateReport.model_validate(parent.manifest["update"])
        config = BuildConfig.model_validate(parent.manifest["config"])
        stop_orphaned_ray()
        pending = begin(layout, parent, job)
        clock = Stopwatch()
        with clock.stage("plan"):
            plan = _plan(pending, config, corpora, None if delete is None else Path(delete))
        check_kept_shards(layout, plan.shards, config.memory)
        with clock.stage("encode"):
            busy = encode_all_shards(layout, config, plan.shards, ray_address)
        with clock.stage("index"):
            index = _index(pending, plan)
        if pending.parent.lexical_dir is not None:
            with clock.stage("lexical"):  # BM25's statistics are the live rows': built again over them
                rows = {shard: size for shard, _, size in pending.parent.shard_rows()} | plan.shards
                build_lexical_index(layout, rows, pending.lexical_dir, deleted=np.load(pending.dir / "deleted.npy"))
        markers = [read_json(layout.shard_done(shard), "shard marker") for shard in plan.shards]
        report = UpdateReport(
            generation=pending.generation,
            documents_added=plan.added,
            documents_replaced=plan.replaced,
            documents_deleted=plan.deleted,
            unknown_ids=plan.unknown,
            unknown_examples=plan.unknown_examples,
            bad_records=plan.bad_records,
            passages_added=sum(plan.shard_sizes),
            passages_deleted=plan.passages_deleted,
            passages=index.ntotal,
            documents=int(parent.manifest["num_documents"]) + plan.added - plan.deleted,
            shards_added=len(plan.shard_sizes),
            seconds={},
            encode_busy_seconds=round(busy, 3),
        )
        with clock.stage("publish"):
            manifest = _write_manifest(pending, plan, markers, report.model_copy(update={"seconds": clock.seconds}))
            check_generation(pending)
            publish(pending, manifest)
            prune(layout, [manifest, parent.manifest])
        return UpdateReport.model_validate(manifest["update"])


def check_generation(pending: Pending) -> MemoryStore:
    """Open the pending generation as a reader would (every file's sha256, the counts, the index): a generation that
    readers would refuse is never published (its manifest and indexes are removed, so a run again writes them
    anew; a damaged shard is caught by the shard check of that run)."""
    try:
        store = MemoryStore.open(pending.layout.root, manifest=pending.manifest)
        _ = store.index
    except ArtifactError as error:
        pending.manifest.unlink(missing_ok=True)
        for directory in (pending.index_dir, pending.lexical_dir):  # written again by the next run
            shutil.rmtree(directory, ignore_errors=True)
        raise ManifestError(
            f"generation {pending.generation} of {pending.layout.root} fails its check, so it is not published (the "
            f"store stays at generation {pending.parent.generation}; run the same command again): {error}"
        ) from error
    return store


def live_documents(store: MemoryStore) -> dict[str, list[int]]:
    """The store's documents that are not deleted: id -> their rows (read shard by shard, the doc_id column only)."""
    deleted = store.deleted_rows()
    documents: dict[str, list[int]] = {}
    for shard, start, _ in store.shard_rows():
        ids = pq.read_table(store.layout.shard_file(shard, "passages.parquet"), columns=["doc_id"]).column(0)
        rows = np.arange(start, start + len(ids))
        keep = ~np.isin(rows, deleted)
        for doc_id, row in zip(np.asarray(ids.to_pylist(), dtype=object)[keep], rows[keep].tolist(), strict=True):
            documents.setdefault(doc_id, []).append(row)
    return documents


def read_ids(path: Path) -> list[str]:
    """Document ids, one per line (blank lines and surrounding spaces ignored), in order, each once."""
    return list(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))


def _plan(pending: Pending, config: BuildConfig, corpora: list[Path], delete: Path | None) -> UpdatePlan:
    marker = pending.marker("plan")
    if marker.is_file():
        saved = read_json(marker, "update plan")
        return UpdatePlan(**{field.name: saved[field.name] for field in dataclasses.fields(UpdatePlan)})
    live = live_documents(pending.parent)
    to_delete = read_ids(delete) if delete is not None else []
    report, added_ids, duplicates = IngestReport(), [], []

    def documents() -> Iterator[Document]:
        """The added corpora's documents; an id an earlier corpus gave is skipped and counted (the first is kept)."""
        seen: set[str] = set()
        for corpus in corpora:
            for document in iter_documents(corpus, fmt=config.format, report=report):
                if document.doc_id in seen:
                    duplicates.append(document.doc_id)
                    continue
                seen.add(document.doc_id)
                added_ids.append(document.doc_id)
                yield document

    first = pending.first_shard
    sizes = write_passage_shards(
        chunk(documents(), config, ChunkReport()), pending.layout, config.shard_size, first, "update"
    )
    added = set(added_ids)
    replaced = [doc for doc in added_ids if doc in live]
    deleted = [doc for doc in to_delete if doc in live and doc not in added]
    unknown = [doc for doc in to_delete if doc not in live]
    if duplicates:
        log.warning("%d documents repeat an id an earlier --add corpus gave (first: %s): skipped", len(duplicates),
                    duplicates[0])  # fmt: skip
    if unknown:
        log.warning("%d ids to delete are not in the store (first: %s)", len(unknown), unknown[0])
    gone = sorted(row for doc in [*replaced, *deleted] for row in live[doc])
    save_npy(pending.dir / "deleted.npy", np.union1d(pending.parent.deleted_rows(), gone).astype(np.int64))
    plan = UpdatePlan(
        first_shard=first,
        shard_sizes=sizes,
        added=len(added) - len(replaced),
        replaced=len(replaced),
        deleted=len(deleted),
        unknown=len(unknown),
        unknown_examples=unknown[:UNKNOWN_EXAMPLES],
        bad_records=len(report.bad_records) + len(duplicates),
        passages_deleted=len(gone),
    )
    write_json(marker, dataclasses.asdict(plan))
    return plan


def _index(pending: Pending, plan: UpdatePlan) -> PassageIndex:
    """The parent's index less the deleted rows plus the new shards' rows, saved in the pending generation."""
    if (pending.index_dir / "index.json").is_file():
        return PassageIndex.load(pending.index_dir)
    index = PassageIndex.load(pending.parent.index_dir, use_gpu=False)
    index.remove(np.load(pending.dir / "deleted.npy"))
    row = pending.parent.num_rows
    for shard, size in plan.shards.items():
        emb = np.load(pending.layout.shard_file(shard, "emb.npy")).astype(np.float32)
        index.add(np.arange(row, row + size, dtype=np.int64), emb)
        row += size
    index.save(pending.index_dir)
    return index


def _write_manifest(
    pending: Pending, plan: UpdatePlan, markers: list[dict[str, Any]], report: UpdateReport
) -> dict[str, Any]:
    """The pending generation's manifest: the parent's, with the new shards, the new index and the deleted rows."""
    layout, parent = pending.layout, pending.parent.manifest
    replaced = [pending.parent.index_dir, pending.parent.lexical_dir]
    files: dict[str, Any] = {
        name: record
        for name, record in parent["files"].items()
        if not any(d is not None and (layout.root / name).is_relative_to(d) for d in replaced)
        and name != parent.get("deleted")
    }
    added, added_files, row = shard_entries(dict(zip(plan.shards, markers, strict=True)), int(parent["num_rows"]))
    deleted = pending.dir / "deleted.npy"
    deleted_rows = np.load(deleted)
    if len(deleted_rows):
        files[layout.relative(deleted)] = file_record(deleted)
    indexes, index_fields = pending_indexes(pending)
    extra = (
        generation_fields(pending)
        | index_fields
        | {
            "num_documents": report.documents,
            "num_rows": row,
            "num_passages": row - len(deleted_rows),
            "num_tokens": int(parent["num_tokens"]) + sum(done["tokens"] for done in markers),
            "shards": [*parent["shards"], *added],
            "deleted": layout.relative(deleted) if len(deleted_rows) else None,
            "update": report.model_dump(),
        }
    )
    files |= added_files | indexes
    header = write_artifact(pending.dir, "manifest.json", STORE_FORMAT, parent["config"], files=files, extra=extra)
    return header.to_json()

"""How a store changes after its build: one writer at a time, a pending generation that resumes, one atomic publish,
and the removal of what no kept generation reads. `pipelines.update` and `pipelines.compact` write through it.

A writer holds `StoreLayout.writer_lock` (an flock: the kernel lets go of it when the writer dies, so a killed
writer never leaves the store locked) and writes generation g + 1 in `generation_dir(g + 1)` (and new shard files in
`shards/`, numbered after every shard a manifest names). Its `job.json` records what it was asked (the parent's
manifest checksum and its inputs' sha256): run again with the same arguments it resumes, with others it starts over
(nothing published names what it had written). Publishing replaces `manifest.json` with the pending manifest in one
`os.replace`; the parent's manifest is kept in its generation directory. Readers that opened the parent keep it:
nothing a published manifest names is changed in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvq.memory.artifact import CHECKSUM_KEY, FileRecord, ManifestError, atomic_write, read_json, write_json
from memvq.memory.location import is_uri
from memvq.memory.store import MemoryStore, StoreLayout
from memvq.pipelines.indexing.finalize import directory_files

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
CHANGE_REPORTS = ("update", "compact")  # the manifest field holding the report of the writer that made it
PENDING_MANIFEST = "manifest.json"


class StoreBusyError(ManifestError):
    """Another update or compaction is writing the store."""


def local_store(store: str | Path) -> Path:
    """The store's directory; a store at a URI is refused (it is written in place: fetch, change, build again)."""
    if is_uri(store):
        raise ManifestError(
            f"{store} is a URI: a store is updated or compacted where it lies, on local disk (`memvq fetch {store} "
            "DIR`, then update DIR)"
        )
    return Path(store)


@contextlib.contextmanager
def writer_lock(layout: StoreLayout, what: str) -> Iterator[None]:
    """Hold the store's writer lock while `what` ("update", "compact") runs; StoreBusyError when another holds it."""
    fd = os.open(layout.writer_lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise StoreBusyError(
                f"{layout.root} is being written by {holder}: one writer at a time; run this again when it ends "
                "(a killed writer's lock goes with it)"
            ) from error
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"memvq {what} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Pending:
    """Generation `generation` being written over `parent` (the store as it is published now)."""

    layout: StoreLayout
    parent: MemoryStore
    generation: int
    job: dict[str, Any]

    @property
    def dir(self) -> Path:
        return self.layout.generation_dir(self.generation)

    @property
    def first_shard(self) -> int:
        """The number of the first shard this generation writes: one past the parent's last (the shard files of
        older generations past it are gone: `prune` removed them when the parent was published)."""
        return max(int(entry["shard"]) for entry in self.parent.manifest["shards"]) + 1

    def marker(self, step: str) -> Path:
        """The file a step writes last (its result): the step is done iff it exists."""
        return self.dir / f"{step}.json"

    @property
    def index_dir(self) -> Path:
        return self.dir / "index"

    @property
    def lexical_dir(self) -> Path:
        return self.dir / "lexical"

    @property
    def manifest(self) -> Path:
        return self.dir / PENDING_MANIFEST


def published_job(store: MemoryStore, job: dict[str, Any]) -> bool:
    """Whether the store's current generation is the one `job` makes (the same command run again after it
    published)."""
    recorded = store.manifest.get("job") or {}
    return {key: value for key, value in recorded.items() if key != "parent"} == job


def published_parent(layout: StoreLayout, store: MemoryStore) -> dict[str, Any]:
    """The manifest of the generation `store`'s current one was made from (kept in its generation directory)."""
    parent = store.manifest["parent"]
    return read_json(layout.generation_dir(parent["generation"]) / PENDING_MANIFEST, "parent generation manifest")


def begin(layout: StoreLayout, parent: MemoryStore, job: dict[str, Any]) -> Pending:
    """The pending generation after `parent` for `job`: resumed when an interrupted writer was doing the same job,
    else started afresh (what another job left unpublished is removed first)."""
    job = {**job, "parent": parent.manifest[CHECKSUM_KEY]}
    pending = Pending(layout, parent, parent.generation + 1, job)
    record = pending.dir / JOB_FILE
    if record.is_file():
        if read_json(record, "pending job record") == job:
            log.info("resuming generation %d of %s", pending.generation, layout.root)
            return pending
        log.warning(
            "an interrupted %s of %s left generation %d unpublished: starting over",
            job["kind"],
            layout.root,
            pending.generation,
        )
    discard(pending)
    pending.dir.mkdir(parents=True)
    write_json(record, job)
    return pending


def discard(pending: Pending) -> None:
    """Remove what an unpublished generation wrote: its directory and the shard files no kept manifest names."""
    shutil.rmtree(pending.dir, ignore_errors=True)
    named = _named_files([pending.parent.manifest])
    for path in sorted(pending.layout.shards_dir.glob("*")):
        if pending.layout.relative(path) not in named and not _is_named_marker(pending.layout, path, named):
            path.unlink(missing_ok=True)


def generation_fields(pending: Pending) -> dict[str, Any]:
    """The manifest fields of a pending generation that it takes from its parent (backbone, codec, corpus, the
    build's report, ...) or has as a generation (its number, its parent, its job); the writer adds its own."""
    header_keys = ("format", "version", "config", "files", "library_versions", CHECKSUM_KEY, *CHANGE_REPORTS)
    parent = pending.parent.manifest
    return {key: value for key, value in parent.items() if key not in header_keys} | {
        "generation": pending.generation,
        "parent": {"generation": pending.parent.generation, CHECKSUM_KEY: parent[CHECKSUM_KEY]},
        "job": pending.job,
    }


def pending_indexes(pending: Pending) -> tuple[dict[str, FileRecord], dict[str, str | None]]:
    """The pending generation's dense index and (when its parent has one) BM25 index: their files' records, and the
    manifest fields naming their directories."""
    lexical = pending.lexical_dir if pending.parent.lexical_dir is not None else None
    fields = {
        "index": pending.layout.relative(pending.index_dir),
        "lexical": None if lexical is None else pending.layout.relative(lexical),
    }
    return directory_files(pending.layout, [pending.index_dir, lexical]), fields


def publish(pending: Pending, manifest: dict[str, Any]) -> None:
    """Make `manifest` (written at `pending.manifest`, checked by the caller) the store's: the parent's is kept in
    its generation directory, then manifest.json is replaced in one step."""
    layout = pending.layout
    kept = layout.generation_dir(pending.parent.generation) / PENDING_MANIFEST
    if not kept.is_file():
        atomic_write(kept, lambda tmp: shutil.copyfile(layout.manifest, tmp))
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(layout.manifest, lambda tmp: tmp.write_text(text))


def prune(layout: StoreLayout, manifests: list[dict[str, Any]]) -> int:
    """Remove the shard, index, lexical index and deleted-row files none of `manifests` names (a generation's
    manifest and job record stay, as its history); returns the bytes removed."""
    named = _named_files(manifests)
    freed = 0
    candidates = [
        *layout.shards_dir.glob("*"),
        *layout.index_dir.glob("*"),
        *layout.lexical_dir.glob("*"),
        *layout.generations_dir.rglob("*"),
    ]
    for path in sorted(candidates):
        history = path.name in (JOB_FILE, PENDING_MANIFEST) and path.parent.parent == layout.generations_dir
        if not path.is_file() or history or layout.relative(path) in named or _is_named_marker(layout, path, named):
            continue
        freed += path.stat().st_size
        path.unlink()
    for directory in sorted({*layout.generations_dir.rglob("*"), layout.index_dir, layout.lexical_dir}, reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    return freed


def _named_files(manifests: list[dict[str, Any]]) -> set[str]:
    return {name for manifest in manifests for name in manifest["files"]}


def _is_named_marker(layout: StoreLayout, path: Path, named: set[str]) -> bool:
    """A shard's done marker whose shard files are named."""
    if path.name.endswith(".done.json") and path.parent == layout.shards_dir:
        return layout.relative(path.with_name(path.name.replace(".done.json", ".emb.npy"))) in named
    return False


def store_bytes(files: Mapping[str, FileRecord]) -> int:
    """The bytes of the files a manifest names (its `files` records)."""
    return sum(int(record["bytes"]) for record in files.values())

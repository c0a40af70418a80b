"""What a resumed build keeps of the shards it finds done: a shard is kept only when its done marker reads, counts
the plan's passages, and names the shard's files with the size and sha256 they have now (a store at a URI: the
size, since its bytes are not fetched to be hashed). Any other shard loses its marker, with a warning saying why,
and is encoded again, so a manifest is only ever written from markers that hold."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memvq.memory.artifact import ArtifactError, file_record, read_json
from memvq.memory.location import RemoteStore
from memvq.memory.store import StoreLayout, shard_suffixes
from memvq.pipelines.indexing.actors import done_shards

log = logging.getLogger(__name__)


def check_kept_shards(
    layout: StoreLayout, shard_sizes: Mapping[int, int], memory: bool, remote: RemoteStore | None = None
) -> set[int]:
    """The done shards of `shard_sizes` (shard -> passages) that hold what their markers say (kept); the others'
    markers are removed (here and at `remote`) so the encode step writes them again."""
    kept = set()
    for shard in sorted(done_shards(layout, remote, shard_sizes)):
        problem = _problem(layout, shard, shard_sizes[shard], memory, remote)
        if problem is None:
            kept.add(shard)
            continue
        log.warning("shard %d is encoded again: %s", shard, problem)
        marker = layout.shard_done(shard)
        if remote is None:
            marker.unlink()
        else:
            remote.fs.delete_file(remote.path(layout.relative(marker)))
    return kept


def _problem(layout: StoreLayout, shard: int, passages: int, memory: bool, remote: RemoteStore | None) -> str | None:
    """What is wrong with a done shard (None: nothing)."""
    marker = layout.shard_done(shard)
    try:
        done = read_json(marker, "shard marker") if remote is None else remote.read_json(layout.relative(marker))
    except (ArtifactError, ValueError, OSError) as error:
        return f"its marker {marker.name} does not read ({error})"
    if not isinstance(done, dict) or done.get("passages") != passages or not isinstance(done.get("files"), dict):
        return f"its marker {marker.name} does not record the plan's {passages} passages and their files"
    records: dict[str, Any] = done["files"]
    wanted = {layout.relative(layout.shard_file(shard, suffix)) for suffix in shard_suffixes(memory)}
    if set(records) != wanted:
        return f"its marker {marker.name} names {sorted(records)}, not {sorted(wanted)}"
    for name, record in sorted(records.items()):
        found = _record(layout.root / name, name, remote)
        if found is None:
            return f"{name} is missing"
        if found["bytes"] != record.get("bytes"):
            return f"{name} holds {found['bytes']} bytes, its marker says {record.get('bytes')}"
        if "sha256" in found and found["sha256"] != record.get("sha256"):
            return f"{name} does not have the sha256 its marker records (damaged, or the marker is)"
    return None


def _record(path: Path, name: str, remote: RemoteStore | None) -> dict[str, Any] | None:
    """The file's size and sha256 in the store (at a URI: its size only); None if it is not there."""
    if remote is None:
        return dict(file_record(path)) if path.is_file() else None
    size = remote.size(name)
    return None if size is None else {"bytes": size}

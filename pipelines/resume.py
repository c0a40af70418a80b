"""What a resumable job was started with, kept in its directory: the first run writes it, a resumed run must bring the
same (the build, training and evaluation jobs, each with its own record: `StoreLayout.build_config`, a training
run's config.json, an eval directory's eval_config.json)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from memvq.memory.artifact import ManifestError, read_json, write_json


def check_or_record(
    path: Path,
    record: Mapping[str, Any],
    job: str,
    error: type[Exception] = ManifestError,
    current: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """Write `record` (JSON values) to `path` on a job's first run; on a resume, refuse one that differs with `error`,
    naming the record's fields that differ. `current` brings a saved record up to date before the comparison (a
    record written before a setting with a default existed gets that default, as a config read today would); a record
    it cannot read is compared as it is."""
    if not path.is_file():
        write_json(path, dict(record))
        return
    saved = read_json(path, f"{job} record")
    if current is not None:
        with contextlib.suppress(ValueError):  # compared as it is
            saved = current(saved)
    if saved == record:
        return
    differ = ", ".join(sorted(key for key in {*saved, *record} if saved.get(key) != record.get(key)))
    raise error(
        f"{path.parent} holds {job} started with a different config ({differ}: see {path}); use another --out, "
        "or delete it to start over"
    )

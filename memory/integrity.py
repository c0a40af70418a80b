"""Store integrity: that the files a reader uses are, byte for byte, the files their header lists.

Hashing every file of a large store at every open costs seconds per GB, so checksums are remembered:

- `VerifiedFiles`: the sha256 of each file of one artifact directory, with the file's stamp (size, mtime in ns,
  inode, ctime in ns) when it was hashed, in a small JSON file in the user's cache (`MEMVQ_CACHE_DIR`, else
  `$XDG_CACHE_HOME/memvq`, else `~/.cache/memvq`). A file whose stamp has not changed is not hashed again; any
  write to a file changes its ctime (which `touch` or `os.utime` cannot set back), so a changed file is hashed
  again. Nothing is remembered when the cache cannot be written (a read-only home): every open hashes in full.
- `FileWatch`: the stamps of a verified artifact's files; `changed()` re-stats them (microseconds per file) and
  re-hashes only those whose stamp moved, returning the ones that no longer match their header. The server runs
  it on a timer and goes unready when it returns anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from memvq.memory.artifact import FileRecord, sha256_file, write_json

logger = logging.getLogger(__name__)

CACHE_ENV = "MEMVQ_CACHE_DIR"


class FileStamp(NamedTuple):
    """What changes when a file's bytes change: size, mtime, inode (a replaced file) and ctime (any write)."""

    bytes: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)


def cache_dir() -> Path:
    """Where memvq remembers what it verified."""
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memvq"


class VerifiedFiles:
    """sha256 of the files under one directory, remembered with the stamp they had when hashed."""

    def __init__(self, root: Path, cache: Path | None = None) -> None:
        self.root = Path(root).resolve()
        key = hashlib.sha256(str(self.root).encode()).hexdigest()[:24]
        self.path = (cache or cache_dir()) / "verified" / f"{key}.json"
        self._entries: dict[str, tuple[FileStamp, str]] = {}
        self.checked: str | None = None  # the header checksum whose derived fields were last checked
        self._dirty = False
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("root") == str(self.root):
                self._entries = {
                    name: (FileStamp(*entry["stamp"]), entry["sha256"]) for name, entry in saved["files"].items()
                }
                self.checked = saved.get("checked")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no cache yet, or an unreadable one: hash everything
        self.hashed_bytes = 0

    def sha256(self, path: Path) -> str:
        """The sha256 of `path` (a file under the root): remembered if its stamp is unchanged, else hashed now."""
        name = Path(path).resolve().relative_to(self.root).as_posix()
        stamp = FileStamp.of(Path(path))
        remembered = self._entries.get(name)
        if remembered is not None and remembered[0] == stamp:
            return remembered[1]
        digest = sha256_file(Path(path))
        self.hashed_bytes += stamp.bytes
        if FileStamp.of(Path(path)) == stamp:  # not written to while it was hashed
            self._entries[name] = (stamp, digest)
            self._dirty = True
        return digest

    def remember_checked(self, header_checksum: str) -> None:
        """Remember that the header with this checksum was checked against files that are all remembered here."""
        if self.checked != header_checksum:
            self.checked, self._dirty = header_checksum, True

    def save(self) -> None:
        """Remember what was hashed (atomically; skipped with a debug line when the cache is not writable)."""
        if not self._dirty:
            return
        files = {name: {"stamp": list(stamp), "sha256": digest} for name, (stamp, digest) in self._entries.items()}
        try:
            write_json(self.path, {"root": str(self.root), "files": files, "checked": self.checked})
            self._dirty = False
        except OSError as error:
            logger.debug("cannot remember verified checksums in %s: %s", self.path, error)


class FileWatch:
    """The stamps of an artifact's files once verified; `changed()` names the files that no longer match."""

    def __init__(self, root: Path, files: Mapping[str, FileRecord], extra: Mapping[str, str] | None = None) -> None:
        """`files`: the header's records; `extra`: more files to watch, name -> sha256 (the header itself)."""
        self.root = Path(root)
        self.expected = {name: record["sha256"] for name, record in files.items()} | dict(extra or {})
        self.stamps = {name: self._stamp(name) for name in self.expected}

    def _stamp(self, name: str) -> FileStamp | None:
        try:
            return FileStamp.of(self.root / name)
        except OSError:
            return None

    def changed(self) -> list[str]:
        """Files (named relative to the root) that are missing or whose bytes no longer match; a file whose stamp
        moved but whose sha256 still matches (copied back, touched) is accepted and its new stamp kept."""
        damaged = []
        for name, expected in self.expected.items():
            stamp = self._stamp(name)
            if stamp == self.stamps[name] and stamp is not None:
                continue
            if stamp is None or sha256_file(self.root / name) != expected:
                damaged.append(name)
                continue
            self.stamps[name] = stamp
        return damaged

"""Where a store lives: a directory (local, or a filesystem every node mounts, e.g. NFS), or a `pyarrow.fs` URI
(`s3://bucket/store`, `gs://bucket/store`, `hdfs://host/store`, `file:///path`) read and written through
pyarrow's filesystems, with credentials from the environment as pyarrow reads them.

A build to a URI works in a local staging directory and publishes each finished piece to the URI (`RemoteStore`);
its encoder actors do the same from staging directories of their own, so nodes need no shared disk. Uploads are
atomic: object stores (S3, GCS) show an object only once its upload completes; elsewhere a file is written under a
temporary name and then moved. A store at a URI is read from a local copy: `fetch_store` (then
`MemoryStore.open`), since its files are memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

STAGING_ENV = "MEMVQ_STAGING_DIR"  # where builds to a URI stage their files (default ~/.cache/memvq/staging)
OBJECT_STORES = ("s3", "gcs")  # uploads become visible only when complete: no temporary name needed


def is_uri(location: str | Path) -> bool:
    """A `pyarrow.fs` URI (`scheme://...`), not a path (a `Path` is always a path)."""
    return isinstance(location, str) and "://" in location


def staging_root() -> Path:
    return Path(os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "memvq" / "staging")


def default_staging(uri: str, root: Path | None = None) -> Path:
    """The local staging directory of a build to `uri`: one per URI, under `root` (default `staging_root()`)."""
    return (root or staging_root()) / hashlib.sha256(uri.encode()).hexdigest()[:16]


class RemoteStore:
    """A store directory at a `pyarrow.fs` URI: files addressed by their path relative to the store's root."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, base = pafs.FileSystem.from_uri(uri)
        self.base = base.rstrip("/")
        self._local = pafs.LocalFileSystem()

    def path(self, relative: str) -> str:
        return f"{self.base}/{relative}"

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def size(self, relative: str) -> int | None:
        """The size in bytes of a file of the store; None if there is none."""
        info = self.fs.get_file_info(self.path(relative))
        return info.size if info.type == pafs.FileType.File else None

    def files(self, under: str = "") -> list[str]:
        """Relative names of the files under `under` (recursively), hidden ones (temporaries) left out."""
        root = self.path(under) if under else self.base
        if self.fs.get_file_info(root).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(root, recursive=True))
        names = [info.path[len(self.base) + 1 :] for info in infos if info.type == pafs.FileType.File]
        return sorted(name for name in names if not Path(name).name.startswith("."))

    def upload(self, local: Path, relative: str) -> None:
        """Copy a local file to the store, atomically (see the module docstring)."""
        target = self.path(relative)
        if self.fs.type_name in OBJECT_STORES:
            pafs.copy_files(str(local), target, source_filesystem=self._local, destination_filesystem=self.fs)
            return
        parent, _, name = target.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.tmp-{os.getpid()}"
        pafs.copy_files(str(local), tmp, source_filesystem=self._local, destination_filesystem=self.fs)
        if self.fs.type_name != "local" and self.exists(relative):  # HDFS renames onto no existing file
            self.fs.delete_file(target)
        self.fs.move(tmp, target)

    def upload_dir(self, local: Path, relative: str, last: str | None = None) -> None:
        """Upload the (non-hidden) files of a local directory, `last` after all the others (a directory's header:
        its presence says the rest is there)."""
        names = sorted(path.name for path in local.iterdir() if path.is_file() and not path.name.startswith("."))
        for name in sorted(names, key=lambda name: name == last):
            self.upload(local / name, f"{relative}/{name}")

    def download(self, relative: str, local: Path) -> Path:
        """Copy one file of the store to `local` (written under a temporary name, then moved)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
        try:
            source = self.path(relative)
            pafs.copy_files(source, str(tmp), source_filesystem=self.fs, destination_filesystem=self._local)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def read_json(self, relative: str) -> dict[str, Any]:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return json.loads(stream.read().decode("utf-8"))


def fetch_store(uri: str, local: str | Path) -> Path:
    """Copy the store at `uri` into the local directory `local` (open it then with `MemoryStore.open`, which
    verifies every file against the manifest); refused if the store at `uri` has no manifest (is not finished)."""
    from memvq.memory.artifact import MANIFEST_NAME, ManifestError

    remote, local = RemoteStore(uri), Path(local)
    if not remote.exists(MANIFEST_NAME):
        raise ManifestError(f"no finished memory store at {uri}: {MANIFEST_NAME} is missing")
    for name in remote.files():
        remote.download(name, local / name)
    return local


def clear(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)

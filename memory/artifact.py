"""Manifests: what produced an artifact (config, model, library versions) and the sha256 of every file in it.

Also the small file helpers every artifact writer uses: atomic writes (write a temporary name, then
`os.replace`) so that a killed job never leaves a half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
TRACKED_LIBRARIES = (
    "memvq",
    "torch",
    "transformers",
    "numpy",
    "pyarrow",
    "faiss-cpu",
    "faiss-gpu",
    "vector-quantize-pytorch",
    "ray",
)


class ManifestError(RuntimeError):
    """An artifact's manifest is missing, unreadable, or does not match the files beside it."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of one file, as manifests list them."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, flush it to disk, then move it to `path` in one step (a crash leaves the old file
    or the new one, never a torn one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Atomically write one array as .npy (through a handle: np.save would add ".npy" to the temporary name)."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.save(handle, array, allow_pickle=False)

    atomic_write(path, write)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write pretty, key-sorted JSON."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"))


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ManifestError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{what} at {path} is not valid JSON: {error}") from error


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact's bytes (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def verify_files(root: Path, files: dict[str, dict[str, Any]], checksums: bool = True) -> None:
    """Check that every listed file exists with the recorded size (and sha256); raise ManifestError naming it."""
    for name, record in files.items():
        path = root / name
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        if path.stat().st_size != record["bytes"]:
            raise ManifestError(
                f"{path} has {path.stat().st_size} bytes, the manifest says {record['bytes']}: the store is damaged"
            )
        if checksums and sha256_file(path) != record["sha256"]:
            raise ManifestError(f"{path} fails its sha256 checksum: the store is damaged (rebuild this shard)")

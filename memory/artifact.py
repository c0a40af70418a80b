"""Artifact headers: what produced an artifact (format and version, config, library versions) and the sha256 of
every file in it, in one layout for every artifact memvq writes (codec, passage index, reader, store, eval report,
training run)::

    {"format": "memvq-codec", "version": 2, "config": {...}, "files": {name: {"bytes", "sha256"}},
     "library_versions": {...}, ...the artifact's own fields, "header_sha256": "..."}

`header_sha256` covers the header itself (its canonical JSON without that field), so that an edited or damaged
header (a shard's row start, a count, a file's recorded sha256) is refused like a damaged file. `write_artifact`
writes one (file records relative to the artifact's directory), `read_artifact` reads one and refuses another
format or version, or a header that fails its own checksum, with an `ArtifactError`; `ArtifactHeader.verify`
checks the files against it.

Also the small file helpers every artifact writer uses: atomic writes (write a temporary name, then
`os.replace`) so that a killed job never leaves a half-written file under a final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

HEADER_KEYS = ("format", "version", "config", "files", "library_versions")
CHECKSUM_KEY = "header_sha256"
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


class ArtifactError(RuntimeError):
    """An artifact's header is missing, unreadable, of another format or version, or does not match its files."""


class ManifestError(ArtifactError):
    """A store's manifest, or the config a build or training run recorded, is missing, damaged or disagrees."""


class FileRecord(TypedDict):
    """One file of an artifact, as its header lists it."""

    bytes: int
    sha256: str


@dataclass(frozen=True)
class ArtifactFormat:
    """One kind of artifact: its format name, the version this memvq writes and reads, and how to make an artifact
    of an older version again (said when one is refused)."""

    name: str
    version: int
    remake: str


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_record(path: Path) -> FileRecord:
    """{"bytes", "sha256"} of one file, as headers and markers list them."""
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
    except OSError as error:
        if not _disk_full(error):
            raise
        free = shutil.disk_usage(path.parent).free
        message = f"no space left on the device writing {path} ({free:,} bytes free there)"
        raise OSError(errno.ENOSPC, message) from error
    finally:
        tmp.unlink(missing_ok=True)


def _disk_full(error: OSError) -> bool:
    """ENOSPC, or numpy's short write ("N requested and M written"), which carries no errno."""
    return error.errno == errno.ENOSPC or ("requested and" in str(error) and "written" in str(error))


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


def header_checksum(payload: Mapping[str, Any]) -> str:
    """sha256 of a header's canonical JSON (sorted keys, no spaces), its own checksum field left out."""
    fields = {key: value for key, value in payload.items() if key != CHECKSUM_KEY}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact's bytes (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class ArtifactHeader:
    """An artifact's header: format and version, the config that made it, its files' records (names relative to
    the artifact's directory), the library versions that shaped its bytes, and the artifact's own fields (`extra`,
    stored beside the others at the top level)."""

    format: str
    version: int
    config: dict[str, Any]
    files: dict[str, FileRecord] = field(default_factory=dict)
    library_versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        fmt: ArtifactFormat,
        config: Mapping[str, Any],
        files: Mapping[str, Path | FileRecord] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> ArtifactHeader:
        """A header of this memvq's version of `fmt`. `files`: name -> a path (hashed now) or the record of a file
        hashed when it was written (a build's shards)."""
        extra = dict(extra or {})
        if clash := sorted(set(extra) & {*HEADER_KEYS, CHECKSUM_KEY}):
            raise ValueError(f"an artifact's own fields cannot be named like header fields: {clash}")
        records = {
            name: file_record(Path(source)) if isinstance(source, str | Path) else source
            for name, source in (files or {}).items()
        }
        return cls(fmt.name, fmt.version, dict(config), records, library_versions(), extra)

    def to_json(self) -> dict[str, Any]:
        """The header as written (plain JSON values): the header fields, the artifact's own, then the checksum."""
        payload = {
            "format": self.format,
            "version": self.version,
            "config": self.config,
            "files": self.files,
            "library_versions": self.library_versions,
            **self.extra,
        }
        payload = json.loads(json.dumps(payload, default=str))
        return {**payload, CHECKSUM_KEY: header_checksum(payload)}

    def verify(self, root: Path, checksums: bool = True, sha256: Callable[[Path], str] = sha256_file) -> None:
        """Check that every listed file is under `root` with its recorded size (and sha256, from `sha256`: a
        cache may answer for files it hashed before); ArtifactError naming the first that is not."""
        for name, record in self.files.items():
            path = Path(root) / name
            if not path.is_file():
                raise ArtifactError(f"{path} is listed in its {self.format} header but missing")
            if path.stat().st_size != record["bytes"]:
                raise ArtifactError(
                    f"{path} has {path.stat().st_size} bytes, its {self.format} header says {record['bytes']}: "
                    "the file is damaged"
                )
            if checksums and sha256(path) != record["sha256"]:
                raise ArtifactError(
                    f"{path} fails its sha256 checksum (sha256 mismatch with its {self.format} header): "
                    "the file is damaged"
                )


def write_artifact(
    directory: Path,
    name: str,
    fmt: ArtifactFormat,
    config: Mapping[str, Any],
    files: Mapping[str, Path | FileRecord] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ArtifactHeader:
    """Write the header `directory/name` (atomically; write it after the files it lists, so that an artifact with
    a header is complete) and return it. See `ArtifactHeader.create` for `files`."""
    header = ArtifactHeader.create(fmt, config, files, extra)
    write_json(Path(directory) / name, header.to_json())
    return header


def read_artifact(path: Path, fmt: ArtifactFormat, what: str) -> ArtifactHeader:
    """Read the header at `path`, which must be this memvq's version of `fmt`; ArtifactError (naming `what`, e.g.
    "codec header") if it is missing, not JSON, of another format, of another version, or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{what} {path} is corrupt: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} {path} is corrupt: a JSON {type(data).__name__}, not an object")
    found, version = _format_and_version(data, fmt)
    if not isinstance(found, str):
        raise ArtifactError(f"{what} {path} is not a memvq artifact header (format {found!r}), expected {fmt.name}")
    if found != fmt.name:
        raise ArtifactError(f"{path} is a {found} artifact, expected {fmt.name} ({what})")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{what} {path} is corrupt: version {version!r} is not an integer")
    if version > fmt.version:
        raise ArtifactError(
            f"{path}: {fmt.name} version {version} is newer than this memvq reads ({fmt.version}): upgrade memvq"
        )
    if version < fmt.version:
        raise ArtifactError(
            f"{path}: {fmt.name} version {version} was built by an older memvq (this one reads version "
            f"{fmt.version}): {fmt.remake}"
        )
    fields = {key: data.get(key) for key in ("config", "files", "library_versions")}
    if bad := sorted(key for key, value in fields.items() if not isinstance(value, dict)):
        raise ArtifactError(f"{what} {path} is corrupt: {', '.join(bad)} missing or not an object")
    checksum = data.get(CHECKSUM_KEY)
    if checksum is None:
        raise ArtifactError(
            f"{what} {path} has no header checksum ({CHECKSUM_KEY}): it was written by an older memvq or "
            f"rewritten by hand; {fmt.remake}"
        )
    if checksum != header_checksum(data):
        raise ArtifactError(
            f"{what} {path} fails its own checksum ({CHECKSUM_KEY}): the header was edited or damaged; {fmt.remake}"
        )
    files = fields["files"]
    if not all(isinstance(record, dict) and {"bytes", "sha256"} <= set(record) for record in files.values()):
        raise ArtifactError(f"{what} {path} is corrupt: a file record without bytes and sha256")
    extra = {key: value for key, value in data.items() if key not in {*HEADER_KEYS, CHECKSUM_KEY}}
    return ArtifactHeader(found, version, fields["config"], files, fields["library_versions"], extra)


def _format_and_version(data: dict[str, Any], fmt: ArtifactFormat) -> tuple[Any, Any]:
    """(format, version) of a header, and of the layouts before it: `"format": "memvq-store/1"` (store, reader,
    report, training run) or `"format_version": 1` (codec, index)."""
    found = data.get("format")
    if isinstance(found, str) and "version" not in data and "/" in found:
        name, _, version = found.partition("/")
        return name, int(version) if version.isdigit() else version
    if found is None and "format_version" in data:
        return fmt.name, data["format_version"]
    return found, data.get("version")

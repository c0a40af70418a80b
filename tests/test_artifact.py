"""Artifact headers: one layout written and read back, each refusal with a clear message, damaged files caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memvq.encoders.reader_io import load_reader
from memvq.memory.artifact import (
    CHECKSUM_KEY,
    ArtifactError,
    ArtifactFormat,
    ArtifactHeader,
    ManifestError,
    file_record,
    read_artifact,
    write_artifact,
)
from memvq.memory.codecs import CodecLoadError, load_codec
from memvq.memory.index import IndexFileNotFoundError, PassageIndex
from memvq.memory.store import MemoryStore

INDEX = ArtifactFormat("memvq-index", 2, remake="rebuild the store with `memvq build-index`")
READER = ArtifactFormat("memvq-reader", 2, remake="retrain it with `memvq train`")


@pytest.fixture
def artifact(tmp_path: Path) -> tuple[Path, ArtifactHeader]:
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ids.npy").write_bytes(b"ids")
    header = write_artifact(
        tmp_path,
        "index.json",
        INDEX,
        {"factory": "Flat", "nprobe": 16},
        files={"weights.bin": tmp_path / "weights.bin", "sub/ids.npy": file_record(tmp_path / "sub" / "ids.npy")},
        extra={"dim": 8, "ntotal": 3},
    )
    return tmp_path, header


def _write(path: Path, payload: object) -> Path:
    path.write_text(json.dumps(payload))
    return path


def test_round_trip_in_one_layout(artifact: tuple[Path, ArtifactHeader]) -> None:
    root, written = artifact
    on_disk = json.loads((root / "index.json").read_text())
    assert set(on_disk) == {"format", "version", "config", "files", "library_versions", "dim", "ntotal", CHECKSUM_KEY}
    assert (on_disk["format"], on_disk["version"]) == ("memvq-index", 2)
    assert on_disk["files"]["weights.bin"]["bytes"] == 200 and len(on_disk["files"]["sub/ids.npy"]["sha256"]) == 64
    assert {"python", "numpy"} <= set(on_disk["library_versions"])
    header = read_artifact(root / "index.json", INDEX, "passage index header")
    assert header == written and header.to_json() == on_disk
    assert header.config == {"factory": "Flat", "nprobe": 16} and header.extra == {"dim": 8, "ntotal": 3}
    header.verify(root)


def test_a_header_edited_by_hand_or_without_its_checksum_is_refused(artifact: tuple[Path, ArtifactHeader]) -> None:
    path = artifact[0] / "index.json"
    on_disk = json.loads(path.read_text())
    _write(path, on_disk | {"ntotal": 4})
    with pytest.raises(ArtifactError, match=r"fails its own checksum \(header_sha256\): the header was edited"):
        read_artifact(path, INDEX, "passage index header")
    _write(path, {key: value for key, value in on_disk.items() if key != CHECKSUM_KEY})
    with pytest.raises(ArtifactError, match=r"has no header checksum .*written by an older memvq"):
        read_artifact(path, INDEX, "passage index header")
    _write(path, on_disk)
    assert read_artifact(path, INDEX, "passage index header").extra == {"dim": 8, "ntotal": 3}


def test_own_fields_cannot_shadow_the_header(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config"):
        write_artifact(tmp_path, "index.json", INDEX, {}, extra={"config": {}})


def test_missing_and_unreadable_headers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="passage index header not found"):
        read_artifact(tmp_path / "index.json", INDEX, "passage index header")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="is corrupt: not valid JSON"):
        read_artifact(tmp_path / "index.json", INDEX, "passage index header")
    _write(tmp_path / "index.json", [1, 2])
    with pytest.raises(ArtifactError, match="is corrupt: a JSON list"):
        read_artifact(tmp_path / "index.json", INDEX, "passage index header")
    _write(tmp_path / "index.json", {"dim": 8})
    with pytest.raises(ArtifactError, match="not a memvq artifact header"):
        read_artifact(tmp_path / "index.json", INDEX, "passage index header")
    _write(tmp_path / "index.json", {"format": "memvq-index", "version": 2, "config": {}})
    with pytest.raises(ArtifactError, match="corrupt: files, library_versions missing"):
        read_artifact(tmp_path / "index.json", INDEX, "passage index header")


def test_another_format_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "index.json", {"format": "memvq-codec", "version": 2})
    with pytest.raises(ArtifactError, match=r"index\.json is a memvq-codec artifact, expected memvq-index"):
        read_artifact(path, INDEX, "passage index header")


def test_another_version_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "reader.json", {"format": "memvq-reader", "version": 3})
    with pytest.raises(ArtifactError, match=r"memvq-reader version 3 is newer than this memvq reads \(2\)"):
        read_artifact(path, READER, "reader header")
    _write(path, {"format": "memvq-reader", "version": "2"})
    with pytest.raises(ArtifactError, match="not an integer"):
        read_artifact(path, READER, "reader header")
    # the layouts before headers: "format": "name/version" (store, reader, report) and "format_version" (codec, index)
    for old in ({"format": "memvq-reader", "version": 1}, {"format": "memvq-reader/1"}, {"format_version": 1}):
        _write(path, old)
        with pytest.raises(ArtifactError, match=r"version 1 was built by an older memvq .*retrain it with"):
            read_artifact(path, READER, "reader header")


def test_verify_catches_missing_resized_and_damaged_files(artifact: tuple[Path, ArtifactHeader]) -> None:
    root, header = artifact
    weights = root / "weights.bin"
    weights.write_bytes(b"\x00\x02" * 100)  # same size, other bytes
    header.verify(root, checksums=False)
    with pytest.raises(ArtifactError, match=r"weights\.bin fails its sha256 checksum \(sha256 mismatch"):
        header.verify(root)
    weights.write_bytes(b"\x00")
    with pytest.raises(ArtifactError, match=r"weights\.bin has 1 bytes, its memvq-index header says 200"):
        header.verify(root, checksums=False)
    weights.write_bytes(b"\x00\x01" * 100)
    (root / "sub" / "ids.npy").unlink()
    with pytest.raises(ArtifactError, match=r"sub/ids\.npy is listed in its memvq-index header but missing"):
        header.verify(root)


def test_every_artifact_error_is_an_artifact_error() -> None:
    assert issubclass(ManifestError, ArtifactError) and issubclass(CodecLoadError, ArtifactError)
    assert issubclass(IndexFileNotFoundError, ArtifactError) and issubclass(IndexFileNotFoundError, FileNotFoundError)


def test_each_loader_refuses_another_format(tmp_path: Path) -> None:
    def header_of(fmt: str) -> dict[str, object]:
        return {"format": fmt, "version": 2, "config": {}, "files": {}, "library_versions": {}}

    cases = [
        ("codec.json", "memvq-codec", load_codec, CodecLoadError),
        ("index.json", "memvq-index", PassageIndex.load, ArtifactError),
        ("reader.json", "memvq-reader", load_reader, ArtifactError),
        ("manifest.json", "memvq-store", MemoryStore.open, ManifestError),
    ]
    for name, expected, load, error in cases:
        directory = tmp_path / expected
        directory.mkdir()
        for file in ("index.faiss", "ids.npy"):  # the index checks that its files are there first
            (directory / file).write_bytes(b"")
        _write(directory / name, header_of("memvq-eval-report"))
        with pytest.raises(error, match=f"is a memvq-eval-report artifact, expected {expected}"):
            load(directory)

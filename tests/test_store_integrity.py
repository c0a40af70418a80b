"""A damaged store is never read silently: every file's bytes, the manifest's own checksum, its counts against the
shard files, remembered checksums that a rewrite invalidates, a watch that sees files change, `error:` lines."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import flip_byte
from typer.testing import CliRunner

from memvq.memory.artifact import CHECKSUM_KEY, ManifestError, header_checksum, read_artifact
from memvq.memory.integrity import VerifiedFiles
from memvq.memory.store import STORE_FORMAT, MemoryStore, StoreReadError


@pytest.fixture
def store_copy(tiny_store, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(tiny_store[0], copy)
    return copy


def edit_manifest(root: Path, edit, recompute_checksum: bool) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if recompute_checksum:
        manifest[CHECKSUM_KEY] = header_checksum(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "name",
    [
        "shards/shard-00001.codes.npy",
        "shards/shard-00001.offsets.npy",
        "shards/shard-00000.passages.parquet",
        "shards/shard-00002.emb.npy",
        "index/index.faiss",
        "codec/vq.pt",
    ],
)
def test_a_flipped_byte_in_any_file_is_caught_on_open(store_copy, name):
    path = store_copy / name
    assert path.is_file(), sorted(p.name for p in path.parent.iterdir())
    MemoryStore.open(store_copy)  # verified once: its checksums are remembered
    flip_byte(path, at=len(path.read_bytes()) // 2, keep_mtime=True)
    with pytest.raises(ManifestError, match=rf"{name}.* fails its sha256 checksum"):
        MemoryStore.open(store_copy)


def test_an_edited_manifest_fails_its_own_checksum(store_copy):
    def move_row_start(manifest):
        manifest["shards"][1]["row_start"] -= 6

    edit_manifest(store_copy, move_row_start, recompute_checksum=False)
    with pytest.raises(ManifestError, match=r"fails its own checksum .*edited or damaged"):
        MemoryStore.open(store_copy)
    with pytest.raises(ManifestError, match="fails its own checksum"):
        MemoryStore.open(store_copy, verify=False)  # the opt-out skips hashing files, not reading the manifest


def test_a_consistent_looking_forgery_is_caught_by_the_shard_files(store_copy):
    def move_row_start(manifest):
        manifest["shards"][1]["row_start"] -= 6

    edit_manifest(store_copy, move_row_start, recompute_checksum=True)
    with pytest.raises(StoreReadError, match="shard 1 starts at row 10, the shards before it hold 16 passages"):
        MemoryStore.open(store_copy)

    def recount(manifest):
        manifest["shards"][1]["row_start"] += 6
        manifest["shards"][0]["tokens"] += 1
        manifest["num_tokens"] += 1

    edit_manifest(store_copy, recount, recompute_checksum=True)
    with pytest.raises(StoreReadError, match=r"shard 0 disagrees with the manifest: shard-00000\.offsets\.npy"):
        MemoryStore.open(store_copy)


def test_checksums_are_remembered_until_a_file_is_written(store_copy):
    header = read_artifact(store_copy / "manifest.json", STORE_FORMAT, "store manifest")
    first = VerifiedFiles(store_copy)
    header.verify(store_copy, sha256=first.sha256)
    first.save()
    assert first.hashed_bytes == sum(record["bytes"] for record in header.files.values())
    again = VerifiedFiles(store_copy)
    header.verify(store_copy, sha256=again.sha256)
    assert again.hashed_bytes == 0
    codes = store_copy / "shards" / "shard-00000.codes.npy"
    os.utime(codes)  # a touch: hashed again, still matches
    touched = VerifiedFiles(store_copy)
    header.verify(store_copy, sha256=touched.sha256)
    assert touched.hashed_bytes == codes.stat().st_size


def test_the_watch_names_files_changed_under_an_open_store(store_copy):
    store = MemoryStore.open(store_copy)
    assert store.watch is not None and store.watch.changed() == []
    codes = store_copy / "shards" / "shard-00002.codes.npy"
    os.utime(codes)
    assert store.watch.changed() == []  # touched, same bytes
    flip_byte(codes, keep_mtime=True)
    assert store.watch.changed() == ["shards/shard-00002.codes.npy"]
    flip_byte(codes)
    assert store.watch.changed() == []  # restored
    edit_manifest(store_copy, lambda manifest: manifest["shards"][0].update(row_start=1), recompute_checksum=True)
    assert store.watch.changed() == ["manifest.json"]


def query(store: Path, reader: Path, *flags: str):
    from memvq.cli import app

    return CliRunner().invoke(
        app,
        [
            "query",
            "who won the first nobel prize in physics",
            "--store",
            str(store),
            "--model",
            str(reader),
            "--device",
            "cpu",
            *flags,
        ],
    )


def test_query_refuses_a_damaged_store_with_an_error_line(store_copy, tiny_reader_path):
    assert query(store_copy, tiny_reader_path).exit_code == 0
    flip_byte(store_copy / "shards" / "shard-00000.offsets.npy", keep_mtime=True)
    result = query(store_copy, tiny_reader_path)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "shard-00000.offsets.npy fails its sha256" in result.output


@pytest.mark.parametrize("name", ["shards/shard-00000.passages.parquet", "index/index.faiss", "codec/vq.pt"])
def test_unreadable_files_are_error_lines_even_unverified(store_copy, tiny_reader_path, name):
    path = store_copy / name
    path.write_bytes(b"\x00" * path.stat().st_size)  # same size: only hashing would notice
    result = query(store_copy, tiny_reader_path, "--no-verify")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output and path.name in result.output


def test_a_server_stops_answering_when_its_store_changes(store_copy, tiny_reader_path, caplog):
    import time

    from fastapi.testclient import TestClient

    from memvq.pipelines.rag import RAGPipeline
    from memvq.serve.app import create_app
    from memvq.serve.settings import ServeSettings

    pipeline = RAGPipeline.load(store_copy, tiny_reader_path, device="cpu")
    api = create_app(pipeline, ServeSettings(watch_interval_s=0.05), watch=pipeline.store.watch)
    question = {"question": "who won the first nobel prize in physics"}
    with TestClient(api) as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/answer", json=question).status_code == 200
        flip_byte(store_copy / "shards" / "shard-00001.codes.npy", keep_mtime=True)
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["type"] == "store_changed"
        answered = client.post("/v1/answer", json=question)
        assert answered.status_code == 503 and "shards/shard-00001.codes.npy" in answered.json()["error"]["message"]
        for path in ["/metrics", "/v1/models", "/", "/openapi.json"]:  # every route but /healthz says why
            refused = client.get(path)
            assert refused.status_code == 503, path
            assert refused.json()["error"]["type"] in {"store_changed", "server_error"}, path
        assert client.get("/v1/models").json()["error"]["code"] == "store_changed"  # OpenAI's shape there
        assert client.get("/healthz").status_code == 200
    assert "store files changed under the server: shards/shard-00001.codes.npy" in caplog.text

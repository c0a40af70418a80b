"""build-index to a `pyarrow.fs` URI (memory.location): a `file://` URI and a local S3 server (moto) give stores
byte-identical to a local build, resume from what the URI holds, and a two-node Ray cluster whose encoder actors
each work in a directory of their own builds to S3 through pyarrow alone. Real S3, GCS and HDFS are not tested."""

from __future__ import annotations

import logging
import os

import pytest
from conftest import assert_same_store, tiny_config, two_node_cluster

from memvq.memory.artifact import ManifestError
from memvq.memory.location import RemoteStore, fetch_store
from memvq.memory.store import MemoryStore
from memvq.pipelines.build import build_index


def test_a_file_uri_build_matches_a_local_build(tiny_store, tiny_bert_path, mini_corpus, tmp_path):
    local, report = tiny_store
    uri = (tmp_path / "store").as_uri()
    staging = tmp_path / "staging"
    remote_report = build_index(mini_corpus, uri, tiny_config(tiny_bert_path), work_dir=staging)
    assert remote_report.passages == report.passages
    assert_same_store(tmp_path / "store", local)
    assert list(staging.iterdir()) == []  # staging removed once the store is published
    MemoryStore.open(tmp_path / "store")
    # complete: a second run only reads the records at the URI
    assert build_index(mini_corpus, uri, tiny_config(tiny_bert_path), work_dir=staging) == remote_report
    with pytest.raises(ManifestError, match="different config"):
        build_index(mini_corpus, uri, tiny_config(tiny_bert_path, shard_size=8), work_dir=staging)

    with pytest.raises(ManifestError, match=r"is a URI: copy the store to local disk first \(`memvq fetch"):
        MemoryStore.open(uri)
    from typer.testing import CliRunner

    from memvq.cli import app

    fetched = CliRunner().invoke(app, ["fetch", uri, str(tmp_path / "fetched")])
    assert fetched.exit_code == 0 and f"{report.passages:,} passages" in fetched.output, fetched.output
    assert_same_store(tmp_path / "fetched", local)


def test_a_uri_holding_something_else_is_refused(tiny_bert_path, mini_corpus, tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    with pytest.raises(ManifestError, match="not a memvq build directory"):
        build_index(mini_corpus, (tmp_path / "store").as_uri(), tiny_config(tiny_bert_path), work_dir=tmp_path)


# -- a local S3 server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with a bucket `memvq`; yields the URI prefix of the bucket (pyarrow's form for
    a custom endpoint). Dummy credentials are set in the environment, where pyarrow (and Ray's workers) read them."""
    server_module = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[dev])")
    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {
        key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")
    }
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"{host}:{port}"
        pafs.S3FileSystem(
            endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True
        ).create_dir("memvq")
        yield f"s3://memvq/{{}}?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_an_s3_build_fetched_matches_a_local_build_and_resumes(s3, tiny_store, tiny_bert_path, mini_corpus, tmp_path):
    local, report = tiny_store
    uri = s3.format("store")
    config = tiny_config(tiny_bert_path)
    build_index(mini_corpus, uri, config, work_dir=tmp_path / "staging")
    fetched = fetch_store(uri, tmp_path / "fetched")
    assert_same_store(fetched, local)
    store = MemoryStore.open(fetched)
    assert store.num_passages == report.passages

    # killed after some shards: the manifest, the index and the last shards' done markers are not at the URI yet
    remote = RemoteStore(uri)
    names = remote.files()
    lost = [name for name in names if name.endswith(".done.json")][-1:]
    for name in [*lost, "manifest.json", *(name for name in names if name.startswith("index/"))]:
        remote.fs.delete_file(remote.path(name))
    with pytest.raises(ManifestError, match=r"manifest\.json is missing"):
        fetch_store(uri, tmp_path / "unfinished")
    resumed = build_index(mini_corpus, uri, config, work_dir=tmp_path / "staging")
    assert resumed.encode_busy_passages_per_second is None  # a resume: only the lost shard was encoded
    assert_same_store(fetch_store(uri, tmp_path / "resumed"), local)


def test_a_uri_build_without_memory_resumes_without_pulling_its_passages(
    tiny_bert_path, mini_corpus, tmp_path, monkeypatch
):
    uri = (tmp_path / "store").as_uri()
    config = tiny_config(tiny_bert_path, memory=False)
    report = build_index(mini_corpus, uri, config, work_dir=tmp_path / "staging")
    remote = RemoteStore(uri)
    names = remote.files()
    lost = [name for name in names if name.endswith(".done.json")][-1:]
    for name in [*lost, "manifest.json", *(name for name in names if name.startswith("index/"))]:
        remote.fs.delete_file(remote.path(name))
    pulled: list[str] = []
    download = RemoteStore.download
    monkeypatch.setattr(
        RemoteStore, "download", lambda self, name, path: (pulled.append(name), download(self, name, path))[1]
    )
    resumed = build_index(mini_corpus, uri, config, work_dir=tmp_path / "staging")
    assert resumed.encode_busy_passages_per_second is None and resumed.passages == report.passages
    assert "build_config.json" in pulled and not [name for name in pulled if name.endswith(".passages.parquet")]
    store = MemoryStore.open(fetch_store(uri, tmp_path / "fetched"))
    assert not store.has_memory and store.num_passages == report.passages


# -- a two-node cluster, no shared disk ----------------------------------------------------------------------------


@pytest.fixture
def cluster(s3):
    """Two Ray nodes of 1 CPU each on this machine (started after the S3 credentials are in the environment), each
    with a staging directory of its own (MEMVQ_STAGING_DIR in its raylet's environment): `cluster.staging`."""
    with two_node_cluster(staging=True) as started:
        yield started


def test_a_cluster_build_to_s3_uses_no_shared_directory(
    s3, cluster, tiny_store, tiny_bert_path, mini_corpus, tmp_path, caplog
):
    """Each encoder actor stages its shards in a directory of its own, under its node's MEMVQ_STAGING_DIR, uploads
    them and leaves the directory empty; the driver's staging ends empty too."""
    caplog.set_level(logging.INFO, logger="memvq.pipelines")
    uri = s3.format("cluster-store")
    build_index(mini_corpus, uri, tiny_config(tiny_bert_path), ray_address=cluster.address, work_dir=tmp_path)
    assert "2 actors (1 CPU each) on 2 nodes" in caplog.text  # which of them encoded how many shards is timing
    assert list(tmp_path.iterdir()) == []
    for staging in cluster.staging:  # made by each node's actor when it started, emptied after each shard
        assert staging.is_dir() and list(staging.iterdir()) == []
    assert_same_store(fetch_store(uri, tmp_path / "fetched"), tiny_store[0])

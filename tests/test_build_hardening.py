"""build-index against hostile use: another corpus on resume, duplicate document ids, giant words, killed builds'
Ray processes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import assert_same_store, flip_byte, tiny_config
from typer.testing import CliRunner

from memvq.cli import app
from memvq.data.ingest.corpus import iter_documents
from memvq.data.ingest.passages import ChunkReport, chunk_document
from memvq.data.ingest.sources import Document, IngestReport
from memvq.memory.artifact import ManifestError
from memvq.memory.store import MemoryStore
from memvq.pipelines import local_ray
from memvq.pipelines.build import build_index


def kilt_line(wid: str, paragraphs: list[str]) -> str:
    return json.dumps({"wikipedia_id": wid, "wikipedia_title": f"Page {wid}", "text": [f"Page {wid}", *paragraphs]})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -- 1. a store is built from one corpus --------------------------------------------------------------------------


def test_finished_store_refuses_another_corpus(tiny_store, mini_corpus, tmp_path):
    out = tiny_store[0]
    record = json.loads((out / "manifest.json").read_text())["corpus"]
    assert record["path"] == str(mini_corpus.resolve())
    assert record["files"] == [
        {
            "path": str(mini_corpus.resolve()),
            "bytes": mini_corpus.stat().st_size,
            "sha256": hashlib.sha256(mini_corpus.read_bytes()).hexdigest(),
        }
    ]
    other = write_lines(tmp_path / "other.jsonl", [kilt_line("1", ["one two three"])])
    args = ["build-index", "--corpus", str(other), "--out", str(out), "--config", str(out / "build_config.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"error: {out} was built from {mini_corpus.resolve()} (sha256 {record['files'][0]['sha256'][:16]}" in (
        result.output
    )
    assert f"not {other}" in result.output and f"remove {out} or pass another --out" in result.output


def test_interrupted_build_resumes_only_from_the_same_bytes(tiny_bert_path, mini_corpus, tmp_path, monkeypatch):
    from memvq.pipelines import build

    out, config = tmp_path / "store", tiny_config(tiny_bert_path)

    def killed(*args, **kwargs):
        raise RuntimeError("killed after planning")

    with monkeypatch.context() as patch:
        patch.setattr(build.Encoders, "load", killed)
        with pytest.raises(RuntimeError, match="killed"):
            build_index(mini_corpus, out, config)
    assert (out / "plan.json").is_file() and not (out / "manifest.json").exists()

    data = mini_corpus.read_bytes()
    shorter = tmp_path / "shorter.jsonl"
    shorter.write_bytes(data[: data.index(b"\n") + 1])
    with pytest.raises(ManifestError, match=rf"built from {mini_corpus.resolve()} .*not {shorter} \(1 file"):
        build_index(shorter, out, config)
    same_size = tmp_path / "same-size.jsonl"
    same_size.write_bytes(data.replace(b"Nobel", b"Novel", 1))
    digest = hashlib.sha256(same_size.read_bytes()).hexdigest()
    with pytest.raises(ManifestError, match=rf"not {same_size} \(sha256 {digest[:16]}"):
        build_index(same_size, out, config)

    moved = tmp_path / "moved" / "mini.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(data)
    report = build_index(moved, out, config)  # the same bytes at another path: the same corpus
    assert report.documents == 40
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus"]["path"] == str(mini_corpus.resolve())


def _killed_after_encoding(store: Path) -> None:
    """What a build killed after encoding leaves: its shards and done markers, no index, no manifest."""
    (store / "manifest.json").unlink()
    for path in (store / "index").iterdir():
        path.unlink()


@pytest.mark.parametrize("damage", ["a shard file", "the sha256 in its marker", "its marker's JSON"])
def test_a_resume_encodes_again_the_done_shards_that_fail_their_markers(
    damage, tiny_store, tiny_bert_path, mini_corpus, tmp_path, caplog
):
    reference = tiny_store[0]
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    _killed_after_encoding(out)
    marker = out / "shards" / "shard-00001.done.json"
    if damage == "a shard file":
        flip_byte(out / "shards" / "shard-00001.codes.npy")
    elif damage == "the sha256 in its marker":
        done = json.loads(marker.read_text())
        done["files"]["shards/shard-00001.emb.npy"]["sha256"] = "0" * 64
        marker.write_text(json.dumps(done))
    else:
        marker.write_text(marker.read_text()[:-5])
    with caplog.at_level("WARNING", logger="memvq.pipelines.indexing.kept"):
        report = build_index(mini_corpus, out, tiny_config(tiny_bert_path))
    kept = [record.getMessage() for record in caplog.records if record.name == "memvq.pipelines.indexing.kept"]
    assert [message.split(":")[0] for message in kept] == ["shard 1 is encoded again"]
    assert report.encode_busy_passages_per_second is None  # a resume
    assert_same_store(out, reference)
    MemoryStore.open(out)


def test_a_finished_store_that_fails_its_check_is_not_called_complete(
    tiny_store, tiny_bert_path, mini_corpus, tmp_path
):
    out = tmp_path / "store"
    shutil.copytree(tiny_store[0], out)
    flip_byte(out / "shards" / "shard-00000.emb.npy")
    with pytest.raises(ManifestError, match=r"fails its check \(it was finished before.*shard-00000\.emb\.npy"):
        build_index(mini_corpus, out, tiny_config(tiny_bert_path))


def test_a_store_without_its_manifest_says_to_finish_the_build(tiny_store, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(tiny_store[0], out)
    (out / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"has no store manifest .*run the same build-index command again"):
        MemoryStore.open(out)


# -- 2. duplicate document ids --------------------------------------------------------------------------------------


def test_duplicate_doc_ids_are_bad_records_with_their_positions(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_lines(
        corpus / "a.jsonl",
        [
            json.dumps({"id": "1", "title": "One", "text": "first text"}),
            json.dumps({"id": "2", "title": "Two", "text": "second text"}),
            json.dumps({"id": 1, "title": "One again", "text": "other text"}),
        ],
    )
    write_lines(corpus / "b.tsv", ["id\ttext\ttitle", "3\tthird text\tThree", "2\tanother second\tTwo"])
    report = IngestReport()
    documents = list(iter_documents(corpus, report=report))
    assert [(doc.doc_id, doc.paragraphs) for doc in documents] == [
        ("1", ["first text"]),
        ("2", ["second text"]),
        ("3", ["third text"]),
    ]
    assert report.documents == 3 and report.duplicate_ids == 2
    assert [(Path(bad.path).name, bad.line) for bad in report.bad_records] == [("a.jsonl", 3), ("b.tsv", 3)]
    assert all("duplicate document id" in bad.reason for bad in report.bad_records)


def test_build_counts_duplicates_and_cut_words_and_stores_each_document_once(tiny_bert_path, tmp_path):
    giant = "x" * 30_000
    corpus = write_lines(
        tmp_path / "hostile.jsonl",
        [
            kilt_line("a", ["alpha beta gamma"]),
            kilt_line("b", [f"before {giant} after"]),
            kilt_line("a", ["a different text with the same id"]),
        ],
    )
    out = tmp_path / "store"
    report = build_index(corpus, out, tiny_config(tiny_bert_path))
    assert (report.documents, report.bad_records, report.duplicate_ids, report.split_words) == (2, 1, 1, 1)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["bad_record_examples"] == [f"{corpus}:3: duplicate document id 'a' (an earlier document has it; kept)"]
    store = MemoryStore.open(out)
    passages = store.passages(range(store.num_passages))
    assert [p["text"] for p in passages if p["doc_id"] == "a"] == ["alpha beta gamma"]
    assert max(len(p["text"]) for p in passages) <= 2000
    pieces = [w for p in passages if p["doc_id"] == "b" for w in p["text"].split(" ")]
    assert pieces[0] == "before" and pieces[-1] == "after" and "".join(pieces[1:-1]) == giant


# -- 3. passages are capped in words and characters -----------------------------------------------------------------


def assert_capped(doc: Document, words: int, chars: int, **kwargs) -> list[str]:
    """Chunk `doc`; check every passage's limits and provenance; return the pieces (words) in order."""
    passages = list(chunk_document(doc, words_per_passage=words, **kwargs))
    for p in passages:
        assert len(p.text) <= chars and len(p.text.split(" ")) <= words
        first, last = p.text.split(" ")[0], p.text.split(" ")[-1]
        assert doc.paragraphs[p.start_paragraph_id][p.start_character :].startswith(first)
        assert doc.paragraphs[p.end_paragraph_id][: p.end_character].endswith(last)
    return [w for p in passages for w in p.text.split(" ")]


def test_a_million_character_word_is_cut_into_capped_passages():
    giant = "y" * 1_000_000
    doc = Document("d", "T", ["T", f"some words {giant} then more"])
    report = ChunkReport()
    pieces = assert_capped(doc, 100, 2000, report=report)
    assert pieces[:2] == ["some", "words"] and pieces[-2:] == ["then", "more"]
    assert "".join(pieces[2:-2]) == giant and len(pieces) == 4 + 500
    assert report.split_words == 1
    assert len(assert_capped(doc, 100, 300, max_passage_chars=300)) == 4 + -(-1_000_000 // 300)


def test_text_without_spaces_and_long_words_stay_under_the_character_cap():
    cjk = "漢字かな交じり文" * 5_000  # 40,000 characters, no whitespace
    report = ChunkReport()
    pieces = assert_capped(Document("j", "T", [cjk]), 100, 2000, report=report)
    assert "".join(pieces) == cjk and report.split_words == 1
    # 100 words of 50 characters each fit the word limit but not the character limit (5,099 characters)
    long_words = " ".join(f"{i:050d}" for i in range(100))
    pieces = assert_capped(Document("l", "T", [long_words]), 100, 2000)
    assert pieces == long_words.split(" ")
    # ordinary text is cut by words as before
    assert [len(p.text.split()) for p in chunk_document(Document("o", "T", [" ".join(["word"] * 250)]))] == [
        100,
        100,
        50,
    ]
    with pytest.raises(ValueError, match="max_passage_chars"):
        chunk_document(Document("o", "T", ["x"]), max_passage_chars=0)


# -- 4. no Ray processes outlive a build ----------------------------------------------------------------------------


def start_cli_build(config: Path, corpus: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "memvq.cli", "build-index", "--corpus", str(corpus), "--out", str(out)]
    return subprocess.Popen([*command, "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ray_processes_once_encoding(driver: subprocess.Popen, timeout_s: float = 120) -> list[psutil.Process]:
    """The driver's descendants once its shard encoder actor runs (Ray is up: raylet, agents, workers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the build ended before its Ray was up"
        children = psutil.Process(driver.pid).children(recursive=True)
        names = []
        for child in children:
            try:
                names.append(" ".join(child.cmdline()))
            except psutil.Error:
                continue
        if any("ShardEncoder" in name for name in names):
            return children
        time.sleep(0.1)
    raise AssertionError("the build's Ray never started its shard encoder")


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def alive(processes: list[psutil.Process], grace_s: float) -> list[str]:
    """Those of `processes` still running (not zombies) after up to `grace_s` seconds."""
    deadline = time.monotonic() + grace_s
    while True:
        left = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{process.pid} {process.name()}")
            except psutil.Error:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.fixture
def cli_config(tiny_bert_path, tmp_path) -> Path:
    """A tiny-BERT build config file with 4-passage shards (encoding outlasts Ray's start)."""
    path = tmp_path / "build.json"
    path.write_text(json.dumps(tiny_config(tiny_bert_path, shard_size=4).to_json()))
    return path


def test_the_next_build_stops_what_a_killed_build_left_of_its_ray(cli_config, tiny_bert_path, mini_corpus, tmp_path):
    """SIGKILL a CLI build once Ray is up: its encoder actors stop within seconds; Ray's agents outlive it, and the
    next build (of any store) stops them."""
    out = tmp_path / "store"
    driver = start_cli_build(cli_config, mini_corpus, out)
    try:
        processes = ray_processes_once_encoding(driver)
        encoders = [process for process in processes if "ShardEncoder" in " ".join(_cmdline(process))]
    finally:
        driver.kill()
        driver.wait()
    assert encoders and alive(encoders, grace_s=15) == []
    assert not (out / "manifest.json").exists()
    build_index(mini_corpus, out, tiny_config(tiny_bert_path, shard_size=4))
    assert alive(processes, grace_s=10) == []
    assert not list(Path(local_ray.tempfile.gettempdir()).glob(f"{local_ray.DIR_PREFIX}{driver.pid}-*"))


def test_sigterm_stops_the_builds_ray(cli_config, mini_corpus, tmp_path):
    driver = start_cli_build(cli_config, mini_corpus, tmp_path / "store")
    try:
        processes = ray_processes_once_encoding(driver)
        os.kill(driver.pid, signal.SIGTERM)
        assert driver.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        driver.kill()
        driver.wait()
    assert alive(processes, grace_s=5) == []
    assert not list(Path(local_ray.tempfile.gettempdir()).glob(f"{local_ray.DIR_PREFIX}{driver.pid}-*"))


def test_orphan_sweep_spares_running_builds(tmp_path):
    """Only the Ray directories of drivers that are gone are swept; a running build's is left alone."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    me = os.getpid()
    dirs = {
        "orphaned": tmp_path / f"{local_ray.DIR_PREFIX}{gone.pid}-1",
        "running": tmp_path / f"{local_ray.DIR_PREFIX}{me}-{local_ray.start_time(me)}",
    }
    holders = {}
    for name, directory in dirs.items():
        directory.mkdir()
        with open(directory / "raylet.out", "w") as log:  # a process holding a file there, as Ray's do
            holders[name] = psutil.Popen(["sleep", "60"], stdout=log)
    try:
        local_ray.stop_orphaned_ray(tmp_path)
        assert alive([holders["orphaned"]], grace_s=5) == [] and not dirs["orphaned"].exists()
        assert holders["running"].is_running() and dirs["running"].is_dir()
    finally:
        for holder in holders.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                holder.kill()
            holder.wait()


# -- 5. an encoder's own error is the build's, in one line -------------------------------------------------------------


def test_a_full_disk_is_named_with_the_path(tmp_path):
    from memvq.memory.artifact import save_npy

    def short_write(*args, **kwargs):
        raise OSError("329616 requested and 40832 written")  # what numpy says when the disk fills

    path = tmp_path / "shards" / "shard-00000.codes.npy"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("numpy.save", short_write)
        with pytest.raises(OSError, match=rf"no space left on the device writing {path} \([\d,]+ bytes free") as raised:
            save_npy(path, np.zeros(3))
    assert raised.value.errno == errno.ENOSPC and not list(path.parent.iterdir())  # no temporary file left


def test_an_encoder_actors_error_reaches_the_build_as_raised(tiny_bert_path, monkeypatch):
    import ray
    from ray.exceptions import RayTaskError

    from memvq.pipelines.indexing.actors import _ActorPool

    full = OSError(errno.ENOSPC, "no space left on the device writing /store/shards/shard-00003.codes.npy")

    def get(ref):
        raise RayTaskError("ShardEncoder.encode", "Traceback (most recent call last): ...", full).as_instanceof_cause()

    monkeypatch.setattr(ray, "get", get)
    pool = _ActorPool(slots=[], root="/store", config=tiny_config(tiny_bert_path), todo=[], done=lambda shard: None)
    with pytest.raises(OSError) as raised:
        pool._collect(object(), object(), 3)
    assert raised.value is full and "Traceback" not in str(raised.value)

"""Store generations: `memvq update` (add, replace, delete) and `memvq compact` equal a rebuild, resume to the same
files, keep the previous generation when interrupted, refuse a second writer, and never retrieve a deleted page."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import flip_byte, tiny_config
from test_build import run_cli

from memvq.memory.artifact import ManifestError
from memvq.memory.store import MemoryStore
from memvq.pipelines import update as update_module
from memvq.pipelines.build import build_index
from memvq.pipelines.compact import compact_store
from memvq.pipelines.generations import StoreBusyError, writer_lock
from memvq.pipelines.rag import RAGPipeline
from memvq.pipelines.update import update_store
from memvq.retrieval.retriever import Retriever

QUESTIONS = [
    "who got the first nobel prize in physics",
    "when was the eiffel tower built",
    "who wrote the declaration of independence",
    "what is the capital of australia",
    "how many players are on a soccer team",
    "when did world war 2 end",
]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, pages: list[dict]) -> Path:
    path.write_text("".join(json.dumps(page) + "\n" for page in pages))
    return path


@pytest.fixture(scope="module")
def corpora(mini_corpus, tmp_path_factory) -> dict:
    """X: 30 pages; Y: 6 new pages; R: 3 of X's pages with new text; D: 4 of X's ids and 2 unknown ones; and the
    corpus a rebuild reads: X less D, R in place of its pages, then Y."""
    pages = _lines(mini_corpus)
    root = tmp_path_factory.mktemp("corpora")
    x, y = pages[:30], pages[30:36]
    replaced = {
        page["wikipedia_id"]: {**page, "text": [*page["text"][:1], "A new paragraph about it."]} for page in x[5:8]
    }
    r = list(replaced.values())
    deleted = [page["wikipedia_id"] for page in x[10:14]]
    (root / "delete.txt").write_text("\n".join([*deleted, "no-such-page", "  ", "another-unknown"]) + "\n")
    rebuilt = [replaced.get(page["wikipedia_id"], page) for page in x if page["wikipedia_id"] not in deleted] + y
    return {
        "x": _write(root / "x.jsonl", x),
        "y": _write(root / "y.jsonl", y),
        "r": _write(root / "r.jsonl", r),
        "delete": root / "delete.txt",
        "rebuilt": _write(root / "rebuilt.jsonl", rebuilt),
        "deleted_ids": deleted,
    }


@pytest.fixture(scope="module")
def updated(tiny_bert_path, corpora, tmp_path_factory) -> tuple[Path, object]:
    """Store A: built from X, then updated with Y and R added and D deleted (one update)."""
    out = tmp_path_factory.mktemp("gens") / "a"
    build_index(corpora["x"], out, tiny_config(tiny_bert_path))
    report = update_store(out, [corpora["y"], corpora["r"]], corpora["delete"])
    return out, report


@pytest.fixture(scope="module")
def rebuilt(tiny_bert_path, corpora, updated, tmp_path_factory) -> Path:
    """Store B: built from scratch from (X - D) with R and Y, with A's codec."""
    out = tmp_path_factory.mktemp("gens") / "b"
    build_index(corpora["rebuilt"], out, tiny_config(tiny_bert_path), codec_from=updated[0] / "codec")
    return out


def _by_passage(store: MemoryStore) -> dict[str, tuple]:
    """passage_id -> (record without the row, codes, embedding) of every searchable passage."""
    live = np.setdiff1d(np.arange(store.num_rows), store.deleted_rows())
    records = store.passages(live)
    codes, mask = store.get(live)
    emb = {}
    for shard, start, _ in store.shard_rows():
        for i, vector in enumerate(np.asarray(store.embeddings(shard))):
            emb[start + i] = vector
    out = {}
    for i, (row, record) in enumerate(zip(live.tolist(), records, strict=True)):
        record = {key: value for key, value in record.items() if key != "row"}
        out[record["passage_id"]] = (record, codes[i][mask[i]].tobytes(), emb[row].tobytes())
    return out


def test_the_update_reports_what_it_did(updated, corpora):
    store, report = updated
    assert (report.generation, report.documents_added, report.documents_replaced) == (1, 6, 3)
    assert (report.documents_deleted, report.unknown_ids) == (4, 2)
    assert report.unknown_examples == ["no-such-page", "another-unknown"]
    assert report.documents == 30 + 6 - 4
    opened = MemoryStore.open(store)
    assert opened.generation == 1 and opened.manifest["parent"]["generation"] == 0
    assert opened.num_passages == opened.num_rows - len(opened.deleted_rows()) == opened.index.ntotal
    assert (store / "generations" / "00000" / "manifest.json").is_file()


def test_an_update_equals_a_rebuild(updated, rebuilt):
    """The same passages, the same memory codes and embeddings per passage, the same top-20 (ids and scores), and the
    same answers for every question."""
    a, b = MemoryStore.open(updated[0]), MemoryStore.open(rebuilt)
    assert a.num_passages == b.num_passages and a.num_tokens - b.num_tokens >= 0
    assert _by_passage(a) == _by_passage(b)
    hits_a = Retriever.for_store(a).search(QUESTIONS, 20)
    hits_b = Retriever.for_store(b).search(QUESTIONS, 20)
    assert [[(p.passage_id, p.score) for p in hits] for hits in hits_a] == [
        [(p.passage_id, p.score) for p in hits] for hits in hits_b
    ]


def test_an_updated_store_answers_as_the_rebuilt_one(updated, rebuilt, tiny_reader_path):
    answers = [
        [
            (r.answer, [p.passage_id for p in r.passages])
            for r in RAGPipeline.load(store, tiny_reader_path, device="cpu").answer(QUESTIONS)
        ]
        for store in (updated[0], rebuilt)
    ]
    assert answers[0] == answers[1]


def test_a_deleted_page_is_never_retrieved(updated, corpora):
    store = MemoryStore.open(updated[0])
    retriever = Retriever.for_store(store)
    titles = {page["wikipedia_id"]: page["wikipedia_title"] for page in _lines(corpora["x"])}
    hits = retriever.search([titles[doc] for doc in corpora["deleted_ids"]], store.num_passages)
    found = {p.wikipedia_id for question in hits for p in question}
    assert not found & set(corpora["deleted_ids"])
    assert len(hits[0]) == store.num_passages  # every searchable passage, and no deleted one


def test_compact_equals_the_rebuild_and_frees_the_deleted_rows(updated, rebuilt, tmp_path):
    store = tmp_path / "a"
    shutil.copytree(updated[0], store)
    before = MemoryStore.open(store)
    dropped = len(before.deleted_rows())
    report = compact_store(store, grace_s=0)
    after = MemoryStore.open(store)
    assert report is not None and report.rows_dropped == dropped > 0
    assert report.bytes_freed > 0 and report.bytes_after < report.bytes_before
    assert after.generation == 2 and after.num_rows == after.num_passages == before.num_passages
    assert len(after.deleted_rows()) == 0
    b = MemoryStore.open(rebuilt)
    assert _by_passage(after) == _by_passage(b)
    hits = [Retriever.for_store(s).search(QUESTIONS, 20) for s in (after, b)]
    assert [[(p.passage_id, p.score) for p in q] for q in hits[0]] == [
        [(p.passage_id, p.score) for p in q] for q in hits[1]
    ]
    named = set(after.manifest["files"])
    on_disk = {p.relative_to(store).as_posix() for p in (store / "shards").glob("*.npy")}
    assert on_disk <= named, "compact leaves no shard file the store does not name"
    assert compact_store(store, grace_s=0) is None  # nothing left to drop


@pytest.fixture(scope="module")
def base(tiny_bert_path, corpora, tmp_path_factory) -> tuple[Path, Path]:
    """Store X as built, and a copy of it updated (Y added, D deleted) without interruption."""
    root = tmp_path_factory.mktemp("faults")
    build_index(corpora["x"], root / "base", tiny_config(tiny_bert_path))
    shutil.copytree(root / "base", root / "uninterrupted")
    update_store(root / "uninterrupted", [corpora["y"]], corpora["delete"])
    return root / "base", root / "uninterrupted"


class Killed(BaseException):
    """Stands for a kill at a step's boundary (what is on disk then is what a SIGKILL there leaves)."""


@pytest.mark.parametrize("step", ["encode_all_shards", "_index", "publish", "prune"])
def test_an_interrupted_update_keeps_the_previous_generation_and_resumes_to_the_same_files(
    base, corpora, tmp_path, monkeypatch, step
):
    store = tmp_path / "interrupted"
    shutil.copytree(base[0], store)
    original = getattr(update_module, step)

    def killed(*args, **kwargs):
        if step == "encode_all_shards":
            original(*args, **kwargs)  # the shards encoded, then killed before the index
        raise Killed(step)  # "prune": killed after the publish, so the store is at the new generation

    monkeypatch.setattr(update_module, step, killed)
    with pytest.raises(Killed):
        update_store(store, [corpora["y"]], corpora["delete"])
    monkeypatch.setattr(update_module, step, original)
    still = MemoryStore.open(store)
    assert still.generation == (1 if step == "prune" else 0)
    if step != "prune":
        assert still.num_passages == MemoryStore.open(base[0]).num_passages
        assert still.manifest["files"] == MemoryStore.open(base[0]).manifest["files"]

    update_store(store, [corpora["y"]], corpora["delete"])
    resumed, reference = MemoryStore.open(store), MemoryStore.open(base[1])
    assert resumed.generation == 1
    assert resumed.manifest["files"] == reference.manifest["files"]
    again = update_store(store, [corpora["y"]], corpora["delete"])
    assert again.generation == 1, "the same update run again after it published is already applied"


def test_an_update_killed_while_encoding_resumes_and_the_old_generation_serves_meanwhile(base, corpora, tmp_path):
    """SIGKILL `memvq update` while its encoder actors run: the store opens at its previous generation and answers;
    run again, the update ends with the uninterrupted update's files, and no lock is left behind."""
    store = tmp_path / "killed"
    shutil.copytree(base[0], store)
    args = ["--store", str(store), "--add", str(corpora["y"]), "--delete", str(corpora["delete"])]
    process = run_cli("update", *args)
    deadline = time.monotonic() + 240
    while not (store / "generations" / "00001" / "plan.json").is_file():
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "the update never planned"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert MemoryStore.open(store).generation == 0
    assert Retriever.for_store(MemoryStore.open(store)).search(QUESTIONS[:1], 3)[0]
    process = run_cli("update", *args)
    output = process.communicate(timeout=400)[0].decode()
    assert process.returncode == 0, output
    assert "generation 1" in output and "unknown ids" in output
    assert MemoryStore.open(store).manifest["files"] == MemoryStore.open(base[1]).manifest["files"]


def test_a_second_writer_is_refused(updated):
    with (
        writer_lock(MemoryStore.open(updated[0]).layout, "update"),
        pytest.raises(StoreBusyError, match="one writer at a time"),
    ):
        compact_store(updated[0])


def test_a_damaged_file_of_a_new_generation_is_refused_at_open(updated, tmp_path):
    store = tmp_path / "a"
    shutil.copytree(updated[0], store)
    index = MemoryStore.open(store).manifest["index"]
    flip_byte(store / index / "ids.npy")
    with pytest.raises(ManifestError, match=r"ids\.npy"):
        MemoryStore.open(store)


def test_a_server_under_load_switches_generations_without_failing_a_request(
    tiny_bert_path, corpora, tiny_reader_path, tmp_path
):
    """Five updates land while clients ask: every request is answered (200), each from one whole generation (its
    passages are exactly one generation's), and none from an older generation than /readyz already named."""
    import httpx
    from test_serve_hardening import live

    from memvq.serve.app import create_app
    from memvq.serve.settings import ServeSettings

    store = tmp_path / "served"
    build_index(corpora["x"], store, tiny_config(tiny_bert_path))
    pages = _lines(corpora["x"])
    new = _lines(corpora["y"])
    generations = [{p["wikipedia_id"] for p in pages}]
    steps = []
    for i in range(5):
        (tmp_path / f"delete-{i}.txt").write_text(pages[i]["wikipedia_id"] + "\n")
        steps.append((_write(tmp_path / f"add-{i}.jsonl", [new[i]]), tmp_path / f"delete-{i}.txt"))
        generations.append(generations[-1] - {pages[i]["wikipedia_id"]} | {new[i]["wikipedia_id"]})
    rag = RAGPipeline.load(store, tiny_reader_path, device="cpu")
    settings = ServeSettings(watch_interval_s=0.2, max_top_k=1000)
    seen: list[tuple[int, int, frozenset]] = []  # (generation /readyz named before sending, status, pages)
    named = [0]
    stop = False

    def ask(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop:
                before = named[0]
                response = client.post("/v1/retrieve", json={"question": "nobel prize in physics", "top_k": 1000})
                pages = frozenset(p["wikipedia_id"] for p in response.json().get("passages", []))
                seen.append((before, response.status_code, pages))

    with live(create_app(rag, settings, watch=rag.store.watch)) as url:
        import threading

        clients = [threading.Thread(target=ask, args=(url,)) for _ in range(3)]
        for thread in clients:
            thread.start()
        for generation, (add, delete) in enumerate(steps, start=1):
            update_store(store, [add], delete)
            while httpx.get(f"{url}/readyz").json().get("generation") != generation:
                time.sleep(0.05)
            named[0] = generation
            time.sleep(0.3)
        models = httpx.get(f"{url}/v1/models").json()
        stop = True
        for thread in clients:
            thread.join()
    assert models["data"][0]["generation"] == 5
    assert {status for _, status, _ in seen} == {200}
    answered = [generations.index(set(pages)) if set(pages) in generations else None for _, _, pages in seen]
    assert None not in answered, "a response mixed passages of two generations"
    assert all(got >= before for (before, _, _), got in zip(seen, answered, strict=True))
    assert set(answered) == {0, 1, 2, 3, 4, 5}


@pytest.mark.slow
def test_a_minilm_update_equals_a_rebuild_on_the_shared_corpus(shared_data, corpora, tmp_path):
    """The embedded MiniLM (its shipped codec) on the shared mini corpus: an updated store and the rebuild give the
    same passages, codes, embeddings, top-20 and answers of the embedded reader for every NQ dev question whose page
    either store holds."""
    from memvq.pipelines.config import BuildConfig

    config = BuildConfig.model_validate({"shard_size": 64})
    updated, rebuilt = tmp_path / "updated", tmp_path / "rebuilt"
    build_index(corpora["x"], updated, config)
    report = update_store(updated, [corpora["y"], corpora["r"]], corpora["delete"])
    assert (report.documents_added, report.documents_replaced, report.documents_deleted) == (6, 3, 4)
    build_index(corpora["rebuilt"], rebuilt, config, codec_from=updated / "codec")
    a, b = MemoryStore.open(updated), MemoryStore.open(rebuilt)
    assert _by_passage(a) == _by_passage(b)
    pages = {page["wikipedia_id"] for page in _lines(corpora["rebuilt"])}
    questions = []
    for line in (shared_data / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl").read_text().splitlines():
        record = json.loads(line)
        if any(p.get("wikipedia_id") in pages for out in record["output"] for p in out.get("provenance", [])):
            questions.append(record["input"])
    assert len(questions) >= 20
    hits = [Retriever.for_store(store).search(questions, 20) for store in (a, b)]
    assert [[(p.passage_id, p.score) for p in q] for q in hits[0]] == [
        [(p.passage_id, p.score) for p in q] for q in hits[1]
    ]
    answers = [[r.answer for r in RAGPipeline.load(store).answer(questions)] for store in (updated, rebuilt)]
    assert answers[0] == answers[1]
    assert sum(answer is not None for answer in answers[0]) > len(questions) // 2

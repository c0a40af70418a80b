"""The lexical (BM25) index in the store and the three retrieval modes: built, verified and resumable like the rest
of the store; lexical and hybrid retrieval find a passage that shares only a rare word with its question; the modes
through the pipeline, the API and a store update."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import flip_byte, store_bytes, tiny_config

from memvq.memory.artifact import ManifestError
from memvq.memory.store import MemoryStore
from memvq.pipelines.build import build_index
from memvq.pipelines.update import update_store
from memvq.retrieval.lexical import LexicalIndex
from memvq.retrieval.retriever import FUSION, Fusion, Retriever, reciprocal_rank_fusion, score_fusion, topped_up

RARE = {
    "wikipedia_id": "Quokka",
    "wikipedia_title": "Quokka",
    "text": ["Quokka", "The quokka is a small macropod about the size of a domestic cat, found on Rottnest Island."],
}
QUESTION = "where does the quokka live"


@pytest.fixture(scope="module")
def lexical_store(tiny_bert_path, mini_corpus, tmp_path_factory) -> Path:
    """The 40 shared pages and one page whose title word no other page has, built with the tiny random BERT (its
    dense retrieval is no better than chance: what finds the page is its word)."""
    root = tmp_path_factory.mktemp("lexical")
    corpus = root / "corpus.jsonl"
    corpus.write_text(mini_corpus.read_text() + json.dumps(RARE) + "\n")
    build_index(corpus, root / "store", tiny_config(tiny_bert_path))
    return root / "store"


def test_the_build_keeps_a_verified_lexical_index(lexical_store, tmp_path):
    store = MemoryStore.open(lexical_store)
    assert store.lexical_dir == lexical_store / "lexical"
    named = [name for name in store.manifest["files"] if name.startswith("lexical/")]
    assert "lexical/lexical.json" in named and len(named) >= 4
    copy = tmp_path / "store"
    shutil.copytree(lexical_store, copy)
    flip_byte(copy / sorted(name for name in named if name.endswith(".npy"))[0])
    with pytest.raises(ManifestError, match="lexical/"):
        MemoryStore.open(copy)


def test_a_build_stopped_before_its_lexical_index_resumes_to_the_same_files(lexical_store, tiny_bert_path, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(lexical_store, copy)
    (copy / "manifest.json").unlink()
    shutil.rmtree(copy / "lexical")
    corpus = Path(json.loads((lexical_store / "corpus.json").read_text())["path"])
    build_index(corpus, copy, tiny_config(tiny_bert_path))
    assert store_bytes(copy) == store_bytes(lexical_store)


def test_lexical_and_hybrid_find_the_page_only_its_word_names(lexical_store):
    store = MemoryStore.open(lexical_store)
    retriever = Retriever.for_store(store)
    assert retriever.mode == "hybrid"  # the store's default: auto, with a BM25 index
    lexical = retriever.search([QUESTION], 5, "lexical")[0]
    hybrid = retriever.search([QUESTION], 5, "hybrid")[0]
    assert lexical[0].wikipedia_id == "Quokka" and len(lexical) == 5  # the rest: dense passages after the match
    assert "Quokka" in {p.wikipedia_id for p in hybrid}
    retriever.fusion = Fusion("rrf", 0.1)
    assert "Quokka" in {p.wikipedia_id for p in retriever.search([QUESTION], 5, "hybrid")[0]}
    retriever.fusion = FUSION
    dense_rank = [p.wikipedia_id for p in retriever.search([QUESTION], store.num_passages, "dense")[0]]
    assert dense_rank[0] != "Quokka", "the tiny model's dense retrieval must not rank it first by itself"
    # every mode scores a passage by its dense inner product (the reader's confidence scale)
    by_row = {p.row: p.score for p in retriever.search([QUESTION], store.num_passages, "dense")[0]}
    assert all(np.isclose(p.score, by_row[p.row], atol=1e-5) for p in hybrid)


def test_unknown_modes_and_stores_without_the_index_are_clear_errors(
    lexical_store, tiny_bert_path, mini_corpus, tmp_path
):
    retriever = Retriever.for_store(MemoryStore.open(lexical_store))
    with pytest.raises(ValueError, match="unknown retrieval mode 'sparse'"):
        retriever.search([QUESTION], 3, "sparse")  # type: ignore[arg-type]
    build_index(mini_corpus, tmp_path / "dense-only", tiny_config(tiny_bert_path, lexical=False))
    dense_only = Retriever.for_store(MemoryStore.open(tmp_path / "dense-only"))
    assert dense_only.mode == "dense"  # auto, without a BM25 index
    with pytest.raises(ValueError, match="needs the BM25 index, but this build keeps none"):
        build_index(mini_corpus, tmp_path / "refused", tiny_config(tiny_bert_path, lexical=False, retrieval="hybrid"))
    assert dense_only.search([QUESTION], 3, "dense")
    with pytest.raises(ValueError, match="has none"):
        dense_only.search([QUESTION], 3, "hybrid")


@pytest.mark.parametrize("recorded", ["dense", None])
def test_a_store_recorded_before_the_auto_default_keeps_its_mode(
    lexical_store, tiny_bert_path, mini_corpus, tmp_path, recorded
):
    store = tmp_path / "store"
    shutil.copytree(lexical_store, store)
    record = store / "build_config.json"
    saved = json.loads(record.read_text())
    del saved["retrieval"]
    saved |= {} if recorded is None else {"retrieval": recorded}  # as memvq wrote it before
    record.write_text(json.dumps(saved))
    corpus = store.parent / "corpus.jsonl"
    shutil.copy(lexical_store.parent / "corpus.jsonl", corpus)
    build_index(corpus, store, tiny_config(tiny_bert_path))  # auto: the recorded dense, so the same build
    assert json.loads(record.read_text()) == saved
    with pytest.raises(ManifestError, match=r"different config \(retrieval"):
        build_index(corpus, store, tiny_config(tiny_bert_path, retrieval="hybrid"))


def test_fusion_and_top_up():
    dense = np.array([[5, 1, 2, -1]])
    lexical = np.array([[2, 7, -1, -1]])
    assert reciprocal_rank_fusion([dense, lexical], 3).tolist() == [[2, 5, 1]]  # in both lists beats first once
    assert topped_up(np.array([[7, -1, -1]]), np.array([[3, 7, 4]])).tolist() == [[7, 3, 4]]


def test_score_fusion_adds_the_weighted_normalised_bm25_score_to_the_dense_one():
    dense_score = {5: 0.5, 1: 0.375, 2: 0.25, 7: 0.125}  # exact in binary: the tie below is one

    def dense_scores(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.array([[dense_score[row] if row >= 0 else -np.inf for row in r] for r in rows])

    def fused(lexical: tuple[np.ndarray, np.ndarray], k: int, weight: float) -> tuple[list, list]:
        rows, scores = score_fusion(np.zeros((1, 4)), dense, lexical, dense_scores, k, weight)
        return rows.tolist(), scores.tolist()

    dense = np.array([[5, 1, 2, -1]])
    lexical = (np.array([[8.0, 4.0, -np.inf, -np.inf]]), np.array([[2, 7, -1, -1]]))  # 7: only BM25 has it
    # 2: 0.25 + 0.25 x 8 / 8 = 0.5, a tie with 5 (dense first in the union wins); 7: 0.125 + 0.25 x 0.5 = 0.25;
    # each row keeps its dense score; k past the union pads with -1 / -inf
    assert fused(lexical, 6, 0.25) == ([[5, 2, 1, 7, -1, -1]], [[0.5, 0.25, 0.375, 0.125, -np.inf, -np.inf]])
    assert fused(lexical, 2, 0.3)[0] == [[2, 5]]
    assert fused(lexical, 4, 0.0)[0] == [[5, 1, 2, 7]]
    nothing = (np.full((1, 4), -np.inf), np.full((1, 4), -1))  # no word shared: the dense order
    assert fused(nothing, 3, 0.25) == ([[5, 1, 2]], [[0.5, 0.375, 0.25]])


def test_a_pipeline_keeps_its_retrieval_mode_over_a_new_generation(lexical_store, tiny_reader_path):
    from memvq.pipelines.rag import RAGPipeline

    rag = RAGPipeline.load(lexical_store, tiny_reader_path, device="cpu", retrieval="lexical")
    assert rag.retriever.mode == "lexical"
    assert rag.with_store(MemoryStore.open(lexical_store)).retriever.mode == "lexical"  # what a server's reload does


def test_an_update_masks_deleted_rows_in_every_mode(lexical_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(lexical_store, store)
    (tmp_path / "delete.txt").write_text("Quokka\n")
    update_store(store, delete=tmp_path / "delete.txt")
    opened = MemoryStore.open(store)
    assert opened.lexical_dir == store / "generations" / "00001" / "lexical"
    retriever = Retriever.for_store(opened)
    for mode in ("dense", "lexical", "hybrid"):
        found = retriever.search([QUESTION], opened.num_passages, mode)[0]
        assert "Quokka" not in {p.wikipedia_id for p in found}, mode


def test_the_bm25_index_covers_the_live_rows_after_an_update(lexical_store, tmp_path):
    """What an update adds is found by its word, what it deletes is not indexed at all (BM25's statistics are the
    live rows'); an update deleting every page leaves an empty index that finds nothing."""
    store = tmp_path / "store"
    shutil.copytree(lexical_store, store)
    (tmp_path / "delete.txt").write_text("Quokka\n")
    added = {"wikipedia_id": "Numbat", "wikipedia_title": "Numbat", "text": ["Numbat", "The numbat eats termites."]}
    (tmp_path / "add.jsonl").write_text(json.dumps(added) + "\n")
    update_store(store, [tmp_path / "add.jsonl"], delete=tmp_path / "delete.txt")
    opened = MemoryStore.open(store)
    lexical = LexicalIndex.load(opened.lexical_dir)
    assert len(lexical.rows) == opened.num_passages and not np.isin(lexical.rows, opened.deleted_rows()).any()
    found = Retriever.for_store(opened).search(["what does the numbat eat"], 1, "lexical")[0]
    assert found[0].wikipedia_id == "Numbat"
    every = {json.loads(line)["wikipedia_id"] for line in (lexical_store.parent / "corpus.jsonl").open()}
    (tmp_path / "all.txt").write_text("\n".join([*every - {"Quokka"}, "Numbat"]) + "\n")
    update_store(store, delete=tmp_path / "all.txt")
    emptied = MemoryStore.open(store)
    assert emptied.num_passages == 0 and len(LexicalIndex.load(emptied.lexical_dir).rows) == 0
    assert LexicalIndex.load(emptied.lexical_dir).search(["numbat"], 3)[1].tolist() == [[-1, -1, -1]]


def test_a_build_does_not_keep_a_bm25_index_of_an_older_format(tmp_path):
    LexicalIndex.build([(0, "Quokka", "The quokka lives on Rottnest Island.")], tmp_path / "lexical")
    assert LexicalIndex.complete(tmp_path / "lexical")
    header = tmp_path / "lexical" / "lexical.json"
    header.write_text(header.read_text().replace('"version": 2', '"version": 1'))
    assert not LexicalIndex.complete(tmp_path / "lexical")  # a build resumed by this memvq builds it again
    LexicalIndex.build([(0, "Quokka", "The quokka lives on Rottnest Island.")], tmp_path / "lexical")
    assert LexicalIndex.complete(tmp_path / "lexical")


def test_a_dense_retriever_does_not_load_the_bm25_index(lexical_store):
    retriever = Retriever.for_store(MemoryStore.open(lexical_store), mode="dense")
    assert retriever.lexical is None
    retriever.search([QUESTION], 3, "hybrid")  # loaded when a search needs it
    assert retriever.lexical is not None


def test_the_api_takes_a_retrieval_mode(lexical_store, tiny_reader_path):
    from fastapi.testclient import TestClient

    from memvq.pipelines.rag import RAGPipeline
    from memvq.serve.app import create_app

    rag = RAGPipeline.load(lexical_store, tiny_reader_path, device="cpu")
    with TestClient(create_app(rag)) as client:
        lexical = client.post("/v1/retrieve", json={"question": QUESTION, "top_k": 3, "retrieval": "lexical"})
        assert lexical.status_code == 200 and lexical.json()["passages"][0]["wikipedia_id"] == "Quokka"
        hybrid = client.post("/v1/retrieve", json={"question": QUESTION, "top_k": 5, "retrieval": "hybrid"})
        assert "Quokka" in {p["wikipedia_id"] for p in hybrid.json()["passages"]}
        assert client.post("/v1/answer", json={"question": QUESTION, "retrieval": "hybrid"}).status_code == 200
        assert client.post("/v1/retrieve", json={"question": QUESTION, "retrieval": "bm25"}).status_code == 422

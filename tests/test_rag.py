"""The query-time pipeline over a real (tiny) store: retrieval, memory, reader, provenance, timings."""

from __future__ import annotations

import pytest

from memvq.encoders.backbone import Backbone
from memvq.encoders.config import ReaderConfig
from memvq.encoders.options import QueryOptions
from memvq.encoders.reader import Reader
from memvq.pipelines.compatibility import IncompatibleModelError
from memvq.pipelines.rag import RAGPipeline, reader_inputs
from memvq.pipelines.timing import QUERY_STAGES as STAGES


@pytest.fixture(scope="module")
def rag(tiny_store, tiny_reader_path) -> RAGPipeline:
    return RAGPipeline.load(tiny_store[0], tiny_reader_path, device="cpu")


def test_answers_carry_reranked_provenance_and_timings(rag):
    questions = ["who got the first nobel prize in physics", "what is the capital of france"]
    results = rag.answer(questions, QueryOptions(top_k=5, rerank_k=2, max_answer_tokens=3))
    assert [r.question for r in results] == questions
    for result in results:
        assert isinstance(result.answer, str)
        assert len(result.passages) == 2
        scores = [p.score for p in result.passages]
        assert scores == sorted(scores, reverse=True)  # reranker scores, best first
        output = result.kilt_output()
        assert set(output) == {"answer", "provenance"}
        first = output["provenance"][0]
        assert {"wikipedia_id", "title", "start_paragraph_id", "end_paragraph_id", "score"} <= set(first)
        assert "text" not in first and "text" in result.kilt_output(with_text=True)["provenance"][0]
        assert set(STAGES) | {"total"} <= set(result.timings_ms)
        assert result.timings_ms["total"] >= result.timings_ms["retrieve"] > 0


def test_retrieve_returns_store_passages_best_first(rag):
    [hits] = rag.retrieve(["first nobel prize in physics"], QueryOptions(top_k=4))
    assert len(hits) == 4
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert rag.store.passages([hits[0].row])[0]["passage_id"] == hits[0].passage_id


def test_a_reader_of_another_split_is_refused(tiny_store, tiny_bert_path):
    from memvq.memory.store import MemoryStore

    config = ReaderConfig(mode="lumen", alpha=2 / 3)  # 1 memory layer, the store has 2
    reader = Reader.from_backbone(Backbone.from_pretrained(tiny_bert_path, alpha=2 / 3), config)
    store = MemoryStore.open(tiny_store[0], verify=False)
    with pytest.raises(IncompatibleModelError, match="memory_layers: store 2 vs reader 1"):
        RAGPipeline(store, reader, retriever=None)


def test_query_command_prints_answer_passages_and_stage_times(tiny_store, tiny_reader_path):
    from typer.testing import CliRunner

    from memvq.cli import app

    args = ["query", "first nobel prize in physics", "--store", str(tiny_store[0]), "--model", str(tiny_reader_path)]
    result = CliRunner().invoke(app, [*args, "--top-k", "4", "--rerank-k", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "passages read:" in result.output and "  2. " in result.output and "  3. " not in result.output
    for stage in ("load", "retrieve", "memory", "live", "rerank", "decode", "total"):
        assert f"  {stage} " in result.output
    missing = CliRunner().invoke(app, ["query", "x", "--store", str(tiny_store[0]) + "-nope"])
    assert missing.exit_code == 2 and "error:" in missing.output


def test_query_command_marks_the_extracted_answer_in_its_passage(tiny_store, tiny_extract_reader_path):
    from typer.testing import CliRunner

    from memvq.cli import app

    question = "first nobel prize in physics"
    args = ["query", question, "--store", str(tiny_store[0]), "--model", str(tiny_extract_reader_path)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    answer = result.output.splitlines()[0]
    assert f"[[{answer}]]" in result.output and "from passage " in result.output
    [found] = RAGPipeline.load(tiny_store[0], tiny_extract_reader_path, device="cpu").answer([question])
    prediction = found.kilt_output()
    [marked] = [p for p in prediction["provenance"] if "answer_span" in p]
    start, end = marked["answer_span"]
    assert found.passages[found.span.passage].text[start:end] == found.answer == answer


def test_retrieval_weight_makes_glimmer_keep_the_retrievers_best(rag):
    question = ["who got the first nobel prize in physics"]
    [hits] = rag.retrieve(question, QueryOptions(top_k=6))
    base = rag.reader.config
    try:
        rag.reader.config = base.model_copy(update={"retrieval_weight": 1e6})
        [result] = rag.read(question, [hits], QueryOptions(rerank_k=3))
    finally:
        rag.reader.config = base
    assert [p.passage_id for p in result.passages] == [h.passage_id for h in hits[:3]]
    [plain] = rag.read(question, [hits], QueryOptions(rerank_k=3))  # weight 0: the (untrained) reranker's own order
    assert [p.score for p in plain.passages] != [p.score for p in result.passages]


def test_a_copying_reader_reads_each_passages_token_ids_lined_up_with_its_memory(rag):
    assert rag.reader.config.copy_answers
    [hits] = rag.retrieve(["what is the capital of france"], QueryOptions(top_k=3))
    inputs = reader_inputs(rag.store, rag.reader, [[hit.row for hit in hits]])
    ids, mask = inputs.memory_ids[0], inputs.memory_mask[0]
    assert ids.shape == mask.shape == inputs.memory.shape[1:3]
    assert (ids[mask] > 0).all() and (ids[~mask] == 0).all()
    tokenizer = rag.reader.backbone.tokenizer
    for j, hit in enumerate(hits):
        words = tokenizer.decode(ids[j][mask[j]], skip_special_tokens=True).replace(" ", "")
        assert words.startswith((hit.title + hit.text[:20]).lower().replace(" ", "")), (words[:60], hit.title)

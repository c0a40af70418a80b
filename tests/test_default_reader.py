"""The embedded default reader: shipped with the package, small, fp16, and it answers over a real MiniLM store."""

from __future__ import annotations

import json

import pytest
import torch

from encoders.backbone import EMBEDDED_MODEL
from encoders.reader import default_reader_path
from encoders.reader_io import READER_FILE, WEIGHTS_FILE
from pipelines.rag import RAGPipeline


def test_weights_are_small_fp16_and_name_the_embedded_encoder():
    directory = default_reader_path()
    assert (directory / WEIGHTS_FILE).stat().st_size <= 25 * 2**20
    state = torch.load(directory / WEIGHTS_FILE, weights_only=True)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float16}
    # only what the backbone package does not ship: live layers 4-5, reranker, decoder (no word embeddings)
    assert not any(key.startswith(("live.embeddings", "live.encoder.layer.0.")) for key in state)
    assert "decoder.bert.embeddings.word_embeddings.weight" not in state
    meta = json.loads((directory / READER_FILE).read_text())
    assert meta["backbone"]["model_path"] == EMBEDDED_MODEL and meta["config"]["mode"] == "glimmer"


@pytest.mark.slow
def test_default_reader_answers_over_a_minilm_store(shared_data, minilm_store):
    rag = RAGPipeline.load(minilm_store, device="cpu")  # no model: the embedded default
    questions = ["who got the first nobel prize in physics", "who wrote the book the origin of species"]
    results = rag.answer(questions)
    for result in results:
        assert isinstance(result.answer, str)
        assert len(result.passages) == rag.config.rerank_k < rag.config.top_k
        assert all(p.title for p in result.passages)
    assert any(result.answer for result in results)

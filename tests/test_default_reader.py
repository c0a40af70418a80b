"""The embedded default reader: shipped with the package, small, fp16, and it answers over a real MiniLM store
built as `make demo` builds one (without memory: it reads passage text)."""

from __future__ import annotations

import json

import pytest
import torch

from memvq.data.kilt.metrics import exact_match, metric_max_over_ground_truths
from memvq.encoders.embedded import EMBEDDED_MODEL, default_reader_path
from memvq.encoders.reader_io import READER_FILE, WEIGHTS_FILE
from memvq.pipelines.rag import RAGPipeline


def test_weights_are_small_fp16_and_name_the_embedded_encoder():
    directory = default_reader_path()
    assert (directory / WEIGHTS_FILE).stat().st_size <= 25 * 2**20
    state = torch.load(directory / WEIGHTS_FILE, weights_only=True)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float16}
    # what the backbone package does not ship: the 6 fine-tuned layers and the span head, not the embeddings
    assert not any(key.startswith("live.embeddings") for key in state)
    assert any(key.startswith("live.encoder.layer.0.") for key in state)
    assert any(key.startswith("span.") for key in state) and not any(key.startswith("decoder.") for key in state)
    meta = json.loads((directory / READER_FILE).read_text())
    assert meta["backbone"]["model_path"] == EMBEDDED_MODEL
    assert meta["config"]["mode"] == "fid" and meta["config"]["head"] == "extract"


# Questions of the shared NQ file whose gold page is among the 40 pages of `demo_store`, with their gold answers.
ANSWERABLE = {
    "who got the first nobel prize in physics": ["Wilhelm Conrad Röntgen"],
    "who wrote the book the origin of species": ["Charles Darwin"],
    "who is the president of usa right now": ["Donald Trump"],
    "what is the name of manchester united stadium": ["Old Trafford"],
    "when does the little couples new season start": ["September 19, 2017"],
    "what network is showing the monday night football game": ["ESPN"],
}


@pytest.mark.slow
def test_default_reader_answers_over_the_demo_store(shared_data, demo_store):
    rag = RAGPipeline.load(demo_store, device="cpu")  # no model: the embedded default
    assert not rag.store.has_memory
    results = rag.answer(list(ANSWERABLE))
    for result in results:
        assert len(result.passages) == rag.config.top_k
        passage = result.passages[result.span.passage]
        assert result.answer == passage.text[result.span.char_start : result.span.char_end]
    right = [
        metric_max_over_ground_truths(exact_match, result.answer, gold)
        for result, gold in zip(results, ANSWERABLE.values(), strict=True)
    ]
    assert sum(right) >= 5, [result.answer for result in results]

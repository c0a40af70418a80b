"""A store built without memory (`memory = false`, `build-index --no-memory`: what `make demo` builds for its fid
default): passages and the dense index of a store with memory, no codec and no codes; a fid reader answers from
it, a reader of memory is refused with what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from pydantic import ValidationError
from typer.testing import CliRunner

from memvq.cli import app
from memvq.encoders.backbone import Backbone
from memvq.encoders.config import ReaderConfig
from memvq.encoders.options import QueryOptions
from memvq.encoders.reader import Reader
from memvq.encoders.reader_io import load_reader, save_reader
from memvq.memory.artifact import ManifestError
from memvq.memory.store import MemoryStore, NoMemoryError
from memvq.pipelines.build import build_index
from memvq.pipelines.compatibility import IncompatibleModelError, split_for_store
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.evaluate import EvalSettings, evaluate
from memvq.pipelines.rag import RAGPipeline


@pytest.fixture(scope="module")
def built(tiny_bert_path, mini_corpus, tmp_path_factory):
    """The tiny store's corpus and config built with `--no-memory` from the command line: (store, CLI output)."""
    root = tmp_path_factory.mktemp("no-memory")
    config = root / "build.json"
    config.write_text(json.dumps(tiny_config(tiny_bert_path).to_json()))
    out = root / "store"
    args = ["build-index", "--corpus", str(mini_corpus), "--out", str(out), "--config", str(config), "--no-memory"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def fid_reader(tiny_bert_path, tmp_path_factory):
    config = ReaderConfig(mode="fid", top_k=4, max_answer_tokens=4, head="extract")
    torch.manual_seed(0)
    reader = Reader.from_backbone(Backbone.from_pretrained(tiny_bert_path, alpha=1.0), config)
    return save_reader(reader, tmp_path_factory.mktemp("readers") / "tiny-fid")


def test_it_holds_the_passages_and_dense_index_of_a_store_with_memory_and_no_codes(built, tiny_store):
    out, output = built
    reference = tiny_store[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["codec"] is None and manifest["config"]["memory"] is False
    assert manifest["report"]["bytes_per_token"] == 0 and manifest["report"]["compression_vs_bf16"] is None
    assert not (out / "codec").exists()
    assert not list((out / "shards").glob("*.codes.npy")) and not list((out / "shards").glob("*.offsets.npy"))
    assert sorted(manifest["files"]) == sorted(
        name
        for name in json.loads((reference / "manifest.json").read_text())["files"]
        if not name.startswith("codec/") and not name.endswith(("codes.npy", "offsets.npy"))
    )
    with_memory = json.loads((reference / "manifest.json").read_text())
    assert manifest["shards"] == with_memory["shards"]  # the same passages, the same token counts
    for name in manifest["files"]:
        if name.endswith(("emb.npy", "passages.parquet")) or name.startswith("index/"):
            assert manifest["files"][name]["sha256"] == with_memory["files"][name]["sha256"], name
    assert "none (passages and the dense index" in output and "codes on disk" not in output


def test_it_verifies_and_refuses_to_give_memory(built):
    store = MemoryStore.open(built[0])  # every file's sha256 and the shards' counts
    assert not store.has_memory and store.num_passages > 40
    for ask in (lambda: store.get([0]), lambda: store.get_memory([0]), lambda: store.codec):
        with pytest.raises(NoMemoryError, match=r"built without memory.*build-index --memory"):
            ask()


def test_a_fid_reader_answers_and_evaluates_from_it_with_provenance(built, fid_reader, shared_data, tmp_path):
    rag = RAGPipeline.load(built[0], fid_reader, device="cpu")
    [result] = rag.answer(["who got the first nobel prize in physics"], QueryOptions(top_k=4))
    assert result.answer and len(result.passages) == 4
    assert result.kilt_output()["provenance"][0]["wikipedia_id"]
    task = tmp_path / "nq-dev-kilt.jsonl"
    with open(shared_data / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl") as source:
        task.write_text("".join(line for _, line in zip(range(6), source, strict=False)))
    report = evaluate(rag, [task], tmp_path / "eval", EvalSettings(query=QueryOptions(top_k=4)), progress=False)
    assert report["store"]["codec"] is None and report["tasks"]["nq"]["metrics"]["downstream"]["em"] is not None
    assert "(no memory: passages and the dense index)" in (tmp_path / "eval" / "report.md").read_text()
    assert len((tmp_path / "eval" / "nq-predictions.jsonl").read_text().splitlines()) == 6


def test_readers_of_memory_are_refused_with_what_to_do(built, tiny_extract_reader_path, tiny_bert_path):
    store = MemoryStore.open(built[0], verify=False)
    with pytest.raises(IncompatibleModelError, match=r"without memory.*glimmer reader reads memory"):
        RAGPipeline(store, load_reader(tiny_extract_reader_path), retriever=None)
    with pytest.raises(IncompatibleModelError, match="without memory"):
        split_for_store(ReaderConfig(mode="lumen"), store)  # training one on it
    other_split = Reader.from_backbone(
        Backbone.from_pretrained(tiny_bert_path, alpha=2 / 3), ReaderConfig(mode="lumen", alpha=2 / 3, top_k=4)
    )
    with pytest.raises(IncompatibleModelError, match="without memory"):  # not a split the store never had
        RAGPipeline(store, other_split, retriever=None)


def test_settings_that_make_memory_are_refused_without_it(tiny_bert_path, mini_corpus, tmp_path):
    with pytest.raises(ValidationError, match="memory = false"):
        BuildConfig.model_validate({"memory": False, "encoder": {"memory_from": str(tmp_path)}})
    config = tiny_config(tiny_bert_path, memory=False)
    with pytest.raises(ValueError, match="--codec-from"):
        build_index(mini_corpus, tmp_path / "store", config, codec_from=tmp_path)
    assert not (tmp_path / "store").exists()


def test_a_store_recorded_before_the_setting_resumes_and_refuses_the_other_way(
    tiny_store, tiny_bert_path, mini_corpus, tmp_path
):
    store = tmp_path / "store"
    shutil.copytree(tiny_store[0], store)
    record = store / "build_config.json"
    saved = json.loads(record.read_text())
    del saved["memory"]  # as a build made before stores without memory wrote it
    record.write_text(json.dumps(saved))
    report = build_index(mini_corpus, store, tiny_config(tiny_bert_path))  # the default, memory = true: the same build
    assert report.passages == MemoryStore.open(store).num_passages
    with pytest.raises(ManifestError, match=r"different config \(memory"):
        build_index(mini_corpus, store, tiny_config(tiny_bert_path, memory=False))

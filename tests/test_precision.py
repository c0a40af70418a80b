"""One precision setting (auto / fp32 / bf16) for every command that runs a model: resolved in one place, reaching the
model calls, recorded where the bytes or the numbers depend on it, and refused on a resume with another."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_store, store_bytes, tiny_config
from typer.testing import CliRunner

from memvq.cli import app
from memvq.encoders import hardware
from memvq.encoders.backbone import Backbone
from memvq.encoders.hardware import autocast, native_bf16, resolve_precision
from memvq.memory.artifact import ManifestError
from memvq.pipelines.build import build_index
from memvq.pipelines.rag import RAGPipeline

CPU = torch.device("cpu")


def test_auto_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    without = {"avx512_f": True, "avx2": True, "avx512_bf16": False, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: without)
    assert not native_bf16(CPU) and resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CPU) == "fp32"
    for flag in ("avx512_bf16", "amx_bf16", "bf16"):  # x86's two kinds, and Arm's
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda flag=flag: {**without, flag: True})
        assert native_bf16(CPU) and resolve_precision("auto", CPU) == "bf16"


def test_bf16_changes_the_models_numbers_within_tolerance(tiny_bert_path):
    backbone = Backbone.from_pretrained(tiny_bert_path, alpha=1 / 3)
    batch = backbone.tokenize_passages(["Physics"], ["The first Nobel Prize in Physics went to Röntgen."], 64)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    outputs = {}
    for precision in ("fp32", "bf16"):
        with torch.inference_mode(), autocast(CPU, precision):
            memory, embedding = backbone.encode_with_embedding(*args)
        outputs[precision] = (memory.float(), embedding.float())
    for fp32, bf16 in zip(outputs["fp32"], outputs["bf16"], strict=True):
        assert not torch.equal(fp32, bf16), "bf16 autocast did not reach the model"
        assert torch.allclose(fp32, bf16, atol=0.1, rtol=0.05)
    cosine = torch.nn.functional.cosine_similarity(outputs["fp32"][1], outputs["bf16"][1]).item()
    assert cosine > 0.999


def test_query_runs_the_reader_and_the_retriever_in_the_pipelines_precision(
    tiny_store, tiny_extract_reader_path, monkeypatch
):
    rag = RAGPipeline.load(tiny_store[0], tiny_extract_reader_path, device="cpu", precision="bf16")
    assert rag.precision == rag.retriever.precision == "bf16"
    seen: dict[str, bool] = {}

    def spy(name, inner):
        def call(*args, **kwargs):
            seen[name] = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            return inner(*args, **kwargs)

        return call

    monkeypatch.setattr(rag.reader, "answer", spy("reader", rag.reader.answer))
    monkeypatch.setattr(rag.retriever.encoder, "embed_texts", spy("retriever", rag.retriever.encoder.embed_texts))
    [answer] = rag.answer(["who got the first nobel prize in physics"])
    assert answer.passages and seen == {"reader": True, "retriever": True}

    fp32 = RAGPipeline.load(tiny_store[0], tiny_extract_reader_path, device="cpu", precision="fp32")
    monkeypatch.setattr(fp32.reader, "answer", spy("reader", fp32.reader.answer))
    fp32.answer(["who got the first nobel prize in physics"])
    assert seen["reader"] is False
    auto = RAGPipeline.load(tiny_store[0], tiny_extract_reader_path, device="cpu")
    assert auto.precision == resolve_precision("auto", CPU)


def test_stores_of_one_precision_are_byte_identical_and_another_is_refused(tiny_bert_path, mini_corpus, tmp_path):
    bf16 = tiny_config(tiny_bert_path, encoder={"model": str(tiny_bert_path), "precision": "bf16"})
    build_index(mini_corpus, tmp_path / "a", bf16)
    build_index(mini_corpus, tmp_path / "b", bf16)
    assert_same_store(tmp_path / "a", tmp_path / "b")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"]["encoder"]["precision"] == "bf16"

    fp32 = tiny_config(tiny_bert_path, encoder={"model": str(tiny_bert_path), "precision": "fp32"})
    with pytest.raises(ManifestError, match="different config"):
        build_index(mini_corpus, tmp_path / "a", fp32)
    build_index(mini_corpus, tmp_path / "c", fp32)
    reference = store_bytes(tmp_path / "a")
    differ = {name for name, digest in store_bytes(tmp_path / "c").items() if reference[name] != digest}
    assert any(name.endswith("emb.npy") for name in differ), "the memory's bytes do not depend on the precision"


def test_auto_is_recorded_as_what_it_resolved_to(tiny_bert_path, mini_corpus, tmp_path, monkeypatch):
    """A store started with auto records bf16 or fp32; auto elsewhere resolving to the other is refused."""
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    auto = tiny_config(tiny_bert_path)
    build_index(mini_corpus, tmp_path / "store", auto)
    saved = json.loads((tmp_path / "store" / "build_config.json").read_text())
    assert saved["encoder"]["precision"] == "bf16"
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    with pytest.raises(ManifestError, match="different config"):
        build_index(mini_corpus, tmp_path / "store", auto)


def test_every_command_that_runs_a_model_takes_precision():
    runner = CliRunner()
    for command in ("build-index", "train", "query", "eval", "serve"):
        result = runner.invoke(app, [command, "--help"], terminal_width=200, env={"COLUMNS": "200"})
        assert result.exit_code == 0
        assert "--precision" in result.output and "emulates it" in result.output, command

"""The training job: task splits, the multi-task schedule, a tiny run that learns, resumes identically, and saves."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from memvq.data.tasks import TaskConfig, in_dev, iter_squad, load_task, schedule
from memvq.encoders.backbone import Backbone
from memvq.encoders.config import ReaderConfig
from memvq.encoders.hardware import resolve_precision
from memvq.encoders.reader import Reader
from memvq.encoders.reader_io import WEIGHTS_FILE, load_memory_layers, load_reader
from memvq.encoders.spans import answer_char_spans
from memvq.memory.artifact import ManifestError
from memvq.memory.codecs import CodebookFinetuner, load_codec
from memvq.memory.store import MemoryStore
from memvq.pipelines.build import build_index
from memvq.pipelines.compatibility import IncompatibleModelError, split_for_store
from memvq.pipelines.config import BuildConfig, TrainConfig
from memvq.pipelines.rag import RAGPipeline, reader_inputs, recomputed_inputs
from memvq.pipelines.train import CONFIG_FILE, MANIFEST_FILE, READER_DIR, train


def test_squad_is_split_by_article(shared_data):
    task = load_task(
        TaskConfig(name="squad", path=str(shared_data / "squad" / "dev-v1.1.json"), format="squad", dev_fraction=0.2)
    )
    train_articles = {e.group for e in task.train}
    dev_articles = {e.group for e in task.dev}
    assert train_articles and dev_articles and not train_articles & dev_articles
    assert len(task.train) + len(task.dev) == 10570
    first = next(iter_squad(shared_data / "squad" / "dev-v1.1.json"))
    assert first.record["input"] == first.question and first.record["output"][0]["answer"] == first.answers[0]


def test_squad2_unanswerable_questions_are_kept_with_the_empty_answer_only_when_asked(shared_data):
    sample = shared_data / "haystack_samples" / "squad_v2_dev_small.json"
    assert sum(1 for _ in iter_squad(sample)) == 293  # SQuAD v1.1's reading: the answerable ones
    kept = list(iter_squad(sample, unanswerable=True))
    assert len(kept) == 626 and sum(e.answers == ("",) for e in kept) == 333
    task = load_task(TaskConfig(name="squad2", path=str(sample), format="squad", unanswerable=True, dev_fraction=0.75))
    assert {e.group for e in task.train} == {"Normans"}  # what configs/train-minilm-squad2.toml trains on
    assert {e.group for e in task.dev} == {"Computational complexity theory"}
    with pytest.raises(ValueError, match="needs format squad"):
        TaskConfig(name="nq", path=str(sample), format="kilt", unanswerable=True)
    # the empty answer has no occurrence in any passage: every passage read teaches the no-answer position
    assert answer_char_spans("Normandy is a region in France.", [""]) == []


def test_split_is_stable_and_close_to_the_fraction():
    keys = [f"id-{i}" for i in range(4000)]
    held = [key for key in keys if in_dev(key, 0.25)]
    assert held == [key for key in keys if in_dev(key, 0.25)]
    assert 0.22 < len(held) / len(keys) < 0.28
    assert not any(in_dev(key, 0.0) for key in keys)


def test_schedule_follows_weights_and_covers_each_task(shared_data, kilt_task):
    small = load_task(kilt_task)
    big = load_task(kilt_task.model_copy(update={"name": "again", "weight": 3.0}))
    slots = schedule([small, big], 4000, seed=1)
    assert slots == schedule([small, big], 4000, seed=1)
    counts = Counter(task for task, _ in slots)
    assert 0.7 < counts[1] / 3000 < 1.3
    first_pass = [index for task, index in slots if task == 0][: len(small.train)]
    assert sorted(first_pass) == list(range(len(small.train)))  # every example once before any repeats


@pytest.fixture(scope="module")
def kilt_task(shared_data, tmp_path_factory) -> TaskConfig:
    """30 NQ dev questions as a KILT task file."""
    path = tmp_path_factory.mktemp("tasks") / "nq-30.jsonl"
    with open(shared_data / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl") as source:
        path.write_text("".join(line for _, line in zip(range(30), source, strict=False)))
    return TaskConfig(name="nq", path=str(path), dev_fraction=0.2, max_dev=4)


def tiny_train_config(task: TaskConfig, **extra) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "reader": {
                "mode": "glimmer",
                "top_k": 4,
                "rerank_k": 2,
                "decoder_layers": 1,
                "max_answer_tokens": 6,
                "copy_answers": True,
            },
            "tasks": [task.model_dump()],
            "optim": {"steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 1},
            "eval_every": 2,
            "device": "cpu",
            **extra,
        }
    )


def trained_tensors(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / READER_DIR / WEIGHTS_FILE, weights_only=True)


def test_tiny_run_trains_saves_and_resumes_identically(tiny_store, tiny_bert_path, kilt_task, tmp_path):
    config = tiny_train_config(kilt_task, model=str(tiny_bert_path))
    straight = train(tiny_store[0], tmp_path / "straight", config)
    assert straight.finished and straight.steps == 4
    assert [h["step"] for h in straight.history] == [2, 4]
    assert {"nq/em", "nq/f1"} <= set(straight.history[-1])
    manifest = json.loads((tmp_path / "straight" / MANIFEST_FILE).read_text())
    assert manifest["steps"] == 4 and set(manifest["files"]) == {"reader/reader.json", f"reader/{WEIGHTS_FILE}"}
    dev = (tmp_path / "straight" / "data" / "nq-dev.jsonl").read_text().splitlines()
    assert dev and all(json.loads(line)["output"][0]["answer"] for line in dev)
    reader = load_reader(straight.reader_dir)
    assert reader.config.mode == "glimmer" and reader.decoder.num_layers == 1

    # Stopped by its time budget after the first step, then resumed: the same weights as the straight run.
    stopped = train(tiny_store[0], tmp_path / "resumed", config.model_copy(update={"max_minutes": 1e-9}))
    assert not stopped.finished and stopped.steps == 1
    resumed = train(tiny_store[0], tmp_path / "resumed", config)
    assert resumed.finished and resumed.steps == 4
    expected, got = trained_tensors(tmp_path / "straight"), trained_tensors(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    moved = trained_tensors(tmp_path / "straight")["decoder.bert.encoder.layer.0.crossattention.self.query.weight"]
    initial = Reader.from_backbone(reader.backbone, reader.config).trained_state()
    assert not torch.equal(moved.float(), initial["decoder.bert.encoder.layer.0.crossattention.self.query.weight"])

    with pytest.raises(ManifestError, match="different config"):
        train(tiny_store[0], tmp_path / "resumed", config.model_copy(update={"seed": 1}))
    assert (tmp_path / "resumed" / CONFIG_FILE).is_file()

    # The precision the run resolved to is recorded with the reader and the run; another one is refused.
    precision = resolve_precision("auto", torch.device("cpu"))
    assert manifest["precision"] == precision
    assert json.loads((straight.reader_dir / "reader.json").read_text())["trained_precision"] == precision
    other = "fp32" if precision == "bf16" else "bf16"
    with pytest.raises(ManifestError, match="different config"):
        train(tiny_store[0], tmp_path / "resumed", config.model_copy(update={"precision": other}))


def test_the_backbone_is_split_where_the_stores_memory_was_made(tiny_store, tiny_bert_path, kilt_task, tmp_path):
    store = MemoryStore.open(tiny_store[0])  # memory = 2 of the tiny BERT's 3 layers
    unset = tiny_train_config(kilt_task).reader
    assert split_for_store(unset, store) == (unset.model_copy(update={"alpha": 1 / 3}), 2)
    assert split_for_store(ReaderConfig(mode="fid"), store)[1] == 0
    with pytest.raises(IncompatibleModelError, match="2 memory layers of 3, but a memory reader"):
        split_for_store(ReaderConfig(mode="memory"), store)

    config = tiny_train_config(kilt_task, model=str(tiny_bert_path))
    config = config.model_copy(update={"reader": config.reader.model_copy(update={"alpha": 2 / 3})})
    with pytest.raises(IncompatibleModelError, match=r"alpha=0.6667 reads memory made by 1: build a store"):
        train(tiny_store[0], tmp_path / "run", config)


def test_codebook_finetuning_trains_the_codec_and_a_rebuild_encodes_with_it(
    tiny_store, tiny_bert_path, kilt_task, mini_corpus, tmp_path
):
    config = tiny_train_config(kilt_task, model=str(tiny_bert_path), finetune_codec=True, codec_decay=0.5)
    straight = train(tiny_store[0], tmp_path / "straight", config)
    assert straight.codec_dir is not None
    store = MemoryStore.open(tiny_store[0])
    tuned = load_codec(straight.codec_dir)
    assert tuned.config == store.codec.config
    assert any(not torch.equal(a, b) for a, b in zip(tuned.codebooks, store.codec.codebooks, strict=True))
    assert {"codec/codec.json", f"codec/{tuned.weights_file}"} <= set(
        json.loads((tmp_path / "straight" / MANIFEST_FILE).read_text())["files"]
    )

    # Stopped after a step and resumed: the same codebooks (the EMA statistics are in the checkpoint).
    train(tiny_store[0], tmp_path / "resumed", config.model_copy(update={"max_minutes": 1e-9}))
    resumed = load_codec(train(tiny_store[0], tmp_path / "resumed", config).codec_dir)
    assert all(torch.equal(a, b) for a, b in zip(resumed.codebooks, tuned.codebooks, strict=True))

    # The store rebuilt with the fine-tuned codec holds what training read in eval mode.
    build_index(mini_corpus, tmp_path / "rebuilt", tiny_config(tiny_bert_path), codec_from=straight.codec_dir)
    rebuilt = MemoryStore.open(tmp_path / "rebuilt")
    reader = load_reader(straight.reader_dir)
    rows = [[0, 1, 2], [3, 4, 5]]
    stored = reader_inputs(rebuilt, reader, rows)
    trained_on = recomputed_inputs(store, reader, rows, quantize=CodebookFinetuner(tuned).eval())
    assert torch.equal(stored.memory_mask, trained_on.memory_mask)
    mask = stored.memory_mask
    close = (stored.memory[mask] - trained_on.memory[mask]).abs().amax(-1) < 1e-4
    assert close.float().mean() > 0.99

    with pytest.raises(ManifestError, match="another codec config"):
        other = tiny_config(tiny_bert_path, codec={**tiny_config(tiny_bert_path).codec.model_dump(), "seed": 5})
        build_index(mini_corpus, tmp_path / "other", other, codec_from=straight.codec_dir)


def test_memory_layer_finetuning_trains_them_and_a_store_rebuilt_with_them_serves_the_reader(
    tiny_store, tiny_bert_path, tiny_reader_path, kilt_task, mini_corpus, tmp_path
):
    config = tiny_train_config(kilt_task, model=str(tiny_bert_path))
    config = config.model_copy(update={"reader": config.reader.model_copy(update={"train_memory_layers": True})})
    run = train(tiny_store[0], tmp_path / "run", config)
    reader = load_reader(run.reader_dir)
    pretrained = Backbone.from_pretrained(tiny_bert_path, alpha=config.reader.live_fraction)
    saved = trained_tensors(tmp_path / "run")
    memory_keys = [key for key in saved if key.startswith("memory.")]
    assert memory_keys and all(key.startswith("memory.encoder.layer.") for key in memory_keys)
    assert {int(key.split(".")[3]) for key in memory_keys} == set(range(pretrained.memory_layers))
    assert reader.memory_digest() not in (None, pretrained.memory_digest())

    # The tiny store's memory came from the pretrained memory layers: the tuned reader refuses it.
    with pytest.raises(IncompatibleModelError, match="--memory-from"):
        RAGPipeline.load(tiny_store[0], run.reader_dir, device="cpu")

    # Rebuilt with the reader's memory layers (fp16 codec: nearly lossless), the store holds the memory the
    # reader trained on, and the dense index (the pretrained retriever's) is unchanged.
    lossless = {"kind": "faiss", "factory": "SQfp16", "dim": 32}
    build = tiny_config(tiny_bert_path, codec=lossless)
    build_index(mini_corpus, tmp_path / "plain", build)
    tuned_encoder = build.encoder.model_copy(update={"memory_from": str(run.reader_dir)})
    build_index(mini_corpus, tmp_path / "tuned", build.model_copy(update={"encoder": tuned_encoder}))
    plain, tuned = MemoryStore.open(tmp_path / "plain"), MemoryStore.open(tmp_path / "tuned")
    assert tuned.manifest["backbone"]["memory_digest"] == reader.memory_digest()
    rows = [[0, 1, 2], [3, 4, 5]]
    with torch.no_grad():
        trained_on = recomputed_inputs(tuned, reader, rows)
    mask = trained_on.memory_mask

    def distance(store: MemoryStore) -> float:
        return (reader_inputs(store, reader, rows).memory[mask] - trained_on.memory[mask]).abs().max().item()

    assert distance(tuned) < 1e-2 < distance(plain)
    for shard in range(len(plain.manifest["shards"])):
        embeddings = [np.load(store.layout.shard_file(shard, "emb.npy")) for store in (plain, tuned)]
        assert np.array_equal(*embeddings)
    [answer] = RAGPipeline.load(tmp_path / "tuned", run.reader_dir, device="cpu").answer(["who wrote hamlet"])
    assert len(answer.passages) == config.reader.rerank_k
    with pytest.raises(IncompatibleModelError, match="reader the store was built for"):
        RAGPipeline.load(tmp_path / "tuned", tiny_reader_path, device="cpu")

    with pytest.raises(ValueError, match="train_memory_layers off"):
        load_memory_layers(Backbone.from_pretrained(tiny_bert_path), tiny_reader_path)
    with pytest.raises(ValueError, match="fid has no memory layers"):
        ReaderConfig(mode="fid", train_memory_layers=True)


def test_split_command_writes_disjoint_kilt_files(shared_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from memvq.cli import app

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the recipe's data paths are relative to the checkout
    result = CliRunner().invoke(app, ["split", "--config", "configs/train-minilm.toml", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    ids = {}
    for split in ("train", "dev"):
        lines = (tmp_path / f"nq-{split}.jsonl").read_text().splitlines()
        ids[split] = {json.loads(line)["id"] for line in lines}
    assert len(ids["train"]) + len(ids["dev"]) == 1293 and not ids["train"] & ids["dev"]
    assert 0.15 < len(ids["dev"]) / 1293 < 0.25


def test_extract_head_trains_on_distant_supervision_and_answers_with_spans(
    tiny_store, tiny_bert_path, kilt_task, tmp_path
):
    reader = {"mode": "glimmer", "top_k": 4, "rerank_k": 2, "max_answer_tokens": 6, "head": "extract"}
    config = tiny_train_config(kilt_task, model=str(tiny_bert_path), reader=reader)
    report = train(tiny_store[0], tmp_path / "run", config)
    assert report.finished and {"nq/em", "nq/f1"} <= set(report.history[-1])
    assert json.loads((tmp_path / "run" / MANIFEST_FILE).read_text())["examples_per_second"] > 0
    saved = trained_tensors(tmp_path / "run")
    assert any(key.startswith("span.") for key in saved) and not any(key.startswith("decoder.") for key in saved)
    pipeline = RAGPipeline.load(tiny_store[0], report.reader_dir, device="cpu")
    [result] = pipeline.answer(["who got the first nobel prize in physics"])
    passage = result.passages[result.span.passage]
    assert result.answer == passage.text[result.span.char_start : result.span.char_end]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    """configs/: build-*.toml are BuildConfigs whose alpha splits MiniLM's 6 layers exactly, train-*.toml
    TrainConfigs with tasks."""
    if path.name.startswith("build-"):
        live = BuildConfig.from_file(path).encoder.alpha * 6
        assert abs(live - round(live)) < 1e-9 and 1 <= round(live) <= 5
    else:
        assert TrainConfig.from_file(path).tasks

"""Shared fixtures: where the real data lives, and skips with a clear reason when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory) -> Path:
    """A tiny random BERT (3 layers, 32 dims) with MiniLM's real tokenizer, saved as a local checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from encoders.backbone import default_model_path

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def mini_corpus(shared_data, tmp_path_factory) -> Path:
    """The first 40 pages of the shared KILT mini corpus (the Nobel physics page is the first)."""
    path = tmp_path_factory.mktemp("corpus") / "mini.jsonl"
    with open(shared_data / "nq_open_oracle" / "wiki-mini-knowledgesource.jsonl") as source:
        path.write_text("".join(line for _, line in zip(range(40), source, strict=False)))
    return path

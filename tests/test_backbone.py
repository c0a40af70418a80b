"""The backbone split: memory + live layers must equal the unsplit model, for BERT and T5."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, T5Config, T5EncoderModel

from memvq.encoders.backbone import Backbone, UnsupportedModelError
from memvq.encoders.config import memory_layer_count
from memvq.retrieval.retriever import QUESTION_TOKENS

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(95)]]


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory) -> BertTokenizerFast:
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(VOCAB))
    return BertTokenizerFast(vocab_file=str(vocab))


def tiny_bert(tokenizer) -> Backbone:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return Backbone(BertModel(config, add_pooling_layer=False).eval(), tokenizer, memory_layers=4)


def tiny_t5(tokenizer) -> Backbone:
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4)
    return Backbone(T5EncoderModel(config).eval(), tokenizer, memory_layers=2)


def batch(tokenizer):
    return tokenizer(["w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10"], ["w11 w12", "w13"], padding=True, return_tensors="pt")


@pytest.mark.parametrize("make", [tiny_bert, tiny_t5])
def test_memory_then_live_equals_full_forward(make, bert_tokenizer):
    backbone = make(bert_tokenizer)
    enc = batch(bert_tokenizer)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    types = enc["token_type_ids"] if backbone.family == "bert" else None
    with torch.no_grad():
        kwargs = {"token_type_ids": types} if types is not None else {}
        full = backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
        memory = backbone.encode_memory(ids, mask, types)
        live = backbone.run_live(memory, mask)
    real = mask.bool()
    assert torch.allclose(memory[real], full.hidden_states[backbone.memory_layers][real], atol=1e-5)
    assert torch.allclose(live[real], full.last_hidden_state[real], atol=1e-5)


def test_live_can_be_run_in_two_parts(bert_tokenizer):
    backbone = tiny_bert(bert_tokenizer)
    enc = batch(bert_tokenizer)
    with torch.no_grad():
        memory = backbone.encode_memory(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        whole = backbone.run_live(memory, enc["attention_mask"])
        part = backbone.run_live(memory, enc["attention_mask"], stop=5)
        rest = backbone.run_live(part, enc["attention_mask"], start=5)
    assert torch.allclose(whole, rest, atol=1e-6)
    assert not torch.allclose(whole, part, atol=1e-3)


def test_padding_does_not_change_memory(bert_tokenizer):
    backbone = tiny_bert(bert_tokenizer)
    alone = bert_tokenizer(["w1 w2 w3"], ["w11 w12"], return_tensors="pt")
    padded = batch(bert_tokenizer)
    with torch.no_grad():
        a = backbone.encode_memory(alone["input_ids"], alone["attention_mask"], alone["token_type_ids"])
        b = backbone.encode_memory(padded["input_ids"], padded["attention_mask"], padded["token_type_ids"])
    n = alone["input_ids"].shape[1]
    assert torch.allclose(a[0], b[0, :n], atol=1e-5)


def test_memory_layer_count():
    assert memory_layer_count(6, 1 / 3) == 4
    assert memory_layer_count(12, 1 / 3) == 8
    assert memory_layer_count(6, 0.0) == 6
    assert memory_layer_count(6, 1.0) == 0
    with pytest.raises(ValueError, match="alpha"):
        memory_layer_count(6, 1.5)


def test_unknown_architecture_names_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"bert.*mt5.*t5"):
        Backbone.from_pretrained(tmp_path)


def test_missing_path_is_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Backbone.from_pretrained(tmp_path / "nope")


def test_t5_checkpoint_from_local_path(tmp_path, bert_tokenizer):
    backbone = tiny_t5(bert_tokenizer)
    backbone.model.save_pretrained(tmp_path)
    bert_tokenizer.save_pretrained(tmp_path)
    loaded = Backbone.from_pretrained(tmp_path, alpha=1 / 3)
    assert loaded.family == "t5" and loaded.num_layers == 3 and loaded.memory_layers == 2
    emb = loaded.embed_texts(["w1 w2", "w3"], QUESTION_TOKENS)
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.slow
def test_minilm_embedding_matches_sentence_transformers():
    """The embedded default gives the same embedding as sentence-transformers' MiniLM pipeline."""
    st = pytest.importorskip("sentence_transformers")
    backbone = Backbone.from_pretrained()
    assert (backbone.family, backbone.num_layers, backbone.memory_layers, backbone.hidden_size) == (
        "bert",
        6,
        4,
        384,
    )
    texts = ["who got the first nobel prize in physics", "Wilhelm Conrad Röntgen won it in 1901."]
    reference = st.SentenceTransformer(backbone.info.model_path, device="cpu").encode(texts, convert_to_tensor=True)
    with torch.no_grad():
        ours = backbone.embed_texts(texts, QUESTION_TOKENS)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert float(ours[0] @ ours[1]) > 0.3

"""The query-time reader (LUMEN / GLIMMER / FiD / memory-only) with tiny random BERT and T5 checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from einops import rearrange
from transformers import AutoTokenizer, BertLMHeadModel, BertModel, T5Config, T5ForConditionalGeneration
from transformers.generation.utils import GenerationMixin
from transformers.modeling_outputs import BaseModelOutput

from memvq.encoders.backbone import Backbone
from memvq.encoders.config import ReaderConfig
from memvq.encoders.decoder import IGNORE_INDEX, FiDDecoder
from memvq.encoders.inputs import PassageOffsets, ReaderInputs
from memvq.encoders.options import QueryOptions
from memvq.encoders.reader import Reader
from memvq.encoders.reader_io import READER_FILE, WEIGHTS_FILE, load_reader, save_reader, warm_start
from memvq.encoders.reranker import perplexity_distillation_loss, perplexity_distillation_target
from memvq.encoders.spans import passage_token_offsets
from memvq.pipelines.timing import Stopwatch

QUESTIONS = ["who discovered x-rays", "where is the eiffel tower located in france"]
PASSAGES = [
    [
        ("X-ray", "Wilhelm Rontgen discovered x-rays in 1895 at Wurzburg."),
        ("Nobel Prize", "The first Nobel prize in physics went to Rontgen."),
        ("Cat", "Cats are small animals."),
    ],
    [
        ("Eiffel Tower", "The Eiffel Tower is in Paris."),
        ("Paris", "Paris is the capital of France, a large city with many museums and old bridges."),
        ("Rome", "Rome is in Italy."),
    ],
]
ANSWERS = ["wilhelm rontgen", "paris"]
GOLD = [[answer] for answer in ANSWERS]  # gold answers per question, what `Reader.loss` takes
# Live fraction per mode for the 3-layer tiny BERT: lumen 1 live layer, glimmer 2 (Live-A 1 + Live-B 1).
ALPHA = {"lumen": 1 / 3, "glimmer": 2 / 3, "fid": 1.0, "memory": 0.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run ~50x faster on one thread than on two contended cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_t5_path(tiny_bert_path, tmp_path_factory) -> Path:
    """A tiny random T5ForConditionalGeneration (d_model 32, 2 layers, 4 heads) saved with a BERT tokenizer.

    A T5 sentencepiece tokenizer cannot be built offline, so MiniLM's BERT tokenizer is saved with the model and
    the config's special ids follow it: pad = decoder start = [PAD] (0), eos = [SEP] (102).
    """
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_path)
    path = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def paths(tiny_bert_path, tiny_t5_path) -> dict[str, Path]:
    return {"bert": tiny_bert_path, "t5": tiny_t5_path}


def make_reader(path: Path, mode: str, alpha: float | None = None, **overrides) -> Reader:
    config = ReaderConfig(mode=mode, alpha=alpha, top_k=3, rerank_k=2, max_answer_tokens=6, **overrides)
    backbone = Backbone.from_pretrained(path, alpha=config.live_fraction)
    torch.manual_seed(0)
    return Reader.from_backbone(backbone, config).eval()


@pytest.fixture(scope="module")
def shared_reader(paths) -> Callable[[str, str], Reader]:
    """Readers that tests only read from, built once per (family, mode)."""
    cache: dict[tuple[str, str], Reader] = {}

    def get(family: str, mode: str) -> Reader:
        if (family, mode) not in cache:
            alpha = ALPHA[mode] if family == "bert" else None
            cache[family, mode] = make_reader(paths[family], mode, alpha)
        return cache[family, mode]

    return get


def distillation_target(reader: Reader, inputs: ReaderInputs) -> torch.Tensor:
    """The perplexity-distillation target 'b K' GLIMMER trains its reranker towards, for QUESTIONS and GOLD."""
    with torch.no_grad():
        encoded = reader.encode(QUESTIONS, inputs)
        return perplexity_distillation_target(reader._passage_log_likelihood(encoded, GOLD))


def passage_memory(backbone: Backbone, passages=PASSAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """What the store gives back: memory 'b k l d' float, mask 'b k l' bool (padded across all passages)."""
    flat = [passage for row in passages for passage in row]
    tokens = backbone.tokenize_passages([t for t, _ in flat], [x for _, x in flat], max_length=64)
    with torch.no_grad():
        memory = backbone.encode_memory(tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids"))
    b = len(passages)
    return (
        rearrange(memory, "(b k) l d -> b k l d", b=b),
        rearrange(tokens["attention_mask"].bool(), "(b k) l -> b k l", b=b),
    )


def passage_ids(backbone: Backbone, passages=PASSAGES) -> torch.Tensor:
    """The passages' token ids 'b k l', lined up with `passage_memory`."""
    flat = [passage for row in passages for passage in row]
    tokens = backbone.tokenize_passages([t for t, _ in flat], [x for _, x in flat], max_length=64)
    return rearrange(tokens["input_ids"], "(b k) l -> b k l", b=len(passages))


def alone(backbone: Backbone, question: str, title: str, text: str) -> torch.Tensor:
    """[question memory; passage memory] of one pair, each encoded on its own with no padding: 'n d'."""
    q = backbone.tokenize_questions([question], 32)
    p = backbone.tokenize_passages([title], [text], 64)
    q_memory = backbone.encode_memory(q["input_ids"], q["attention_mask"], q.get("token_type_ids"))[0]
    p_memory = backbone.encode_memory(p["input_ids"], p["attention_mask"], p.get("token_type_ids"))[0]
    return torch.cat([q_memory, p_memory])


# -- shapes and modes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lumen", "glimmer", "fid", "memory"])
def test_shapes_in_each_mode(shared_reader, mode):
    reader = shared_reader("bert", mode)
    inputs = ReaderInputs(passage_texts=PASSAGES) if mode == "fid" else ReaderInputs(*passage_memory(reader.backbone))
    k = 2 if mode == "glimmer" else 3
    with torch.no_grad():
        encoded = reader.encode(QUESTIONS, inputs)
    assert encoded.hidden.shape[:2] == (2, k) and encoded.hidden.shape[-1] == 32
    assert encoded.mask.shape == encoded.hidden.shape[:3] and encoded.mask.dtype == torch.bool
    hidden, flat_mask, flat_ids = encoded.decoder_inputs()
    assert flat_ids.shape == flat_mask.shape and flat_ids.dtype == torch.long
    assert hidden.shape == (2, k * encoded.hidden.shape[2], 32) and flat_mask.shape == hidden.shape[:2]

    clock = Stopwatch()
    out = reader.answer(QUESTIONS, inputs, stage=clock.stage)
    assert len(out.answers) == 2 and all(isinstance(answer, str) for answer in out.answers)
    assert out.kept.shape == (2, k)
    assert (out.passage_scores is None) == (mode != "glimmer")
    if mode == "glimmer":
        assert out.passage_scores.shape == (2, 3)
    expected = {"live", "decode"} | ({"rerank"} if mode == "glimmer" else set())
    assert set(clock.ms) == expected and min(clock.ms.values()) > 0

    losses = reader.loss(QUESTIONS, GOLD, inputs)
    assert set(losses) == {"loss", "generation_loss", "rerank_loss"}
    assert all(torch.isfinite(value) for value in losses.values())
    assert (float(losses["rerank_loss"].detach()) > 0) == (mode == "glimmer")


def test_config_and_split_are_checked(tiny_bert_path):
    assert ReaderConfig(mode="lumen").live_fraction == pytest.approx(1 / 3)
    assert ReaderConfig(mode="fid").live_fraction == 1.0 and ReaderConfig(mode="memory").live_fraction == 0.0
    with pytest.raises(ValueError, match="alpha must be 1"):
        ReaderConfig(mode="fid", alpha=0.5)
    with pytest.raises(ValueError, match="alpha must be 0"):
        ReaderConfig(mode="memory", alpha=0.5)
    with pytest.raises(ValueError, match="rerank_k"):
        ReaderConfig(mode="glimmer", top_k=3, rerank_k=4)
    backbone = Backbone.from_pretrained(tiny_bert_path, alpha=1 / 3)  # 2 memory layers
    with pytest.raises(ValueError, match="memory layers"):
        Reader(backbone, FiDDecoder.from_backbone(backbone), ReaderConfig(mode="lumen", alpha=2 / 3))
    # readers saved before the rename say retrieve_k
    assert ReaderConfig.model_validate({"mode": "glimmer", "retrieve_k": 7}).top_k == 7


def test_query_options_resolve_against_the_reader_config():
    config = ReaderConfig(mode="glimmer", top_k=6, rerank_k=3, max_answer_tokens=8, num_beams=2, min_confidence=0.3)
    assert QueryOptions().resolved(config) == QueryOptions(
        top_k=6, rerank_k=3, max_answer_tokens=8, num_beams=2, min_confidence=0.3
    )
    given = QueryOptions(top_k=10, rerank_k=5, max_answer_tokens=4, num_beams=1, min_confidence=0.0)
    assert given.resolved(config) == given and given.resolved(config).resolved(config) == given
    assert QueryOptions(top_k=2).resolved(config).rerank_k == 2  # the default rerank_k is cut to top_k
    with pytest.raises(ValueError, match=r"rerank_k \(3\) must be <= top_k \(2\)"):
        QueryOptions(top_k=2, rerank_k=3).resolved(config)
    with pytest.raises(ValueError, match="rerank_k"):
        QueryOptions(rerank_k=7).resolved(config)  # above the config's top_k
    lumen = ReaderConfig(mode="lumen", top_k=6, rerank_k=3)  # no reranking: rerank_k is not checked
    assert QueryOptions(top_k=2, rerank_k=3).resolved(lumen).rerank_k == 3
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        QueryOptions(top_k=0)
    assert hash(QueryOptions(top_k=4)) == hash(QueryOptions(top_k=4))  # frozen: a batch key


def test_reader_inputs_hold_memory_or_text():
    memory, mask = torch.zeros(2, 3, 5, 4), torch.ones(2, 3, 5, dtype=torch.bool)
    inputs = ReaderInputs(memory, mask, retrieval_scores=torch.zeros(2, 3))
    assert (inputs.batch, inputs.k) == (2, 3)
    texts = ReaderInputs(passage_texts=PASSAGES)
    assert (texts.batch, texts.k) == (2, 3)
    with pytest.raises(ValueError, match="exactly one"):
        ReaderInputs(memory, mask, passage_texts=PASSAGES)
    with pytest.raises(ValueError, match="exactly one"):
        ReaderInputs()
    with pytest.raises(ValueError, match="memory_mask"):
        ReaderInputs(memory)
    with pytest.raises(ValueError, match="same number of passages"):
        ReaderInputs(passage_texts=[PASSAGES[0], PASSAGES[1][:2]])
    with pytest.raises(ValueError, match="retrieval_scores"):
        ReaderInputs(memory, mask, retrieval_scores=torch.zeros(2, 4))


# -- what each mode computes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "mode"), [("bert", "lumen"), ("t5", "lumen"), ("bert", "glimmer")])
def test_live_states_equal_run_live_over_the_concatenation(shared_reader, family, mode):
    """LUMEN: live layers over [question memory; passage memory], each computed alone (the passage memory never
    sees the question, so this is not FiD); batching and padding do not change a pair's states (T5 included,
    whose relative positions would see padding gaps). GLIMMER: the same for Live-A."""
    reader = shared_reader(family, mode)
    backbone = reader.backbone
    memory, mask = passage_memory(backbone)
    with torch.no_grad():
        encoded = reader.encode(QUESTIONS, ReaderInputs(memory, mask))
        for b, question in enumerate(QUESTIONS):
            for j, (title, text) in enumerate(PASSAGES[b]):
                pair = alone(backbone, question, title, text)[None]
                ones = torch.ones(pair.shape[:2], dtype=torch.long)
                if mode == "lumen":
                    expected = backbone.run_live(pair, ones)[0]
                    got = encoded.hidden[b, j][encoded.mask[b, j]]
                else:
                    stop = backbone.memory_layers + reader.config.rerank_layers
                    expected = backbone.run_live(pair, ones, stop=stop)[0]
                    got = encoded.live_a[b, j][encoded.live_a_mask[b, j]]
                assert got.shape == expected.shape
                assert torch.allclose(got, expected, atol=1e-5)


def test_memory_mode_feeds_the_memory_directly(shared_reader):
    reader = shared_reader("bert", "memory")
    backbone = reader.backbone
    assert backbone.memory_layers == backbone.num_layers == 3
    memory, mask = passage_memory(backbone)
    with torch.no_grad():
        encoded = reader.encode(QUESTIONS, ReaderInputs(memory, mask))
        for b, question in enumerate(QUESTIONS):
            q = backbone.tokenize_questions([question], 32)
            q_memory = backbone.encode_memory(q["input_ids"], q["attention_mask"], q["token_type_ids"])[0]
            for j in range(3):
                expected = torch.cat([q_memory, memory[b, j][mask[b, j]]])
                assert torch.allclose(encoded.hidden[b, j][encoded.mask[b, j]], expected, atol=1e-5)


def test_fid_runs_every_layer_over_the_text_pairs(shared_reader):
    reader = shared_reader("bert", "fid")
    backbone = reader.backbone
    with torch.no_grad():
        encoded = reader.encode(QUESTIONS, ReaderInputs(passage_texts=PASSAGES))
        for b, question in enumerate(QUESTIONS):
            for j, (title, text) in enumerate(PASSAGES[b]):
                tokens = backbone.tokenizer(question, f"{title} [SEP] {text}", return_tensors="pt")
                expected = backbone.model(**tokens).last_hidden_state[0]
                assert torch.allclose(encoded.hidden[b, j][encoded.mask[b, j]], expected, atol=1e-5)


def test_glimmer_keeps_exactly_the_top_scored_passages(shared_reader):
    reader = shared_reader("bert", "glimmer")
    backbone = reader.backbone
    memory, mask = passage_memory(backbone)
    with torch.no_grad():
        encoded = reader.encode(QUESTIONS, ReaderInputs(memory, mask))
        scores = encoded.passage_scores
        assert encoded.kept.shape == (2, 2)
        assert torch.equal(encoded.kept, scores.topk(2, dim=-1).indices)
        for b in range(2):
            # Scores pool the question tokens and the passage tokens of each pair's Live-A states.
            question_length = len(backbone.tokenizer(QUESTIONS[b])["input_ids"])
            for j in range(3):
                states = encoded.live_a[b, j][encoded.live_a_mask[b, j]][None, None]
                is_question = torch.arange(states.shape[2]) < question_length
                score = reader.reranker(states, is_question[None, None], ~is_question[None, None])
                assert torch.allclose(score[0, 0], scores[b, j], atol=1e-5)
            dropped = sorted(set(range(3)) - set(encoded.kept[b].tolist()))
            assert len(dropped) == 1 and scores[b, encoded.kept[b]].min() >= scores[b, dropped[0]]
            # The decoder reads Live-B over the kept pairs' Live-A states, in score order.
            for slot, j in enumerate(encoded.kept[b].tolist()):
                live_a = encoded.live_a[b, j][encoded.live_a_mask[b, j]][None]
                expected = backbone.run_live(live_a, torch.ones(live_a.shape[:2]), start=backbone.memory_layers + 1)
                assert torch.allclose(encoded.hidden[b, slot][encoded.mask[b, slot]], expected[0], atol=1e-5)


# -- reranker training ---------------------------------------------------------------------------------------------


def sharpen_decoder(reader: Reader) -> None:
    """Make a random BERT2BERT decoder read its encoder: its tiny random embeddings give near-uniform logits
    whatever the passage, so scale the tied embeddings (the logits) and the cross-attention output."""
    with torch.no_grad():
        reader.decoder.model.get_input_embeddings().weight.mul_(50.0)
        for layer in reader.decoder.model.bert.encoder.layer:
            layer.crossattention.output.dense.weight.mul_(10.0)


def test_perplexity_distillation_target_and_loss(tiny_bert_path):
    reader = make_reader(tiny_bert_path, "glimmer", ALPHA["glimmer"])
    sharpen_decoder(reader)
    backbone = reader.backbone
    memory, mask = passage_memory(backbone)
    with torch.no_grad():
        target = distillation_target(reader, ReaderInputs(memory, mask))
        assert target.shape == (2, 3) and (target > 0).all()
        assert torch.allclose(target.sum(dim=-1), torch.ones(2), atol=1e-6)
        assert ((target.max(dim=-1).values - target.min(dim=-1).values) > 0.03).all()  # the test has power
        # The target is the decoder's likelihood of the gold answer given each passage ALONE (after Live-B).
        encoded = reader.encode(QUESTIONS[:1], ReaderInputs(memory[:1], mask[:1]))
        labels = reader.decoder.tokenize_targets(ANSWERS[:1], reader.config.max_answer_tokens)
        likelihood = []
        for j in range(3):
            live_a = encoded.live_a[0, j][encoded.live_a_mask[0, j]][None]
            ones = torch.ones(live_a.shape[:2], dtype=torch.long)
            hidden = backbone.run_live(live_a, ones, start=backbone.memory_layers + 1)
            likelihood.append(reader.decoder(hidden, ones, labels).log_likelihood[0])
        assert torch.allclose(target[0], torch.softmax(torch.stack(likelihood), dim=0), atol=1e-5)

    # Zero when the reranker already matches the target (any shift of the scores), positive otherwise.
    assert float(perplexity_distillation_loss(target.log() + 3.0, target)) == pytest.approx(0.0, abs=1e-6)
    scores = torch.tensor([[4.0, 0.0, -4.0], [-4.0, 0.0, 4.0]], requires_grad=True)
    loss = perplexity_distillation_loss(scores, target)
    assert float(loss.detach()) > 1e-2
    loss.backward()
    assert torch.allclose(scores.grad, (torch.softmax(scores, -1) - target).detach() / 2, atol=1e-6)
    assert torch.allclose(perplexity_distillation_target(torch.tensor([[0.0, 0.0]])), torch.tensor([[0.5, 0.5]]))


def test_training_reads_the_passages_that_retrieval_scores_rank_first(tiny_bert_path):
    reader = make_reader(tiny_bert_path, "glimmer", ALPHA["glimmer"], retrieval_weight=1e4)
    sharpen_decoder(reader)
    memory, mask = passage_memory(reader.backbone)
    swapped = [0, 2, 1]  # passages 1 and 2 trade places

    def generation_loss(order: list[int], scores: list[float]) -> float:
        retrieval = torch.tensor([scores, scores])
        with torch.no_grad():
            inputs = ReaderInputs(memory[:, order], mask[:, order], retrieval_scores=retrieval)
            losses = reader.loss(QUESTIONS, GOLD, inputs)
        return float(losses["generation_loss"])

    # rerank_k = 2: the decoder reads passages {0, 2} whether they sit at 0, 2 or at 0, 1 with scores to match.
    keep_0_2 = generation_loss([0, 1, 2], [1.0, 0.0, 0.5])
    assert generation_loss(swapped, [1.0, 0.5, 0.0]) == pytest.approx(keep_0_2, abs=1e-5)
    assert abs(generation_loss([0, 1, 2], [1.0, 0.5, 0.0]) - keep_0_2) > 1e-2  # reads {0, 1}


def test_a_few_steps_overfit_one_example(tiny_bert_path):
    reader = make_reader(tiny_bert_path, "glimmer", ALPHA["glimmer"], train_decoder_embeddings=True).train()
    backbone = reader.backbone
    memory, mask = passage_memory(backbone, PASSAGES[1:])
    frozen = {name: p.detach().clone() for name, p in reader.named_parameters() if not p.requires_grad}
    assert any("embeddings" in name for name in frozen) and any("encoder.layer.0." in name for name in frozen)
    trainable = [p for p in reader.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    first = None
    for _ in range(40):
        losses = reader.loss(QUESTIONS[1:], GOLD[1:], ReaderInputs(memory, mask))
        optimizer.zero_grad()
        losses["loss"].backward()
        if first is None:
            first = {key: float(value.detach()) for key, value in losses.items()}
            assert reader.reranker.score.weight.grad.abs().sum() > 0
        optimizer.step()
    reader.eval()
    with torch.no_grad():
        last = reader.loss(QUESTIONS[1:], GOLD[1:], ReaderInputs(memory, mask))
    assert float(last["generation_loss"]) < 0.2 * first["generation_loss"]
    assert float(last["loss"]) < first["loss"]
    assert reader.answer(QUESTIONS[1:], ReaderInputs(memory, mask)).answers == ["paris"]
    for name, p in reader.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen memory-side {name} moved"


# -- decoder -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_greedy_and_beam_generate_batched(shared_reader, family):
    reader = shared_reader(family, "lumen")
    memory, mask = passage_memory(reader.backbone)
    for beams in (1, 2):
        options = QueryOptions(num_beams=beams)
        batched = reader.answer(QUESTIONS, ReaderInputs(memory, mask), options).answers
        assert len(batched) == 2 and all(isinstance(answer, str) for answer in batched)
        for b in range(2):
            single = reader.answer(QUESTIONS[b : b + 1], ReaderInputs(memory[b : b + 1], mask[b : b + 1]), options)
            assert single.answers == [batched[b]]
    with torch.no_grad():
        hidden, flat_mask, _ = reader.encode(QUESTIONS, ReaderInputs(memory, mask)).decoder_inputs()
        ids = reader.decoder.generate(hidden, flat_mask, max_new_tokens=4, num_beams=2)
    assert ids.shape[0] == 2 and 2 <= ids.shape[1] <= 5 and (ids[:, 0] == reader.decoder.start_id).all()


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_decoder_targets_and_loss_match_the_library(paths, family):
    """Our start/end handling gives the loss the model computes itself from `labels` (public arguments only)."""
    backbone = Backbone.from_pretrained(paths[family])
    decoder = FiDDecoder.from_backbone(backbone)
    hidden = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    labels = decoder.tokenize_targets(ANSWERS, 8)
    for row in labels.tolist():
        real = [token for token in row if token != IGNORE_INDEX]
        assert real[-1] == decoder.end_id and decoder.start_id not in real
    with torch.no_grad():
        ours = decoder(hidden, mask, labels)
        if family == "bert":
            tokenizer = backbone.tokenizer
            assert (decoder.start_id, decoder.end_id) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
            full = torch.cat([torch.full((2, 1), decoder.start_id), labels], dim=1)  # [CLS] answer [SEP]
            reference = decoder.model(
                input_ids=full.masked_fill(full == IGNORE_INDEX, decoder.pad_id),
                attention_mask=(full != IGNORE_INDEX).long(),
                encoder_hidden_states=hidden,
                encoder_attention_mask=mask,
                labels=full,
            ).loss
        else:
            assert (decoder.start_id, decoder.end_id) == (0, 102)
            reference = decoder.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask, labels=labels
            ).loss
    assert torch.allclose(ours.loss, reference, atol=1e-5)
    assert ours.log_likelihood.shape == (2,) and (ours.log_likelihood < 0).all()
    answer = backbone.tokenizer("paris", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[decoder.start_id, *answer, decoder.end_id, decoder.pad_id]])
    assert decoder.decode(ids) == ["paris"]


def test_bert2bert_decoder_is_initialised_from_the_checkpoint(tiny_bert_path):
    backbone = Backbone.from_pretrained(tiny_bert_path)
    decoder = FiDDecoder.from_backbone(backbone)
    model = decoder.model
    assert isinstance(model, BertLMHeadModel) and model.config.is_decoder and model.config.add_cross_attention
    checkpoint = BertModel.from_pretrained(tiny_bert_path, add_pooling_layer=False).state_dict()
    state = model.bert.state_dict()
    for key, value in checkpoint.items():  # embeddings, self-attention, FFN
        assert torch.equal(state[key], value), key
    cross = [key for key in state if "crossattention" in key]
    assert cross and not any(key in checkpoint for key in cross)
    layer = model.bert.encoder.layer[0]
    # cross-attention starts as a copy of the self-attention (its own tensors, trained apart)
    assert torch.equal(layer.crossattention.self.query.weight, layer.attention.self.query.weight)
    assert layer.crossattention.self.query.weight.data_ptr() != layer.attention.self.query.weight.data_ptr()
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # A copy of the checkpoint, not the backbone's own modules: training the decoder leaves the memory side alone.
    assert model.get_input_embeddings().weight.data_ptr() != backbone.model.embeddings.word_embeddings.weight.data_ptr()


def test_t5_decoder_is_the_checkpoints_decoder_without_its_encoder(tiny_t5_path):
    backbone = Backbone.from_pretrained(tiny_t5_path)
    decoder = FiDDecoder.from_backbone(backbone)
    full = T5ForConditionalGeneration.from_pretrained(tiny_t5_path).state_dict()
    state = decoder.model.state_dict()
    assert len(decoder.model.encoder.block) == 0
    for key, value in state.items():
        if key.startswith(("decoder.", "lm_head.", "shared.")):
            assert torch.equal(value, full[key]), key


# -- persistence and public API ------------------------------------------------------------------------------------


@pytest.mark.parametrize("copy", [False, True])
def test_save_load_round_trip(tiny_bert_path, tmp_path, copy):
    reader = make_reader(tiny_bert_path, "glimmer", ALPHA["glimmer"], copy_answers=copy)
    with torch.no_grad():  # move the trained parts off their initialisation, as training would
        generator = torch.Generator().manual_seed(1)
        for p in reader.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    memory, mask = passage_memory(reader.backbone)
    ids = passage_ids(reader.backbone)
    inputs = ReaderInputs(memory, mask, ids)
    expected = reader.answer(QUESTIONS, inputs)

    save_reader(reader, tmp_path / "reader")
    assert (tmp_path / "reader" / READER_FILE).is_file()
    saved = torch.load(tmp_path / "reader" / WEIGHTS_FILE, weights_only=True)
    assert not any(key.startswith("live.embeddings") or key.startswith("live.encoder.layer.0.") for key in saved)
    assert any(key.startswith("live.encoder.layer.2.") for key in saved)
    assert any(key.startswith("copy.") for key in saved) == copy
    # the decoder's word embeddings (and the LM head tied to them) stay the checkpoint's: not saved
    assert not {"decoder.bert.embeddings.word_embeddings.weight", "decoder.cls.predictions.decoder.weight"} & set(saved)
    for directory, backbone_path in [(tmp_path / "reader", None), (tmp_path / "reader", tiny_bert_path)]:
        loaded = load_reader(directory, backbone_path=backbone_path)
        assert loaded.config == reader.config
        got = loaded.answer(QUESTIONS, inputs)
        assert got.answers == expected.answers
        assert torch.equal(got.kept, expected.kept)
        assert torch.allclose(got.passage_scores, expected.passage_scores, atol=1e-6)
        embeddings = loaded.decoder.model.get_input_embeddings().weight
        assert loaded.decoder.model.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()

    save_reader(reader, tmp_path / "half", fp16=True)
    half = torch.load(tmp_path / "half" / WEIGHTS_FILE, weights_only=True)
    assert {value.dtype for value in half.values() if value.is_floating_point()} == {torch.float16}
    loaded = load_reader(tmp_path / "half")
    original = dict(reader.named_parameters())
    for name, p in loaded.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, original[name].half().float()), name


def naive_copy_greedy(decoder: FiDDecoder, hidden, mask, ids, steps: int) -> tuple[list[list[int]], list[float]]:
    """Greedy decoding of the pointer-generator mixture without any cache, one question at a time."""
    outputs, scores = [], []
    for b in range(hidden.shape[0]):
        tokens, total = [decoder.start_id], 0.0
        for _ in range(steps):
            prefix = torch.tensor([tokens])
            logits, states = decoder._run(prefix, hidden[b : b + 1], mask[b : b + 1].long())
            attention, gate = decoder.copy_head(states[:, -1:], hidden[b : b + 1], mask[b : b + 1])
            probs = gate[0, 0] * torch.softmax(logits[0, -1].float(), -1)
            probs = probs + (1 - gate[0, 0]) * torch.zeros_like(probs).index_add_(0, ids[b], attention[0, 0])
            token = int(probs.argmax())
            tokens.append(token)
            total += float(probs[token].log())
            if token == decoder.end_id:
                break
        outputs.append(tokens)
        scores.append(total)
    return outputs, scores


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_copying_decoder_search_matches_a_plain_greedy_loop_and_teacher_forcing(paths, family):
    backbone = Backbone.from_pretrained(paths[family])
    torch.manual_seed(0)
    decoder = FiDDecoder.from_backbone(backbone, copy=True).eval()
    with torch.no_grad():  # a gate that depends on the state, and a sharp copy attention
        decoder.copy_head.gate.weight.normal_(0.0, 0.5)
        decoder.copy_head.query.weight.mul_(20.0)
    hidden = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    ids = torch.randint(1000, 1100, (2, 9))
    with torch.no_grad():
        got = decoder.generate(hidden, mask, max_new_tokens=5, encoder_ids=ids)
        expected, scores = naive_copy_greedy(decoder, hidden, mask, ids, steps=5)
        for row, tokens in zip(got.tolist(), expected, strict=True):
            assert row[: len(tokens)] == tokens and set(row[len(tokens) :]) <= {decoder.pad_id}
        assert any(token in ids.tolist()[0] + ids.tolist()[1] for row in expected for token in row)  # it copies
        # teacher forcing gives the greedy answers the log-likelihood the loop summed
        labels = torch.full((2, 6), IGNORE_INDEX)
        for b, tokens in enumerate(expected):
            labels[b, : len(tokens) - 1] = torch.tensor(tokens[1:])
        likelihood = decoder(hidden, mask, labels, encoder_ids=ids).log_likelihood
        assert torch.allclose(likelihood, torch.tensor(scores), atol=1e-4)
        beams = decoder.generate(hidden, mask, max_new_tokens=5, num_beams=3, encoder_ids=ids)
        assert beams.shape[0] == 2 and (beams[:, 0] == decoder.start_id).all()
    with pytest.raises(ValueError, match="encoder_ids"):
        decoder.generate(hidden, mask)


def test_a_copying_reader_needs_the_passage_ids_and_learns_to_copy(tiny_bert_path):
    reader = make_reader(tiny_bert_path, "glimmer", ALPHA["glimmer"], copy_answers=True).train()
    memory, mask = passage_memory(reader.backbone, PASSAGES[:1])
    ids = passage_ids(reader.backbone, PASSAGES[:1])
    with pytest.raises(ValueError, match="memory_ids"):
        reader.loss(QUESTIONS[:1], GOLD[:1], ReaderInputs(memory, mask))
    inputs = ReaderInputs(memory, mask, ids)
    optimizer = torch.optim.Adam([p for p in reader.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(30):
        losses = reader.loss(QUESTIONS[:1], GOLD[:1], inputs)
        optimizer.zero_grad()
        losses["generation_loss"].backward()
        optimizer.step()
        first = first or float(losses["generation_loss"].detach())
    reader.eval()
    assert reader.answer(QUESTIONS[:1], inputs).answers == ["wilhelm rontgen"]
    with torch.no_grad():
        hidden, encoder_mask, _ = reader.encode(QUESTIONS[:1], inputs).decoder_inputs()
        labels = reader.decoder.tokenize_targets(ANSWERS[:1], 6)
        states = reader.decoder._run(reader.decoder.decoder_inputs(labels)[0], hidden, encoder_mask)[1]
        _, gate = reader.decoder.copy_head(states, hidden, encoder_mask)
    assert float(gate[0, :2].mean()) < 0.5  # the answer's words come mostly from the copy attention


def test_shallow_decoder_round_trip(tiny_bert_path, tmp_path):
    reader = make_reader(tiny_bert_path, "lumen", ALPHA["lumen"], decoder_layers=1)
    assert reader.decoder.num_layers == 1
    assert not reader.decoder.model.get_input_embeddings().weight.requires_grad
    memory, mask = passage_memory(reader.backbone)
    inputs, options = ReaderInputs(memory, mask), QueryOptions(max_answer_tokens=3)
    expected = reader.answer(QUESTIONS, inputs, options)
    assert all(len(answer.split()) <= 3 for answer in expected.answers)
    loaded = load_reader(save_reader(reader, tmp_path / "reader"))
    assert loaded.decoder.num_layers == 1
    assert loaded.answer(QUESTIONS, inputs, options).answers == expected.answers


def test_public_api_only(shared_reader):
    """Library methods stay the libraries' own, and no module instance overrides one (no monkey patching)."""
    reader = shared_reader("t5", "lumen")
    memory, mask = passage_memory(reader.backbone)
    reader.answer(QUESTIONS, ReaderInputs(memory, mask), QueryOptions(num_beams=2))
    methods = [
        BertLMHeadModel.forward,
        BertLMHeadModel.prepare_inputs_for_generation,
        BertModel.forward,
        T5ForConditionalGeneration.forward,
        GenerationMixin.generate,
        GenerationMixin._expand_inputs_for_generation,
    ]
    assert all(method.__module__.startswith("transformers.") for method in methods)
    for family in ("bert", "t5"):
        for module in shared_reader(family, "lumen").modules():
            assert not {"forward", "generate", "prepare_inputs_for_generation"} & set(vars(module))


# -- the extract head ----------------------------------------------------------------------------------------------


def extract_inputs(reader: Reader, passages=PASSAGES) -> ReaderInputs:
    """What the pipeline gives an extract reader: passage text (fid), or memory with the tokens' text offsets."""
    if reader.config.mode == "fid":
        return ReaderInputs(passage_texts=passages)
    memory, mask = passage_memory(reader.backbone, passages)
    flat = [passage for row in passages for passage in row]
    offsets, text_mask = passage_token_offsets(
        reader.backbone.tokenizer, [t for t, _ in flat], [x for _, x in flat], max_length=64
    )
    b = len(passages)
    return ReaderInputs(
        memory,
        mask,
        passage_offsets=PassageOffsets(
            [[text for _, text in row] for row in passages],
            rearrange(offsets, "(b k) l two -> b k l two", b=b),
            rearrange(text_mask, "(b k) l -> b k l", b=b),
        ),
    )


@pytest.mark.parametrize(
    ("family", "mode"),
    [("bert", "fid"), ("bert", "lumen"), ("bert", "glimmer"), ("bert", "memory"), ("t5", "fid"), ("t5", "lumen")],
)
def test_extract_head_answers_with_a_span_of_a_passage_read(paths, family, mode):
    alpha = ALPHA[mode] if family == "bert" else None
    reader = make_reader(paths[family], mode, alpha, head="extract")
    assert reader.decoder is None and reader.span_head is not None
    inputs = extract_inputs(reader)
    out = reader.answer(QUESTIONS, inputs)
    for i, (answer, span) in enumerate(zip(out.answers, out.spans, strict=True)):
        _, text = PASSAGES[i][int(out.kept[i, span.passage])]
        assert answer == span.answer == text[span.char_start : span.char_end] and answer.strip()
        assert len(reader.backbone.tokenizer.tokenize(answer)) <= reader.config.max_answer_tokens
    reader.train()
    losses = reader.loss(QUESTIONS, GOLD, inputs)
    assert {"loss", "span_loss", "passage_loss", "rerank_loss"} == set(losses)
    assert (float(losses["rerank_loss"].detach()) > 0) == (mode == "glimmer")
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reader.span_head.parameters())


def test_extract_distillation_target_weighs_only_passages_holding_the_answer(tiny_bert_path):
    reader = make_reader(tiny_bert_path, "glimmer", ALPHA["glimmer"], head="extract")
    target = distillation_target(reader, extract_inputs(reader))
    assert torch.allclose(target.sum(dim=-1), torch.ones(2))
    # "wilhelm rontgen" is only in passage 0 of question 0; "paris" in passages 0 and 1 of question 1
    assert target[0, 0] == pytest.approx(1.0) and target[1, 2] == pytest.approx(0.0, abs=1e-6)
    assert target[1, :2].min() > 0.05


@pytest.mark.parametrize("objective", ["marginal", "hard_em"])
def test_extract_reader_learns_the_span_and_survives_a_round_trip(tiny_bert_path, tmp_path, objective):
    reader = make_reader(tiny_bert_path, "lumen", ALPHA["lumen"], head="extract", span_objective=objective)
    inputs = extract_inputs(reader)
    optimizer = torch.optim.Adam([p for p in reader.parameters() if p.requires_grad], lr=3e-3)
    reader.train()
    for _ in range(60):
        optimizer.zero_grad()
        reader.loss(QUESTIONS, GOLD, inputs)["loss"].backward()
        optimizer.step()
    reader.eval()
    out = reader.answer(QUESTIONS, inputs)
    assert [answer.lower() for answer in out.answers] == ANSWERS
    assert out.spans[0].passage == 0 and (out.spans[0].char_start, out.spans[0].char_end) == (0, 15)

    saved = torch.load(save_reader(reader, tmp_path / "reader") / WEIGHTS_FILE, weights_only=True)
    assert any(key.startswith("span.") for key in saved) and not any(key.startswith("decoder.") for key in saved)
    loaded = load_reader(tmp_path / "reader")
    assert loaded.config.head == "extract"
    again = loaded.answer(QUESTIONS, inputs)
    assert again.answers == out.answers and again.spans == out.spans


def test_warm_start_takes_the_layers_and_head_that_fit(tiny_bert_path, tmp_path):
    fid = make_reader(tiny_bert_path, "fid", head="extract")
    with torch.no_grad():  # a "trained" FiD reader: every trained tensor moved off its initialisation
        generator = torch.Generator().manual_seed(1)
        for p in fid.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    save_reader(fid, tmp_path / "fid")
    glimmer = make_reader(tiny_bert_path, "glimmer", ALPHA["glimmer"], head="extract")
    reranker_before = {key: value.clone() for key, value in glimmer.reranker.state_dict().items()}
    memory_before = {key: value.clone() for key, value in glimmer.backbone.model.state_dict().items()}

    copied = warm_start(glimmer, tmp_path / "fid")

    source = fid.backbone.model.state_dict()
    for key, value in glimmer.backbone.model.state_dict().items():
        if glimmer.trained_part(key) == "live":  # layers 1-2: the FiD reader's
            assert torch.equal(value, source[key]), key
        else:  # embeddings and the memory layer stay the checkpoint's (they made the store's memory)
            assert torch.equal(value, memory_before[key]), key
            if key.startswith("encoder.layer.0."):  # FiD trained its layer 0; the memory layer is not taken
                assert not torch.equal(value, source[key]), key
    for key, value in glimmer.span_head.state_dict().items():
        assert torch.equal(value, fid.span_head.state_dict()[key]), key
    for key, value in glimmer.reranker.state_dict().items():  # FiD has none: it stays as initialised
        assert torch.equal(value, reranker_before[key]), key
    assert copied == {"live": 2 * 16, "span": len(fid.span_head.state_dict())}

    generate = make_reader(tiny_bert_path, "fid", head="generate", decoder_layers=1)
    assert warm_start(generate, tmp_path / "fid") == {"live": 3 * 16}  # no span head to take in a generate reader
    info = generate.backbone.info
    generate.backbone.info = replace(info, hidden_size=64)  # as if another checkpoint
    with pytest.raises(ValueError, match="hidden_size=32, this run's 64"):
        warm_start(generate, tmp_path / "fid")

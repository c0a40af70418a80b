"""The extractive answer head: span labelling through the real MiniLM tokenizer, span decoding, aggregation
across passages and the loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, T5Tokenizer

from memvq.encoders.backbone import Backbone
from memvq.encoders.embedded import default_model_path
from memvq.encoders.span_head import SpanCandidate, SpanHead, SpanLogits, best_spans, span_loss, token_log_probs
from memvq.encoders.spans import (
    AnswerSpan,
    aggregate,
    answer_char_spans,
    char_to_token_span,
    fid_pair_tokens,
    label_positives,
    passage_token_offsets,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def squad_paragraph(shared_data) -> tuple[str, str, list[dict]]:
    """The first SQuAD v1.1 dev paragraph (Super Bowl 50): title, context, questions with gold answers."""
    with open(shared_data / "squad" / "dev-v1.1.json") as file:
        article = json.load(file)["data"][0]
    paragraph = article["paragraphs"][0]
    return article["title"].replace("_", " "), paragraph["context"], paragraph["qas"]


def token_text(text: str, offsets: torch.Tensor, span: tuple[int, int]) -> str:
    return text[int(offsets[span[0], 0]) : int(offsets[span[1], 1])]


# -- labelling ---------------------------------------------------------------------------------------------------


def test_offsets_line_up_with_the_builds_tokenisation(tokenizer, squad_paragraph, tiny_bert_path):
    title, context, _ = squad_paragraph
    titles, texts = [title, "Paris"], [context, "Paris is the capital of France."]
    offsets, text_mask = passage_token_offsets(tokenizer, titles, texts, max_length=64)
    built = Backbone.from_pretrained(tiny_bert_path).tokenize_passages(titles, texts, max_length=64)
    assert offsets.shape == (*built["input_ids"].shape, 2) and offsets.dtype == torch.int64
    assert not (text_mask & ~built["attention_mask"].bool()).any()
    assert not text_mask[:, 0].any()  # [CLS] and the title are not text
    row = text_mask[1].nonzero().squeeze(1).tolist()
    pieces = [texts[1][offsets[1, i, 0] : offsets[1, i, 1]] for i in row]
    assert pieces == ["Paris", "is", "the", "capital", "of", "France", "."]
    assert tokenizer.convert_ids_to_tokens(built["input_ids"][1, row[0]].item()) == "paris"


def test_squad_gold_answers_round_trip_through_the_tokenizer(tokenizer, squad_paragraph):
    title, context, questions = squad_paragraph
    offsets, text_mask = passage_token_offsets(tokenizer, [title], [context], max_length=256)
    checked = 0
    for question in questions:
        for gold in question["answers"]:
            start, end = gold["answer_start"], gold["answer_start"] + len(gold["text"])
            if (start, end) not in answer_char_spans(context, [gold["text"]]):
                continue  # e.g. "gold" labelled inside "golden": not on word boundaries
            span = char_to_token_span(offsets[0], text_mask[0], start, end)
            assert span is not None and token_text(context, offsets[0], span) == gold["text"]
            checked += 1
    assert checked >= 20


def test_answers_at_the_passage_start_and_end(tokenizer):
    text = "Paris is the capital and largest city of France"
    offsets, text_mask = passage_token_offsets(tokenizer, ["Paris"], [text], max_length=64)
    first = int(text_mask[0].nonzero()[0])
    positives = label_positives([text], [["paris", "France"]], offsets, text_mask, shift=[10])
    assert [(s - 10, e - 10) for s, e in positives[0]] == [(first, first), (first + 8, first + 8)]
    assert [token_text(text, offsets[0], (s - 10, e - 10)) for s, e in positives[0]] == ["Paris", "France"]


def test_several_occurrences_and_none(tokenizer, squad_paragraph):
    title, context, _ = squad_paragraph
    offsets, text_mask = passage_token_offsets(tokenizer, [title, title], [context, context], max_length=256)
    spans = answer_char_spans(context, ["super bowl", "Super Bowl"])  # case-insensitive, de-duplicated
    assert len(spans) == context.count("Super Bowl") == 5
    positives = label_positives([context, context], [["Super Bowl"], ["Tom Brady"]], offsets, text_mask, [0, 0])
    assert [token_text(context, offsets[0], span) for span in positives[0]] == ["Super Bowl"] * 5
    assert positives[1] == []


def test_an_answer_cut_by_truncation_is_not_labelled(tokenizer, squad_paragraph):
    title, context, _ = squad_paragraph
    full, full_mask = passage_token_offsets(tokenizer, [title], [context], max_length=256)
    carolina = context.index("Carolina Panthers")
    last = char_to_token_span(full[0], full_mask[0], carolina, carolina + len("Carolina"))[1]
    offsets, text_mask = passage_token_offsets(tokenizer, [title], [context], max_length=last + 2)  # + [SEP]
    assert token_text(context, offsets[0], (last, last)) == "Carolina"
    answers = [["Carolina Panthers", "Denver Broncos", "Carolina"]]
    positives = label_positives([context], answers, offsets, text_mask, [0])
    assert [token_text(context, offsets[0], span) for span in positives[0]] == ["Denver Broncos", "Carolina"]
    assert char_to_token_span(offsets[0], text_mask[0], carolina, carolina + len("Carolina Panthers")) is None


def test_regex_characters_and_word_boundaries(tokenizer, squad_paragraph):
    text = "He wrote C++ (programming language) code for $5.00, not 5x00, in 19333 and 1933."
    assert answer_char_spans(text, ["c++ (Programming  language)"]) == [(9, 35)]
    assert [text[s:e] for s, e in answer_char_spans(text, ["$5.00", "5.00"])] == ["$5.00", "5.00"]
    assert [text[s:e] for s, e in answer_char_spans(text, ["1933"])] == ["1933"]
    assert answer_char_spans(text, ["", "  ", "[a-z]+", "wrot"]) == []
    offsets, text_mask = passage_token_offsets(tokenizer, ["t"], [text], max_length=64)
    positives = label_positives([text], [["C++", "1933"]], offsets, text_mask, [0])
    assert [token_text(text, offsets[0], span) for span in positives[0]] == ["C++", "1933"]
    _, context, _ = squad_paragraph  # real text: "gold" is the start of "golden" and of "gold-themed"
    assert [context[s : s + 11] for s, _ in answer_char_spans(context, ["gold"])] == ["gold-themed"]


def test_t5_family_tokenizer_offsets():
    """A tiny T5 (sentencepiece unigram, `title </s> text </s>`) tokenizer made from a vocabulary list: a real one is
    not available offline. sequence_ids picks the text whatever the template."""
    words = ["paris", "is", "the", "capital", "of", "france"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"▁{w}", -1.0) for w in words)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    t5 = T5Tokenizer(vocab=vocab, extra_ids=0)
    text = "paris is the capital of france"
    offsets, text_mask = passage_token_offsets(t5, ["paris"], [text], max_length=32)
    assert t5.convert_ids_to_tokens(t5(["paris"], [text])["input_ids"][0])[:3] == ["▁paris", "</s>", "▁paris"]
    positives = label_positives([text], [["Paris", "France"]], offsets, text_mask, [0])
    assert positives[0] == [(2, 2), (7, 7)]
    assert [token_text(text, offsets[0], span) for span in positives[0]] == ["paris", "france"]


def constructed_logits() -> tuple[SpanLogits, torch.Tensor]:
    """b = 1, k = 2, n = 8; text at positions 3..7. Passage 0 holds the best span by its token scores, passage 1 the
    best passage score."""
    start = torch.full((1, 2, 8), -5.0)
    end = torch.full((1, 2, 8), -5.0)
    start[0, 0, 3], end[0, 0, 4] = 4.0, 4.0  # passage 0: span (3, 4)
    start[0, 1, 5], end[0, 1, 6] = 3.5, 3.5  # passage 1: span (5, 6), a little weaker
    start[0, :, 0] = end[0, :, 0] = 10.0  # the no-answer position: the strongest, never a span
    passage = torch.tensor([[0.0, 2.0]])
    span_mask = torch.zeros(1, 2, 8, dtype=torch.bool)
    span_mask[..., 3:] = True
    span_mask[..., 0] = True  # even when the caller marks it, position 0 is not part of a span
    return SpanLogits(start, end, passage), span_mask


def test_best_spans_band_length_and_no_position_zero():
    logits, span_mask = constructed_logits()
    candidates = best_spans(logits, span_mask, max_span_tokens=2, passage_weight=0.0, top_n=100)[0]
    assert len(candidates) == 2 * (5 + 4)  # per passage: 5 one-token and 4 two-token spans in 3..7
    assert all(0 < c.start <= c.end < c.start + 2 and c.start >= 3 for c in candidates)
    assert [c.score for c in candidates] == sorted((c.score for c in candidates), reverse=True)
    assert candidates[0][:3] == (0, 3, 4)
    start_lp, end_lp = token_log_probs(logits, span_mask)
    assert candidates[0].score == pytest.approx((start_lp[0, 0, 3] + end_lp[0, 0, 4]).item())
    short = best_spans(logits, span_mask, max_span_tokens=1, passage_weight=0.0, top_n=100)[0]
    assert len(short) == 10 and all(c.start == c.end for c in short)


def test_passage_weight_changes_the_winner():
    logits, span_mask = constructed_logits()
    assert best_spans(logits, span_mask, 5, passage_weight=0.0, top_n=1)[0][0][:3] == (0, 3, 4)
    best = best_spans(logits, span_mask, 5, passage_weight=1.0, top_n=1)[0][0]
    assert best[:3] == (1, 5, 6)
    start_lp, end_lp = token_log_probs(logits, span_mask)
    expected = start_lp[0, 1, 5] + end_lp[0, 1, 6] + logits.passage.log_softmax(-1)[0, 1]
    assert best.score == pytest.approx(expected.item())


def test_best_spans_with_no_allowed_position():
    logits, span_mask = constructed_logits()
    assert best_spans(logits, torch.zeros_like(span_mask), 5, 1.0, top_n=3) == [[]]


def test_aggregation_adds_up_the_same_answer_across_passages(tokenizer):
    texts = [
        "The Denver Broncos won Super Bowl 50.",
        "Super Bowl 50 was won by the Carolina Panthers, some said.",
        "In February 2016 the Denver Broncos beat Carolina.",
    ]
    offsets, text_mask = passage_token_offsets(tokenizer, ["Super Bowl 50"] * 3, texts, max_length=64)
    shift = [7, 7, 7]
    answers = [["the Denver Broncos"], ["Carolina Panthers"], ["Denver Broncos"]]
    spans = [spans[0] for spans in label_positives(texts, answers, offsets, text_mask, shift)]
    candidates = [
        SpanCandidate(1, *spans[1], math.log(0.4)),
        SpanCandidate(0, *spans[0], math.log(0.3)),
        SpanCandidate(2, *spans[2], math.log(0.25)),
    ]
    answer = aggregate(candidates, texts, offsets, shift)
    expected = AnswerSpan("The Denver Broncos", 0, 0, 18, pytest.approx(math.log(0.55)), math.log(0.4), support=2)
    assert answer == expected
    single = aggregate(candidates[:2], texts, offsets, shift)
    assert single.answer == "Carolina Panthers" and texts[1][single.char_start : single.char_end] == single.answer
    assert single.runner_up == math.log(0.3) and single.support == 1
    assert aggregate([], texts, offsets, shift) is None


# -- loss --------------------------------------------------------------------------------------------------------


def random_logits(batch: int, k: int, n: int, seed: int = 0) -> SpanLogits:
    generator = torch.Generator().manual_seed(seed)
    return SpanLogits(
        *(torch.randn(shape, generator=generator, requires_grad=True) for shape in [(batch, k, n)] * 2 + [(batch, k)])
    )


def test_marginal_and_hard_em_differ_on_two_occurrences():
    logits = random_logits(1, 2, 10)
    span_mask = torch.zeros(1, 2, 10, dtype=torch.bool)
    span_mask[..., 4:] = True
    two = [[(4, 5), (7, 8)], []]
    marginal = span_loss(logits, span_mask, two, "marginal")["span_loss"]
    hard = span_loss(logits, span_mask, two, "hard_em")["span_loss"]
    assert marginal < hard
    start_lp, end_lp = token_log_probs(logits, span_mask)
    occurrences = torch.stack([start_lp[0, 0, 4] + end_lp[0, 0, 5], start_lp[0, 0, 7] + end_lp[0, 0, 8]])
    no_answer = -(start_lp[0, 1, 0] + end_lp[0, 1, 0])
    assert marginal.item() == pytest.approx(((-occurrences.logsumexp(0) + no_answer) / 2).item(), rel=1e-5)
    assert hard.item() == pytest.approx(((-occurrences.max() + no_answer) / 2).item(), rel=1e-5)
    one = [[(4, 5)], []]
    assert span_loss(logits, span_mask, one, "marginal")["loss"] == span_loss(logits, span_mask, one, "hard_em")["loss"]


def test_a_pair_without_an_answer_pushes_position_zero():
    logits = random_logits(1, 1, 6)
    span_mask = torch.tensor([[[False, False, True, True, True, True]]])
    losses = span_loss(logits, span_mask, [[]])
    assert losses["passage_loss"].item() == 0.0  # no question with an answer: no passage loss
    losses["loss"].backward()
    assert logits.start.grad[0, 0, 0] < 0 and logits.end.grad[0, 0, 0] < 0  # descent raises position 0
    assert (logits.start.grad[0, 0, 2:] > 0).all()
    assert (logits.start.grad[0, 0, 1] == 0).all()  # not allowed: no gradient
    assert logits.passage.grad is None  # the passage loss is a constant 0


def test_passage_loss_marginalises_over_the_pairs_with_an_answer():
    logits = random_logits(2, 3, 6)
    span_mask = torch.zeros(2, 3, 6, dtype=torch.bool)
    span_mask[..., 2:] = True
    positives = [[(2, 3)], [], [(4, 4)], [], [], []]  # question 1 has no answer anywhere: skipped
    losses = span_loss(logits, span_mask, positives, passage_weight=0.5)
    passage_lp = logits.passage.log_softmax(-1)
    assert losses["passage_loss"].item() == pytest.approx(-passage_lp[0, [0, 2]].logsumexp(0).item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx((losses["span_loss"] + 0.5 * losses["passage_loss"]).item())


def test_span_loss_rejects_bad_positives():
    logits = random_logits(1, 1, 6)
    span_mask = torch.zeros(1, 1, 6, dtype=torch.bool)
    span_mask[..., 2:] = True
    with pytest.raises(ValueError, match="span mask"):
        span_loss(logits, span_mask, [[(1, 3)]])
    with pytest.raises(ValueError, match="before it starts"):
        span_loss(logits, span_mask, [[(4, 3)]])
    with pytest.raises(ValueError, match="pairs"):
        span_loss(logits, span_mask, [[], []])


@pytest.mark.parametrize("pooler", [True, False])
def test_gradients_flow_and_a_tiny_head_overfits_one_example(pooler):
    torch.manual_seed(0)
    hidden = torch.randn(1, 3, 12, 16)
    span_mask = torch.zeros(1, 3, 12, dtype=torch.bool)
    span_mask[..., 5:] = True
    positives = [[], [(6, 8)], []]
    head = SpanHead(16, pooler=pooler)
    loss = span_loss(head(hidden), span_mask, positives)["loss"]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        span_loss(head(hidden), span_mask, positives)["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        best = best_spans(head(hidden), span_mask, max_span_tokens=10, passage_weight=1.0, top_n=1)[0][0]
        final = span_loss(head(hidden), span_mask, positives)["loss"]
    assert best[:3] == (1, 6, 8) and final < loss


def test_fid_rows_offsets_point_into_the_text(tokenizer):
    questions = ["who wrote it", "where"]
    titles, texts = ["Hamlet", "Paris"], ["Hamlet was written by William Shakespeare.", "Paris is in France."]
    encoding, offsets, text_mask = fid_pair_tokens(tokenizer, questions, titles, texts, max_length=32)
    assert offsets.shape == (*encoding["input_ids"].shape, 2)
    for row, text in enumerate(texts):
        kept = text_mask[row].nonzero().squeeze(1).tolist()
        pieces = [text[offsets[row, i, 0] : offsets[row, i, 1]] for i in kept]
        assert "".join(pieces) == text.replace(" ", "")  # every text token, no question or title token
    [[span]] = label_positives(texts[:1], [["William Shakespeare"]], offsets[:1], text_mask[:1], [0])
    assert token_text(texts[0], offsets[0], span) == "William Shakespeare"

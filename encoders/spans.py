"""The text side of the extractive answer head: character offsets of the passages' tokens, gold answers found in
the passage text and labelled as token spans, and decoded token spans turned back into answer text.

Token index i here is token i of the store's memory: the passages are tokenised with the call the build uses
(`encoders.backbone.tokenize_passage_pairs`) plus the offsets. Spans in pair coordinates are the memory index plus
the pair's `shift`, the position of the passage's first token in the packed [question; passage] pair (the
question's length). Offsets are character offsets into the passage `text`, never the title; `text_mask` marks the
text's tokens (`sequence_ids == 1`, which any fast tokenizer gives: BERT `[CLS] title [SEP] text [SEP]` and T5
`title </s> text </s>` alike).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

from memvq.data.kilt.metrics import normalize_answer
from memvq.encoders.backbone import tokenize_passage_pairs
from memvq.encoders.span_head import SpanCandidate

CharSpan = tuple[int, int]  # [start, end) characters of the text
TokenSpan = tuple[int, int]  # first and last token, inclusive


class AnswerSpan(NamedTuple):
    """The extracted answer: text[char_start:char_end] of passage `passage` (index among the k read) and its
    score (the log of the summed probabilities of every candidate with the same normalised answer); runner_up:
    the same score of the second-best answer (-inf: none), support: how many of the passages read hold
    candidates of this answer."""

    answer: str
    passage: int
    char_start: int
    char_end: int
    score: float
    runner_up: float = float("-inf")
    support: int = 1


def passage_token_offsets(
    tokenizer: PreTrainedTokenizerBase, titles: Sequence[str], texts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise (title, text) pairs as the build does -> offsets 'r l 2' (int64 character offsets into each
    text) and text_mask 'r l' (bool: the token is a non-empty piece of the text)."""
    if not tokenizer.is_fast:
        raise ValueError("character offsets need a fast tokenizer")
    if tokenizer.padding_side != "right":
        raise ValueError("pair positions assume the passage tokens are padded on the right")
    encoding = tokenize_passage_pairs(tokenizer, list(titles), list(texts), max_length, return_offsets_mapping=True)
    offsets = torch.tensor(encoding["offset_mapping"], dtype=torch.long)
    in_text = torch.tensor([[sequence == 1 for sequence in encoding.sequence_ids(row)] for row in range(len(texts))])
    return offsets, in_text & (offsets[..., 1] > offsets[..., 0])


def fid_pair_tokens(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    titles: Sequence[str],
    texts: Sequence[str],
    max_length: int,
) -> tuple[BatchEncoding, torch.Tensor, torch.Tensor]:
    """FiD's rows `question [SEP] title [SEP] text`, tokenised once -> the encoding (tensors 'r n'), offsets
    'r n 2' (character offsets into each text; pair coordinates, no shift) and text_mask 'r n' (the text's
    non-empty tokens, not the question's or the title's)."""
    separator = tokenizer.sep_token or tokenizer.eos_token
    prefixes = [f"{title} {separator} " for title in titles]
    encoding = tokenizer(
        list(questions),
        [prefix + text for prefix, text in zip(prefixes, texts, strict=True)],
        truncation="longest_first",
        max_length=max_length,
        padding=True,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    offsets = encoding.pop("offset_mapping")
    second = torch.tensor([[sequence == 1 for sequence in encoding.sequence_ids(row)] for row in range(len(texts))])
    start = torch.tensor([len(prefix) for prefix in prefixes])[:, None]
    text_mask = second & (offsets[..., 0] >= start) & (offsets[..., 1] > offsets[..., 0])
    return encoding, (offsets - start[..., None]).clamp(min=0), text_mask


def answer_char_spans(text: str, answers: Sequence[str]) -> list[CharSpan]:
    """Every occurrence of every answer in `text`: case-insensitive, any run of whitespace matching any run, not
    inside a longer word (an answer starting / ending with a word character needs a non-word character or the
    text's edge beside it). Sorted, de-duplicated [start, end) character spans."""
    spans: set[CharSpan] = set()
    for answer in answers:
        words = answer.split()
        if not words:
            continue
        pattern = r"\s+".join(re.escape(word) for word in words)
        if re.match(r"\w", words[0]):
            pattern = r"(?<!\w)" + pattern
        if re.search(r"\w$", words[-1]):
            pattern += r"(?!\w)"
        spans.update(match.span() for match in re.finditer(pattern, text, flags=re.IGNORECASE))
    return sorted(spans)


def char_to_token_span(
    offsets: torch.Tensor, text_mask: torch.Tensor, char_start: int, char_end: int
) -> TokenSpan | None:
    """The text tokens (offsets 'l 2', text_mask 'l') covering characters [char_start, char_end): first to last
    overlapping token, inclusive. None when no token overlaps or the kept tokens end before char_end (the span
    was cut by truncation)."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    overlap = text_mask & (starts < char_end) & (ends > char_start)
    if not overlap.any() or int(ends[text_mask].max()) < char_end:
        return None
    tokens = overlap.nonzero().squeeze(1)
    return int(tokens[0]), int(tokens[-1])


def label_positives(
    texts: Sequence[str],
    answers: Sequence[Sequence[str]],
    offsets: torch.Tensor,
    text_mask: torch.Tensor,
    shift: Sequence[int],
) -> list[list[TokenSpan]]:
    """Per passage r (texts, answers[r] its gold answers, offsets 'r l 2', text_mask 'r l'), the token spans of
    every answer occurrence the kept tokens hold, in pair coordinates (token index + shift[r]), sorted."""
    positives = []
    for row, text in enumerate(texts):
        spans = (
            char_to_token_span(offsets[row], text_mask[row], start, end)
            for start, end in answer_char_spans(text, answers[row])
        )
        positives.append(sorted({(shift[row] + first, shift[row] + last) for first, last in filter(None, spans)}))
    return positives


def _logsumexp(scores: Sequence[float]) -> float:
    top = max(scores)
    return top + math.log(sum(math.exp(score - top) for score in scores))


def aggregate(
    candidates: Sequence[SpanCandidate],
    passage_texts: Sequence[str],
    offsets: torch.Tensor,
    shift: Sequence[int],
    normalize: Callable[[str], str] = normalize_answer,
) -> AnswerSpan | None:
    """One question's answer from its candidates (pair coordinates over its k passages: texts, offsets 'k l 2',
    shift 'k'): candidates with the same `normalize`d text are one answer whose score is the logsumexp of theirs;
    the best answer is reported at its best single occurrence, with the second-best answer's score and the
    number of passages holding the best one. None without candidates."""
    groups: dict[str, list[AnswerSpan]] = {}
    for candidate in candidates:
        passage = candidate.passage
        first, last = candidate.start - shift[passage], candidate.end - shift[passage]
        char_start, char_end = int(offsets[passage, first, 0]), int(offsets[passage, last, 1])
        answer = passage_texts[passage][char_start:char_end]
        span = AnswerSpan(answer, passage, char_start, char_end, candidate.score)
        groups.setdefault(normalize(answer), []).append(span)
    if not groups:
        return None
    scored = sorted(
        ((_logsumexp([span.score for span in group]), group) for group in groups.values()),
        key=lambda item: item[0],
        reverse=True,
    )
    score, group = scored[0]
    runner_up = scored[1][0] if len(scored) > 1 else float("-inf")
    best = max(group, key=lambda span: span.score)
    return best._replace(score=score, runner_up=runner_up, support=len({span.passage for span in group}))

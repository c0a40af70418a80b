"""Chunking of documents into ~100-word passages with KILT-style provenance.

Words are whitespace-split (the same rule as ``str.split()``) and passages are filled with
consecutive words across paragraph boundaries, up to a number of words and of characters (the
words joined by single spaces; by default 20 per word of the word limit), whatever the whitespace:
a word longer than the character limit (a million-character token, text without spaces) is split
into pieces of that many characters, each counted as a word. Every passage records the inclusive
range of source paragraph ids its words come from and the character offsets of its first word (``start_character``
in ``paragraphs[start_paragraph_id]``) and of the end of its last word (``end_character``, exclusive,
in ``paragraphs[end_paragraph_id]``), as in KILT provenance, so
``paragraphs[start][start_character:]`` begins with the passage's first word and
``paragraphs[end][:end_character]`` ends with its last word.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from memvq.data.ingest.sources import Document

# `\S+` over str is exactly the complement of str.isspace(), i.e. the words of str.split().
_WORD = re.compile(r"\S+")
# The character limit of a passage when none is given: this many per word of the word limit.
CHARS_PER_WORD = 20


@dataclass(frozen=True, slots=True)
class Passage:
    passage_id: str  # f"{doc_id}::{index}", index = position of the passage within its document
    doc_id: str
    title: str
    text: str  # the passage's words joined by single spaces
    start_paragraph_id: int  # inclusive source paragraph ids (KILT numbering, title paragraph = 0)
    end_paragraph_id: int
    start_character: int  # offset of the first word in paragraphs[start_paragraph_id]
    end_character: int  # exclusive end of the last word in paragraphs[end_paragraph_id]


@dataclass
class ChunkReport:
    """What chunking had to cut: words longer than the character limit, split into pieces."""

    split_words: int = 0


def _check_limit(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _char_limit(words_per_passage: int, max_passage_chars: int | None) -> int:
    """The checked limits' character limit (``max_passage_chars``, default ``CHARS_PER_WORD`` per word)."""
    _check_limit("words_per_passage", words_per_passage)
    if max_passage_chars is None:
        return CHARS_PER_WORD * words_per_passage
    _check_limit("max_passage_chars", max_passage_chars)
    return max_passage_chars


def _word_spans(doc: Document, first_paragraph: int, max_chars: int, report: ChunkReport) -> list[tuple[int, int, int]]:
    """(paragraph id, start, end) of every word from ``first_paragraph`` on, a word longer than ``max_chars`` cut
    into pieces of ``max_chars`` characters (the last one shorter), counted in ``report``."""
    spans: list[tuple[int, int, int]] = []
    for pid in range(first_paragraph, len(doc.paragraphs)):
        paragraph = doc.paragraphs[pid]
        if len(paragraph) <= max_chars:  # no word to cut (the common case, kept fast)
            spans.extend((pid, match.start(), match.end()) for match in _WORD.finditer(paragraph))
            continue
        for match in _WORD.finditer(paragraph):
            start, end = match.span()
            if end - start > max_chars:
                report.split_words += 1
            spans.extend((pid, a, min(a + max_chars, end)) for a in range(start, end, max_chars))
    return spans


def _passage_bounds(spans: list[tuple[int, int, int]], words_per_passage: int, max_chars: int) -> list[tuple[int, int]]:
    """(start, end) word ranges of the passages: filled in order up to ``words_per_passage`` words and
    ``max_chars`` characters (the words, none longer than ``max_chars``, joined by single spaces). A short tail
    (< words_per_passage // 4 words) is merged into the previous passage when the two fit in ``max_chars``, unless
    it would be the only one."""
    # ends[i] - ends[j] - 1: the characters of words j .. i-1 joined by single spaces
    ends = [0, *accumulate(end - start + 1 for _, start, end in spans)]
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < len(spans):
        last = min(start + words_per_passage, len(spans))
        end = bisect_right(ends, ends[start] + max_chars + 1, start + 1, last + 1) - 1
        bounds.append((start, end))
        start = end
    if len(bounds) > 1:
        (first, _), (tail, end) = bounds[-2], bounds[-1]
        if end - tail < words_per_passage // 4 and ends[end] - ends[first] - 1 <= max_chars:
            bounds[-2:] = [(first, end)]
    return bounds


def _chunk(
    doc: Document, words_per_passage: int, skip_title_paragraph: bool, max_chars: int, report: ChunkReport
) -> Iterator[Passage]:
    spans: list[tuple[int, int, int]] = []
    paragraphs = doc.paragraphs
    if skip_title_paragraph and len(paragraphs) > 1 and paragraphs[0].strip() == doc.title.strip():
        spans = _word_spans(doc, 1, max_chars, report)
    if not spans:  # no title paragraph to skip, or nothing but the title: keep paragraph 0
        spans = _word_spans(doc, 0, max_chars, report)
    for index, (start, end) in enumerate(_passage_bounds(spans, words_per_passage, max_chars)):
        words = spans[start:end]
        first_pid, first_start, _ = words[0]
        last_pid, _, last_end = words[-1]
        yield Passage(
            passage_id=f"{doc.doc_id}::{index}",
            doc_id=doc.doc_id,
            title=doc.title,
            text=" ".join(paragraphs[pid][a:b] for pid, a, b in words),
            start_paragraph_id=first_pid,
            end_paragraph_id=last_pid,
            start_character=first_start,
            end_character=last_end,
        )


def chunk_document(
    doc: Document,
    words_per_passage: int = 100,
    skip_title_paragraph: bool = True,
    max_passage_chars: int | None = None,
    report: ChunkReport | None = None,
) -> Iterator[Passage]:
    """Split one document into passages of at most ``words_per_passage`` words and
    ``max_passage_chars`` characters (None: ``CHARS_PER_WORD * words_per_passage``).

    Longer words are split into pieces of ``max_passage_chars`` characters, counted in ``report``.
    The only exception to the word limit is the last passage of a document, which absorbs a
    trailing remainder of fewer than ``words_per_passage // 4`` words when the two fit in the
    character limit (so it can hold up to ``words_per_passage + words_per_passage // 4 - 1``
    words); a document shorter than that is one passage. With ``skip_title_paragraph``,
    paragraph 0 is left out when it is just the title (``paragraphs[0].strip() == title.strip()``)
    and later paragraphs hold words; paragraph ids keep the source numbering either way. A
    document without any word yields no passage. Deterministic: the same document always gives
    the same passages and ids. ``ValueError`` (raised at call time)
    if ``words_per_passage`` or ``max_passage_chars`` is not an integer >= 1."""
    max_chars = _char_limit(words_per_passage, max_passage_chars)
    report = report if report is not None else ChunkReport()
    return _chunk(doc, words_per_passage, skip_title_paragraph, max_chars, report)


def iter_passages(
    documents: Iterable[Document],
    words_per_passage: int = 100,
    skip_title_paragraph: bool = True,
    max_passage_chars: int | None = None,
    report: ChunkReport | None = None,
) -> Iterator[Passage]:
    """Chunk a stream of documents lazily, document by document (see ``chunk_document``)."""
    max_chars = _char_limit(words_per_passage, max_passage_chars)
    report = report if report is not None else ChunkReport()
    return (
        passage
        for doc in documents
        for passage in _chunk(doc, words_per_passage, skip_title_paragraph, max_chars, report)
    )

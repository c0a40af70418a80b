"""Chunking of documents into ~100-word passages with KILT-style provenance.

Words are whitespace-split (the same rule as ``str.split()``) and passages are filled with
consecutive words across paragraph boundaries. Every passage records the inclusive range of source
paragraph ids its words come from and the character offsets of its first word (``start_character``
in ``paragraphs[start_paragraph_id]``) and of the end of its last word (``end_character``, exclusive,
in ``paragraphs[end_paragraph_id]``), as in KILT provenance, so
``paragraphs[start][start_character:]`` begins with the passage's first word and
``paragraphs[end][:end_character]`` ends with its last word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from data.ingest.corpus import Document

# `\S+` over str is exactly the complement of str.isspace(), i.e. the words of str.split().
_WORD = re.compile(r"\S+")


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


def _check_words_per_passage(words_per_passage: int) -> None:
    if isinstance(words_per_passage, bool) or not isinstance(words_per_passage, int):
        raise ValueError(f"words_per_passage must be an integer >= 1, got {words_per_passage!r}")
    if words_per_passage < 1:
        raise ValueError(f"words_per_passage must be >= 1, got {words_per_passage}")


def _word_spans(doc: Document, first_paragraph: int) -> list[tuple[int, int, int]]:
    """(paragraph id, start, end) of every word from ``first_paragraph`` on."""
    return [
        (pid, match.start(), match.end())
        for pid in range(first_paragraph, len(doc.paragraphs))
        for match in _WORD.finditer(doc.paragraphs[pid])
    ]


def _passage_starts(n_words: int, words_per_passage: int) -> list[int]:
    """Start word index of each passage; a short tail (< words_per_passage // 4 words) is merged
    into the previous passage unless it would be the only one."""
    starts = list(range(0, n_words, words_per_passage))
    if len(starts) > 1 and n_words - starts[-1] < words_per_passage // 4:
        starts.pop()
    return starts


def _chunk(doc: Document, words_per_passage: int, skip_title_paragraph: bool) -> Iterator[Passage]:
    spans: list[tuple[int, int, int]] = []
    paragraphs = doc.paragraphs
    if skip_title_paragraph and len(paragraphs) > 1 and paragraphs[0].strip() == doc.title.strip():
        spans = _word_spans(doc, 1)
    if not spans:  # no title paragraph to skip, or nothing but the title: keep paragraph 0
        spans = _word_spans(doc, 0)
    starts = _passage_starts(len(spans), words_per_passage)
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(spans)
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


def chunk_document(doc: Document, words_per_passage: int = 100, skip_title_paragraph: bool = True) -> Iterator[Passage]:
    """Split one document into passages of at most ``words_per_passage`` words.

    The only exception is the last passage of a document, which absorbs a trailing remainder of
    fewer than ``words_per_passage // 4`` words (so it can hold up to
    ``words_per_passage + words_per_passage // 4 - 1`` words); a document shorter than that is one
    passage. With ``skip_title_paragraph``, paragraph 0 is left out when it is just the title
    (``paragraphs[0].strip() == title.strip()``) and later paragraphs hold words; paragraph ids keep
    the source numbering either way. A document without any word yields no passage. Deterministic:
    the same document always gives the same passages and ids. ``ValueError`` (raised at call time)
    if ``words_per_passage`` is not an integer >= 1."""
    _check_words_per_passage(words_per_passage)
    return _chunk(doc, words_per_passage, skip_title_paragraph)


def iter_passages(
    documents: Iterable[Document], words_per_passage: int = 100, skip_title_paragraph: bool = True
) -> Iterator[Passage]:
    """Chunk a stream of documents lazily, document by document (see ``chunk_document``)."""
    _check_words_per_passage(words_per_passage)
    return (passage for doc in documents for passage in _chunk(doc, words_per_passage, skip_title_paragraph))

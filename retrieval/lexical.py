"""The lexical index: BM25 over each passage's title and text, kept in the store beside the dense index.

It is bm25s (numpy only, in the process, its matrices memory-mapped when loaded; chosen over tantivy, which keeps
its own on-disk segments and row ids, and rank-bm25, which scores every passage in Python per question). It indexes
a generation's live rows only (a store update builds it again without the rows it deleted), so its word statistics
are those of a store built from the same passages, and `rows.npy` maps its documents to store rows.

On disk a directory of bm25s's files (its sparse score matrix, vocabulary and parameters) and `rows.npy`, each moved
into place atomically, and `lexical.json` last: its `memvq-lexical` header with every file's size and sha256 and
the number of documents indexed (a store whose live passages hold no word to index keeps `rows.npy` alone).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import bm25s
import numpy as np

from memvq.memory.artifact import ArtifactError, ArtifactFormat, read_artifact, write_artifact

LEXICAL_FORMAT = ArtifactFormat(
    "memvq-lexical", 2, remake="build the store again into a new --out, or ask for dense retrieval"
)
HEADER = "lexical.json"
ROWS = "rows.npy"
STOPWORDS = "en"


def _tokens(texts: list[str]) -> list[list[str]]:
    """Lower-cased word tokens without English stopwords (the index's and the questions' alike)."""
    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


class LexicalIndex:
    """BM25 over passage rows; `search` gives the top rows per question."""

    def __init__(self, model: bm25s.BM25 | None, rows: np.ndarray) -> None:
        self.model = model  # None: no passage has a word to index (none, or stopwords only)
        self.rows = rows  # store row of each indexed document, int64

    @classmethod
    def build(cls, passages: Iterable[tuple[int, str, str]], out: Path) -> LexicalIndex:
        """Index (store row, title, text) triples into `out` (complete once its header is written)."""
        rows, texts = [], []
        for row, title, text in passages:
            rows.append(row)
            texts.append(f"{title} {text}")
        tokens = bm25s.tokenize(texts, stopwords=STOPWORDS, show_progress=False)
        model = None
        if tokens.vocab:
            model = bm25s.BM25()
            model.index(tokens, show_progress=False)
        shutil.rmtree(out, ignore_errors=True)  # written afresh: nothing of an unfinished or older index stays
        staging = out / f".staging-{os.getpid()}"
        staging.mkdir(parents=True)
        if model is not None:
            model.save(str(staging), show_progress=False)
        np.save(staging / ROWS, np.asarray(rows, dtype=np.int64))
        names = sorted(path.name for path in staging.iterdir())
        for name in names:
            os.replace(staging / name, out / name)
        staging.rmdir()
        files = {name: out / name for name in names}
        extra = {"indexed_rows": len(rows), "empty": model is None}
        write_artifact(out, HEADER, LEXICAL_FORMAT, {"stopwords": STOPWORDS}, files, extra)
        return cls(model, np.load(out / ROWS, mmap_mode="r"))

    @staticmethod
    def complete(directory: Path) -> bool:
        """Whether `directory` holds a finished index of the format this memvq reads (one an older memvq left in a
        build it did not finish is not: `build` writes it again)."""
        try:
            read_artifact(directory / HEADER, LEXICAL_FORMAT, "lexical index header")
        except ArtifactError:  # no header, or another format or version
            return False
        return True

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        """Load a saved index, its matrices memory-mapped (the store's manifest has checked their sha256)."""
        header = read_artifact(directory / HEADER, LEXICAL_FORMAT, "lexical index header")
        empty = bool(header.extra.get("empty"))
        model = None if empty else bm25s.BM25.load(str(directory), mmap=True, show_progress=False)
        return cls(model, np.load(directory / ROWS, mmap_mode="r"))

    def search(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k store rows by BM25: (scores 'q k' float32, rows 'q k' int64), best first; -inf / -1 where fewer
        rows share a word with the question (a row scoring 0 is not a match)."""
        scores = np.full((len(questions), k), -np.inf, dtype=np.float32)
        rows = np.full((len(questions), k), -1, dtype=np.int64)
        if not questions or self.model is None:
            return scores, rows
        depth = min(k, len(self.rows))
        found, found_scores = self.model.retrieve(_tokens(questions), k=depth, show_progress=False, n_threads=0)
        match = found_scores > 0
        scores[:, :depth] = np.where(match, found_scores, -np.inf)
        rows[:, :depth] = np.where(match, np.asarray(self.rows)[found], -1)
        return scores, rows

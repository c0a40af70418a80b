"""A corpus in, documents out: the files a corpus path holds, the format of each (from its name and first record:
`detect_format`), and their documents in order (`iter_documents`), read by the format's streaming reader
(`formats`) from its file (`sources`), so a corpus is never held in memory as a whole.

A malformed line or record is never fatal: it is logged as a warning with its file and line number,
appended to ``IngestReport.bad_records`` and skipped. So is a document whose id an earlier document
of the same call had (across all the files of a directory): the first one is kept. Problems with a
whole input (missing path, unknown format, unreadable header, no documents at all) raise
``CorpusError``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from ijson.common import JSONError

from memvq.data.ingest.formats import READERS, TSV_COLUMNS, classify_record, sniff_json_document
from memvq.data.ingest.sources import (
    BadRecord,
    CorpusError,
    Document,
    IngestReport,
    ReadState,
    base_suffix,
    is_gz,
    iter_lines,
    open_binary,
)

logger = logging.getLogger(__name__)

FORMATS = ("kilt", "squad", "dpr-json", "dpr-tsv", "jsonl", "parquet")

# Suffixes picked up when a directory is ingested (a trailing ".gz" is allowed on the text formats).
_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
_TSV_SUFFIXES = (".tsv",)
_PARQUET_SUFFIXES = (".parquet", ".pq")
_TEXT_SUFFIXES = _JSON_SUFFIXES + _TSV_SUFFIXES
# How many lines of a line-based file detection looks at when the first record does not decide it.
_SNIFF_MAX_LINES = 100


# --------------------------------------------------------------------------------------------------
# Format detection


def _unknown(path: Path, why: str) -> CorpusError:
    return CorpusError(
        f"cannot detect the corpus format of {path}: {why}. Supported formats: {', '.join(FORMATS)} "
        "(pass fmt=... to force one)"
    )


def _sniff_json(path: Path) -> str | None:
    """Classify a JSON / JSON-lines file by its first value, else by its first decisive line."""
    try:
        found = sniff_json_document(path)
        if found:
            return found
    except (JSONError, UnicodeDecodeError):
        pass  # first record malformed: look at the following lines below
    except (OSError, EOFError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc
    # JSON lines whose first line is broken or not decisive: the first decisive line decides.
    seen = 0
    for _, line, _ in iter_lines(path):
        if line is None or not line.strip():
            continue
        seen += 1
        if seen > _SNIFF_MAX_LINES:
            break
        try:
            found = classify_record(json.loads(line))
        except json.JSONDecodeError:
            continue
        if found:
            return found
    return None


def _first_line(path: Path) -> str | None:
    for _, line, _ in iter_lines(path):
        return line
    return None


def _looks_like_tsv(path: Path) -> bool:
    header = _first_line(path)
    return header is not None and set(TSV_COLUMNS) <= {h.strip() for h in header.rstrip("\r\n").split("\t")}


def detect_format(path: Path) -> str:
    """The format of one file, from its extension and its first record.

    ``.parquet``/``.pq`` -> parquet; ``.tsv`` -> dpr-tsv (header id/text/title checked);
    ``.json``/``.jsonl``/``.ndjson`` (optionally ``.gz``) -> sniffed: a top-level ``data`` array is
    SQuAD, an array of records with ``*_ctxs`` is DPR json, lines with ``wikipedia_id`` + ``text``
    are KILT and lines with ``id`` + ``text`` are plain jsonl. Raises ``CorpusError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"not a file: {path}")
    suffix = base_suffix(path)
    if suffix in _PARQUET_SUFFIXES:
        if is_gz(path):
            raise _unknown(path, "gzip-compressed parquet is not supported (parquet compresses internally)")
        return "parquet"
    if path.stat().st_size == 0:
        raise _unknown(path, "the file is empty")
    if suffix in _TSV_SUFFIXES:
        if _looks_like_tsv(path):
            return "dpr-tsv"
        raise _unknown(path, f"a .tsv file must start with a header holding {'/'.join(TSV_COLUMNS)}")
    if suffix not in _JSON_SUFFIXES:
        # Unknown extension: parquet magic, a DPR tsv header, or JSON.
        with open_binary(path) as fh:
            if fh.read(4) == b"PAR1":
                return "parquet"
        if _looks_like_tsv(path):
            return "dpr-tsv"
    found = _sniff_json(path)
    if found is None:
        raise _unknown(path, "its first records match none of the supported formats")
    return found


# --------------------------------------------------------------------------------------------------
# Public entry point


def _is_candidate(path: Path) -> bool:
    if any(part.startswith(".") for part in path.parts):
        return False
    suffix = base_suffix(path)
    if is_gz(path):
        return suffix in _TEXT_SUFFIXES
    return suffix in _TEXT_SUFFIXES or suffix in _PARQUET_SUFFIXES


def corpus_files(root: Path) -> list[Path]:
    """The files ``iter_documents`` reads, in its order: ``root`` itself, or the supported files under it."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise CorpusError(f"corpus path does not exist: {root}")
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and _is_candidate(p.relative_to(root))),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    ignored = sum(1 for p in root.rglob("*") if p.is_file()) - len(files)
    if ignored:
        logger.debug("%s: ignoring %d file(s) without a supported extension", root, ignored)
    return files


def iter_documents(path: Path | str, fmt: str | None = None, report: IngestReport | None = None) -> Iterator[Document]:
    """Stream the documents of a corpus file, or of every supported file under a directory.

    A directory is walked recursively, files sorted by relative path, hidden files skipped; each
    file's format is detected separately unless ``fmt`` is given. The path, the format names and
    the detection are checked when this is called; documents are then read lazily. Malformed
    records, and documents whose id an earlier one had (the first is kept), are logged, added to
    ``report.bad_records`` and skipped. ``CorpusError`` is raised at
    the end of iteration if no document at all was produced."""
    if fmt is not None and fmt not in FORMATS:
        raise CorpusError(f"unknown corpus format {fmt!r}; supported formats: {', '.join(FORMATS)}")
    root = Path(path)
    report = report if report is not None else IngestReport()
    files = corpus_files(root)
    if not files:
        raise CorpusError(
            f"empty corpus: 0 documents in {root} (0 bad records; no file with a supported extension: "
            f"{', '.join(_TEXT_SUFFIXES + _PARQUET_SUFFIXES)})"
        )
    plan = [(file, fmt or detect_format(file)) for file in files]
    return _iter_plan(root, plan, report)


def _iter_plan(root: Path, plan: Iterable[tuple[Path, str]], report: IngestReport) -> Iterator[Document]:
    state = ReadState()
    produced = 0
    bad = 0
    for file, file_fmt in plan:
        file_docs = 0
        file_bad = 0
        logger.info("reading %s as %s", file, file_fmt)
        for item in READERS[file_fmt](file, state):
            if not isinstance(item, BadRecord):
                line, document = item
                if document.doc_id not in state.doc_ids:
                    state.doc_ids.add(document.doc_id)
                    report.documents += 1
                    file_docs += 1
                    yield document
                    continue
                report.duplicate_ids += 1
                item = BadRecord(
                    str(file), line, f"duplicate document id {document.doc_id!r} (an earlier document has it; kept)"
                )
            logger.warning("%s:%d: skipped bad record: %s", item.path, item.line, item.reason)
            report.bad_records.append(item)
            file_bad += 1
        logger.info("%s: %d documents, %d bad records", file, file_docs, file_bad)
        produced += file_docs
        bad += file_bad
    if produced == 0:
        raise CorpusError(f"empty corpus: 0 documents in {root} ({bad} bad records)")

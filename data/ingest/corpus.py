"""Streaming corpus readers: KILT knowledge source, SQuAD, DPR (json / tsv), plain jsonl and parquet.

Every reader streams: line-based formats are read one line at a time, parquet one record batch at a
time, and the JSON-document formats (SQuAD, DPR retriever json) one record at a time through ijson
(a streaming JSON parser; its C backend when it loads), so a corpus is never held in memory as a whole.

A malformed line or record is never fatal: it is logged as a warning with its file and line number,
appended to ``IngestReport.bad_records`` and skipped. So is a document whose id an earlier document
of the same call had (across all the files of a directory): the first one is kept. Problems with a
whole input (missing path, unknown format, unreadable header, no documents at all) raise
``CorpusError``.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import ijson
from ijson.common import JSONError

logger = logging.getLogger(__name__)

FORMATS = ("kilt", "squad", "dpr-json", "dpr-tsv", "jsonl", "parquet")

# Suffixes picked up when a directory is ingested (a trailing ".gz" is allowed on the text formats).
_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
_TSV_SUFFIXES = (".tsv",)
_PARQUET_SUFFIXES = (".parquet", ".pq")
_TEXT_SUFFIXES = _JSON_SUFFIXES + _TSV_SUFFIXES

_DPR_CTX_KEYS = ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs")
_TSV_COLUMNS = ("id", "text", "title")
_TABLE_COLUMNS = ("id", "title", "text")

# Chunk sizes (bytes / rows); module-level so tests can shrink them to exercise boundaries.
JSON_BUF_BYTES = 1 << 16
PARQUET_BATCH_ROWS = 1024
# How many lines of a line-based file detection looks at when the first record does not decide it.
_SNIFF_MAX_LINES = 100


class CorpusError(ValueError):
    """Unreadable input, unknown format, or a corpus that yields no document at all."""


@dataclass(frozen=True, slots=True)
class Document:
    """One source document; ``paragraphs`` keeps the source's paragraph order (index = paragraph id)."""

    doc_id: str
    title: str
    paragraphs: list[str]


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A skipped line / record. ``line`` is the 1-based line number, or the 1-based record index for
    JSON documents (SQuAD articles, DPR records) and row number for parquet; ``reason`` says which."""

    path: str
    line: int
    reason: str


@dataclass
class IngestReport:
    """What one ``iter_documents`` call read: the documents it produced and the records it skipped;
    ``duplicate_ids`` of the skipped ones are documents whose id an earlier document had."""

    documents: int = 0
    bad_records: list[BadRecord] = field(default_factory=list)
    duplicate_ids: int = 0

    @property
    def skipped(self) -> int:
        return len(self.bad_records)


class _Bad(Exception):
    """Internal: the record at hand is malformed (message = reason)."""


_Item = tuple[int, Document] | BadRecord  # (line as in BadRecord.line, document) or a skipped record
_Reader = Callable[[Path, "_State"], Iterator[_Item]]


@dataclass
class _State:
    """State shared by the files of one ``iter_documents`` call."""

    seen_passage_ids: set[str] = field(default_factory=set)  # DPR json dedupe (ids only)
    # Every document id produced, to report duplicates: exact, ~100 bytes per id (~1 GB for 10M documents).
    doc_ids: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------------------------------
# Field validation shared by the readers


def _as_id(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Bad(f"field {name!r} must be a string or an integer, got {type(value).__name__}")
    doc_id = str(value).strip()
    if not doc_id:
        raise _Bad(f"field {name!r} is empty")
    return doc_id


def _as_title(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _as_paragraphs(value: Any, name: str) -> list[str]:
    """A string is one paragraph; a list must hold strings and is kept as is (ids = list positions)."""
    if isinstance(value, str):
        paragraphs = [value]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _Bad(f"field {name!r}[{i}] must be a string, got {type(item).__name__}")
        paragraphs = value
    else:
        raise _Bad(f"field {name!r} must be a string or a list of strings, got {type(value).__name__}")
    if not any(p.strip() for p in paragraphs):
        raise _Bad(f"field {name!r} is empty")
    return paragraphs


def _require(record: Any, *names: str) -> None:
    if not isinstance(record, dict):
        raise _Bad(f"record must be a JSON object, got {type(record).__name__}")
    missing = [n for n in names if n not in record]
    if missing:
        raise _Bad(f"missing field(s) {', '.join(repr(n) for n in missing)}")


def _kilt_document(record: Any) -> Document:
    # Real KILT dumps also carry `_id` (same value); `wikipedia_id` is the document id.
    _require(record, "wikipedia_id", "wikipedia_title", "text")
    return Document(
        doc_id=_as_id(record["wikipedia_id"], "wikipedia_id"),
        title=_as_title(record["wikipedia_title"], "wikipedia_title"),
        paragraphs=_as_paragraphs(record["text"], "text"),
    )


def _table_document(record: Any) -> Document:
    _require(record, "id", "title", "text")
    return Document(
        doc_id=_as_id(record["id"], "id"),
        title=_as_title(record["title"], "title"),
        paragraphs=_as_paragraphs(record["text"], "text"),
    )


# --------------------------------------------------------------------------------------------------
# Opening files


def _is_gz(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def _base_suffix(path: Path) -> str:
    """The suffix that names the format, ignoring a trailing ``.gz``."""
    return Path(path.stem).suffix.lower() if _is_gz(path) else path.suffix.lower()


def _open_binary(path: Path) -> IO[bytes]:
    try:
        return gzip.open(path, "rb") if _is_gz(path) else path.open("rb")
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc


def _iter_lines(path: Path) -> Iterator[tuple[int, str | None, str]]:
    """(1-based line number, decoded line or None, decode error) for every line, one at a time.

    Lines are decoded one by one so that a bad byte sequence costs one line, not the file."""
    with _open_binary(path) as fh:
        try:
            for lineno, raw in enumerate(fh, start=1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    yield lineno, raw.decode("utf-8"), ""
                except UnicodeDecodeError as exc:
                    yield lineno, None, f"invalid UTF-8: {exc}"
        except (OSError, EOFError) as exc:  # e.g. a truncated / corrupt gzip stream
            raise CorpusError(f"cannot read {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Streaming JSON documents (SQuAD / DPR json are single JSON documents): ijson, one value at a time

try:  # ijson's C backend (yajl2_c, in ijson's binary wheels); without it, the backend ijson picked itself
    _ijson: Any = ijson.get_backend("yajl2_c")
except ImportError:
    _ijson = ijson  # its module-level functions are the picked backend's; `_ijson.backend_name` names it


class _JsonInvalid(ValueError):
    """Invalid JSON met while streaming a JSON document (message: what the parser said, and where)."""


def _open_json(path: Path) -> IO[bytes]:
    """``path`` as bytes for ijson (which decodes the UTF-8 itself), past a UTF-8 byte-order mark."""
    fh = _open_binary(path)
    try:
        if fh.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            fh.seek(0)
    except (OSError, EOFError) as exc:
        fh.close()
        raise CorpusError(f"cannot read {path}: {exc}") from exc
    return fh


def _json_error(exc: Exception, fh: IO[bytes]) -> str:
    """ijson's error on one line: yajl's message and the text it points at (or the Python backend's
    message), then how many bytes of the file (uncompressed) the parser had read when it failed."""
    text = exc.args[0] if exc.args else type(exc).__name__
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    what = lines[0] if lines else type(exc).__name__
    if len(lines) == 3:  # yajl: message, the text around the error, "(right here) ------^"
        what += f" near {lines[1]!r}"
    with contextlib.suppress(OSError, ValueError):
        what += f" (the parser had read {fh.tell()} bytes)"
    return what


def _json_values(path: Path, fh: IO[bytes], prefix: str) -> Iterator[Any]:
    """The values at ``prefix`` (ijson's notation: ``item`` = each element of the top-level array,
    ``data.item`` = each element of the top-level ``data`` array) of the JSON document in ``fh``,
    built one at a time. Invalid JSON raises ``_JsonInvalid`` after the values before it; a file
    that cannot be read (a corrupt gzip stream) raises ``CorpusError``."""
    try:
        yield from _ijson.items(fh, prefix, use_float=True, buf_size=JSON_BUF_BYTES)
    except (JSONError, UnicodeDecodeError) as exc:
        raise _JsonInvalid(_json_error(exc, fh)) from None
    except (OSError, EOFError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc


def _json_first_event(path: Path) -> str | None:
    """The first ijson event of ``path`` (``start_array``, ``start_map``, ``string``...); None if none."""
    with _open_json(path) as fh:
        try:
            return next(_ijson.basic_parse(fh, multiple_values=True, buf_size=JSON_BUF_BYTES), (None,))[0]
        except (JSONError, UnicodeDecodeError):
            return None


def _sniff_json_document(path: Path) -> str | None:
    """The format of ``path`` from its first JSON value, walked as ijson events (nothing is built):
    a top-level object whose ``data`` is an array is SQuAD, any other object is classified by its
    keys like a JSON line, an array whose first element has ``*_ctxs`` is DPR json. Invalid JSON
    before that is decided raises ``JSONError`` (or ``UnicodeDecodeError``)."""
    with _open_json(path) as fh:
        events = _ijson.basic_parse(fh, multiple_values=True, buf_size=1 << 16)
        top = next(events, (None, None))[0]
        if top == "start_array" and next(events, (None, None))[0] != "start_map":
            return None  # empty array, or a first element that is not an object
        if top not in ("start_array", "start_map"):
            return None
        keys: dict[str, None] = {}  # of the first object: the top-level one or the array's first element
        key = None
        depth = 1
        for event, value in events:
            if depth == 1 and event == "map_key":
                key = value
                keys[key] = None
            elif event in ("start_map", "start_array"):
                if depth == 1 and top == "start_map" and key == "data" and event == "start_array":
                    return "squad"
                depth += 1
            elif event in ("end_map", "end_array"):
                depth -= 1
                if depth == 0:
                    break
    if top == "start_array":
        return "dpr-json" if any(k in keys for k in _DPR_CTX_KEYS) else None
    return _classify_record(keys)


# --------------------------------------------------------------------------------------------------
# Readers: each yields Documents and BadRecords for one file


def _read_json_lines(path: Path, to_document: Callable[[Any], Document]) -> Iterator[_Item]:
    for lineno, line, error in _iter_lines(path):
        if line is None:
            yield BadRecord(str(path), lineno, error)
            continue
        if not line.strip():
            continue  # blank lines are not records
        try:
            yield lineno, to_document(json.loads(line))
        except json.JSONDecodeError as exc:
            yield BadRecord(str(path), lineno, f"invalid JSON: {exc}")
        except _Bad as exc:
            yield BadRecord(str(path), lineno, str(exc))


def _read_kilt(path: Path, state: _State) -> Iterator[_Item]:
    return _read_json_lines(path, _kilt_document)


def _read_jsonl(path: Path, state: _State) -> Iterator[_Item]:
    return _read_json_lines(path, _table_document)


def _read_squad(path: Path, state: _State) -> Iterator[_Item]:
    """One Document per article of the top-level ``data`` array (streamed article by article).

    ``BadRecord.line`` is the 1-based article index in ``data``. An article whose ``title`` is
    missing is bad; a paragraph without a usable ``context`` is reported and left out of its article."""
    where = str(path)
    index = 0
    with _open_json(path) as fh:
        try:
            for index, article in enumerate(_json_values(path, fh, "data.item"), start=1):
                yield from _squad_article(where, index, article)
        except _JsonInvalid as exc:
            yield BadRecord(
                where,
                index + 1,
                f"article #{index + 1} of 'data' (line = article index): invalid JSON: {exc}; rest of file skipped",
            )
            return
    if index == 0:  # no article: was there a top-level 'data' array at all?
        with contextlib.suppress(JSONError, UnicodeDecodeError):
            if _sniff_json_document(path) == "squad":
                return
        raise CorpusError(f"{path}: not a SQuAD file (no top-level 'data' array)")


def _squad_article(where: str, index: int, article: Any) -> Iterator[_Item]:
    prefix = f"article #{index} of 'data' (line = article index)"
    try:
        _require(article, "title", "paragraphs")
        title = _as_title(article["title"], "title")
        if not title.strip():
            raise _Bad("field 'title' is empty")
        if not isinstance(article["paragraphs"], list):
            raise _Bad("field 'paragraphs' must be a list")
    except _Bad as exc:
        yield BadRecord(where, index, f"{prefix}: {exc}")
        return
    contexts: list[str] = []
    for j, paragraph in enumerate(article["paragraphs"]):
        context = paragraph.get("context") if isinstance(paragraph, dict) else None
        if not isinstance(context, str) or not context.strip():
            yield BadRecord(where, index, f"{prefix}: paragraphs[{j}] has no non-empty string 'context'")
            continue
        contexts.append(context)
    if not contexts:
        yield BadRecord(where, index, f"{prefix}: no valid paragraph")
        return
    yield index, Document(doc_id=title, title=title, paragraphs=contexts)


def _read_dpr_json(path: Path, state: _State) -> Iterator[_Item]:
    """Every distinct ctx (deduplicated by passage id across the files of one call) is a Document.

    The top-level array is streamed record by record; only the set of seen passage ids is kept.
    ``BadRecord.line`` is the 1-based record index in the array."""
    where = str(path)
    index = 0
    with _open_json(path) as fh:
        try:
            for index, record in enumerate(_json_values(path, fh, "item"), start=1):
                yield from _dpr_record(where, index, record, state.seen_passage_ids)
        except _JsonInvalid as exc:
            yield BadRecord(
                where,
                index + 1,
                f"record #{index + 1} (line = record index): invalid JSON: {exc}; rest of file skipped",
            )
            return
    if index == 0 and (first := _json_first_event(path)) != "start_array":
        yield BadRecord(where, 1, f"record #1 (line = record index): the top-level value is not an array ({first})")


def _dpr_record(where: str, index: int, record: Any, seen: set[str]) -> Iterator[_Item]:
    prefix = f"record #{index} (line = record index)"
    if not isinstance(record, dict) or not any(k in record for k in _DPR_CTX_KEYS):
        yield BadRecord(where, index, f"{prefix}: not a DPR record (no {'/'.join(_DPR_CTX_KEYS)})")
        return
    for key in _DPR_CTX_KEYS:
        ctxs = record.get(key, [])
        if not isinstance(ctxs, list):
            yield BadRecord(where, index, f"{prefix}: field {key!r} must be a list")
            continue
        for j, ctx in enumerate(ctxs):
            try:
                if not isinstance(ctx, dict):
                    raise _Bad(f"must be a JSON object, got {type(ctx).__name__}")
                id_key = "passage_id" if "passage_id" in ctx else "psg_id"
                _require(ctx, id_key, "title", "text")
                doc_id = _as_id(ctx[id_key], id_key)
                title = _as_title(ctx["title"], "title")
                text = ctx["text"]
                if not isinstance(text, str) or not text.strip():
                    raise _Bad("field 'text' must be a non-empty string")
            except _Bad as exc:
                yield BadRecord(where, index, f"{prefix}: {key}[{j}]: {exc}")
                continue
            if doc_id in seen:
                continue
            seen.add(doc_id)
            yield index, Document(doc_id=doc_id, title=title, paragraphs=[text])


def _unquote_tsv_line(line: str) -> list[str]:
    if '"' not in line:
        return line.split("\t")
    # DPR's psgs_w100.tsv quotes fields csv-style ("" for a quote); one physical line = one row.
    return next(csv.reader([line], delimiter="\t"))


def _read_dpr_tsv(path: Path, state: _State) -> Iterator[_Item]:
    where = str(path)
    columns: dict[str, int] | None = None
    width = 0
    for lineno, line, error in _iter_lines(path):
        if line is None:
            if columns is None:
                raise CorpusError(f"{path}: unreadable header line: {error}")
            yield BadRecord(where, lineno, error)
            continue
        line = line.rstrip("\r\n")
        if columns is None:
            header = [h.strip() for h in line.split("\t")]
            if not set(_TSV_COLUMNS) <= set(header):
                raise CorpusError(
                    f"{path}: not a DPR passages tsv: header must hold columns {'/'.join(_TSV_COLUMNS)}, got {header!r}"
                )
            columns = {name: header.index(name) for name in _TSV_COLUMNS}
            width = len(header)
            continue
        if not line.strip():
            continue
        fields = _unquote_tsv_line(line)
        if len(fields) != width:
            yield BadRecord(where, lineno, f"expected {width} tab-separated fields, got {len(fields)}")
            continue
        try:
            doc_id = _as_id(fields[columns["id"]], "id")
            text = fields[columns["text"]]
            if not text.strip():
                raise _Bad("field 'text' is empty")
        except _Bad as exc:
            yield BadRecord(where, lineno, str(exc))
            continue
        yield lineno, Document(doc_id=doc_id, title=fields[columns["title"]], paragraphs=[text])
    if columns is None:
        raise CorpusError(f"{path}: empty file (no header)")


def _read_parquet(path: Path, state: _State) -> Iterator[_Item]:
    """Record batch by record batch; ``BadRecord.line`` is the 1-based row number."""
    import pyarrow.parquet as pq

    where = str(path)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise CorpusError(f"cannot read parquet file {path}: {exc}") from exc
    names = parquet.schema_arrow.names
    missing = [c for c in _TABLE_COLUMNS if c not in names]
    if missing:
        raise CorpusError(f"{path}: parquet file lacks column(s) {missing} (needs {'/'.join(_TABLE_COLUMNS)})")
    row = 0
    with parquet:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(_TABLE_COLUMNS)):
            ids, titles, texts = (batch.column(name).to_pylist() for name in _TABLE_COLUMNS)
            for doc_id, title, text in zip(ids, titles, texts, strict=True):
                row += 1
                try:
                    yield row, _table_document({"id": doc_id, "title": title, "text": text})
                except _Bad as exc:
                    yield BadRecord(where, row, f"row {row}: {exc}")


_READERS: dict[str, _Reader] = {
    "kilt": _read_kilt,
    "squad": _read_squad,
    "dpr-json": _read_dpr_json,
    "dpr-tsv": _read_dpr_tsv,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}


# --------------------------------------------------------------------------------------------------
# Format detection


def _unknown(path: Path, why: str) -> CorpusError:
    return CorpusError(
        f"cannot detect the corpus format of {path}: {why}. Supported formats: {', '.join(FORMATS)} "
        "(pass fmt=... to force one)"
    )


def _classify_record(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = record.keys()
    if "wikipedia_id" in keys and "text" in keys:
        return "kilt"
    if "id" in keys and "text" in keys:
        return "jsonl"
    return None


def _sniff_json(path: Path) -> str | None:
    """Classify a JSON / JSON-lines file by its first value, else by its first decisive line."""
    try:
        found = _sniff_json_document(path)
        if found:
            return found
    except (JSONError, UnicodeDecodeError):
        pass  # first record malformed: look at the following lines below
    except (OSError, EOFError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc
    # JSON lines whose first line is broken or not decisive: the first decisive line decides.
    seen = 0
    for _, line, _ in _iter_lines(path):
        if line is None or not line.strip():
            continue
        seen += 1
        if seen > _SNIFF_MAX_LINES:
            break
        try:
            found = _classify_record(json.loads(line))
        except json.JSONDecodeError:
            continue
        if found:
            return found
    return None


def _first_line(path: Path) -> str | None:
    for _, line, _ in _iter_lines(path):
        return line
    return None


def _looks_like_tsv(path: Path) -> bool:
    header = _first_line(path)
    return header is not None and set(_TSV_COLUMNS) <= {h.strip() for h in header.rstrip("\r\n").split("\t")}


def detect_format(path: Path) -> str:
    """The format of one file, from its extension and its first record.

    ``.parquet``/``.pq`` -> parquet; ``.tsv`` -> dpr-tsv (header id/text/title checked);
    ``.json``/``.jsonl``/``.ndjson`` (optionally ``.gz``) -> sniffed: a top-level ``data`` array is
    SQuAD, an array of records with ``*_ctxs`` is DPR json, lines with ``wikipedia_id`` + ``text``
    are KILT and lines with ``id`` + ``text`` are plain jsonl. Raises ``CorpusError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"not a file: {path}")
    suffix = _base_suffix(path)
    if suffix in _PARQUET_SUFFIXES:
        if _is_gz(path):
            raise _unknown(path, "gzip-compressed parquet is not supported (parquet compresses internally)")
        return "parquet"
    if path.stat().st_size == 0:
        raise _unknown(path, "the file is empty")
    if suffix in _TSV_SUFFIXES:
        if _looks_like_tsv(path):
            return "dpr-tsv"
        raise _unknown(path, f"a .tsv file must start with a header holding {'/'.join(_TSV_COLUMNS)}")
    if suffix not in _JSON_SUFFIXES:
        # Unknown extension: parquet magic, a DPR tsv header, or JSON.
        with _open_binary(path) as fh:
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
    suffix = _base_suffix(path)
    if _is_gz(path):
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
    state = _State()
    produced = 0
    bad = 0
    for file, file_fmt in plan:
        file_docs = 0
        file_bad = 0
        logger.info("reading %s as %s", file, file_fmt)
        for item in _READERS[file_fmt](file, state):
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

"""One reader per corpus format (KILT knowledge source, SQuAD, DPR json / tsv, plain jsonl, parquet): each yields a
file's documents and its bad records (`sources.Item`), one at a time; and the field checks they share."""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ijson.common import JSONError

from memvq.data.ingest.sources import (
    BadRecord,
    CorpusError,
    Document,
    Item,
    JsonInvalid,
    Reader,
    ReadState,
    RecordError,
    iter_lines,
    json_events,
    json_first_event,
    json_values,
    open_json,
)

DPR_CTX_KEYS = ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs")
TSV_COLUMNS = ("id", "text", "title")
_TABLE_COLUMNS = ("id", "title", "text")
# Rows per parquet batch; module-level so that tests can shrink it to exercise boundaries.
PARQUET_BATCH_ROWS = 1024


# --------------------------------------------------------------------------------------------------
# Field validation shared by the readers


def _as_id(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RecordError(f"field {name!r} must be a string or an integer, got {type(value).__name__}")
    doc_id = str(value).strip()
    if not doc_id:
        raise RecordError(f"field {name!r} is empty")
    return doc_id


def _as_title(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _as_paragraphs(value: Any, name: str) -> list[str]:
    """A string is one paragraph; a list must hold strings and is kept as is (ids = list positions)."""
    if isinstance(value, str):
        paragraphs = [value]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise RecordError(f"field {name!r}[{i}] must be a string, got {type(item).__name__}")
        paragraphs = value
    else:
        raise RecordError(f"field {name!r} must be a string or a list of strings, got {type(value).__name__}")
    if not any(p.strip() for p in paragraphs):
        raise RecordError(f"field {name!r} is empty")
    return paragraphs


def _require(record: Any, *names: str) -> None:
    if not isinstance(record, dict):
        raise RecordError(f"record must be a JSON object, got {type(record).__name__}")
    missing = [n for n in names if n not in record]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(repr(n) for n in missing)}")


def _document(record: Any, id_key: str, title_key: str) -> Document:
    """A Document from a record's id, title and `text` fields (named `id_key`, `title_key`, "text")."""
    _require(record, id_key, title_key, "text")
    return Document(
        doc_id=_as_id(record[id_key], id_key),
        title=_as_title(record[title_key], title_key),
        paragraphs=_as_paragraphs(record["text"], "text"),
    )


def _kilt_document(record: Any) -> Document:
    # Real KILT dumps also carry `_id` (same value); `wikipedia_id` is the document id.
    return _document(record, "wikipedia_id", "wikipedia_title")


def _table_document(record: Any) -> Document:
    return _document(record, "id", "title")


# --------------------------------------------------------------------------------------------------
# Readers: each yields Documents and BadRecords for one file


def _read_json_lines(path: Path, to_document: Callable[[Any], Document]) -> Iterator[Item]:
    for lineno, line, error in iter_lines(path):
        if line is None:
            yield BadRecord(str(path), lineno, error)
            continue
        if not line.strip():
            continue  # blank lines are not records
        try:
            yield lineno, to_document(json.loads(line))
        except json.JSONDecodeError as exc:
            yield BadRecord(str(path), lineno, f"invalid JSON: {exc}")
        except RecordError as exc:
            yield BadRecord(str(path), lineno, str(exc))


def _read_kilt(path: Path, state: ReadState) -> Iterator[Item]:
    return _read_json_lines(path, _kilt_document)


def _read_jsonl(path: Path, state: ReadState) -> Iterator[Item]:
    return _read_json_lines(path, _table_document)


def _read_squad(path: Path, state: ReadState) -> Iterator[Item]:
    """One Document per article of the top-level ``data`` array (streamed article by article).

    ``BadRecord.line`` is the 1-based article index in ``data``. An article whose ``title`` is
    missing is bad; a paragraph without a usable ``context`` is reported and left out of its article."""
    where = str(path)
    index = 0
    with open_json(path) as fh:
        try:
            for index, article in enumerate(json_values(path, fh, "data.item"), start=1):
                yield from _squad_article(where, index, article)
        except JsonInvalid as exc:
            yield BadRecord(
                where,
                index + 1,
                f"article #{index + 1} of 'data' (line = article index): invalid JSON: {exc}; rest of file skipped",
            )
            return
    if index == 0:  # no article: was there a top-level 'data' array at all?
        with contextlib.suppress(JSONError, UnicodeDecodeError):
            if sniff_json_document(path) == "squad":
                return
        raise CorpusError(f"{path}: not a SQuAD file (no top-level 'data' array)")


def _squad_article(where: str, index: int, article: Any) -> Iterator[Item]:
    prefix = f"article #{index} of 'data' (line = article index)"
    try:
        _require(article, "title", "paragraphs")
        title = _as_title(article["title"], "title")
        if not title.strip():
            raise RecordError("field 'title' is empty")
        if not isinstance(article["paragraphs"], list):
            raise RecordError("field 'paragraphs' must be a list")
    except RecordError as exc:
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


def _read_dpr_json(path: Path, state: ReadState) -> Iterator[Item]:
    """Every distinct ctx (deduplicated by passage id across the files of one call) is a Document.

    The top-level array is streamed record by record; only the set of seen passage ids is kept.
    ``BadRecord.line`` is the 1-based record index in the array."""
    where = str(path)
    index = 0
    with open_json(path) as fh:
        try:
            for index, record in enumerate(json_values(path, fh, "item"), start=1):
                yield from _dpr_record(where, index, record, state.seen_passage_ids)
        except JsonInvalid as exc:
            yield BadRecord(
                where,
                index + 1,
                f"record #{index + 1} (line = record index): invalid JSON: {exc}; rest of file skipped",
            )
            return
    if index == 0 and (first := json_first_event(path)) != "start_array":
        yield BadRecord(where, 1, f"record #1 (line = record index): the top-level value is not an array ({first})")


def _dpr_record(where: str, index: int, record: Any, seen: set[str]) -> Iterator[Item]:
    prefix = f"record #{index} (line = record index)"
    if not isinstance(record, dict) or not any(k in record for k in DPR_CTX_KEYS):
        yield BadRecord(where, index, f"{prefix}: not a DPR record (no {'/'.join(DPR_CTX_KEYS)})")
        return
    for key in DPR_CTX_KEYS:
        ctxs = record.get(key, [])
        if not isinstance(ctxs, list):
            yield BadRecord(where, index, f"{prefix}: field {key!r} must be a list")
            continue
        for j, ctx in enumerate(ctxs):
            try:
                if not isinstance(ctx, dict):
                    raise RecordError(f"must be a JSON object, got {type(ctx).__name__}")
                id_key = "passage_id" if "passage_id" in ctx else "psg_id"
                _require(ctx, id_key, "title", "text")
                doc_id = _as_id(ctx[id_key], id_key)
                title = _as_title(ctx["title"], "title")
                text = ctx["text"]
                if not isinstance(text, str) or not text.strip():
                    raise RecordError("field 'text' must be a non-empty string")
            except RecordError as exc:
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


def _read_dpr_tsv(path: Path, state: ReadState) -> Iterator[Item]:
    where = str(path)
    columns: dict[str, int] | None = None
    width = 0
    for lineno, line, error in iter_lines(path):
        if line is None:
            if columns is None:
                raise CorpusError(f"{path}: unreadable header line: {error}")
            yield BadRecord(where, lineno, error)
            continue
        line = line.rstrip("\r\n")
        if columns is None:
            header = [h.strip() for h in line.split("\t")]
            if not set(TSV_COLUMNS) <= set(header):
                raise CorpusError(
                    f"{path}: not a DPR passages tsv: header must hold columns {'/'.join(TSV_COLUMNS)}, got {header!r}"
                )
            columns = {name: header.index(name) for name in TSV_COLUMNS}
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
                raise RecordError("field 'text' is empty")
        except RecordError as exc:
            yield BadRecord(where, lineno, str(exc))
            continue
        yield lineno, Document(doc_id=doc_id, title=fields[columns["title"]], paragraphs=[text])
    if columns is None:
        raise CorpusError(f"{path}: empty file (no header)")


def _read_parquet(path: Path, state: ReadState) -> Iterator[Item]:
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
                except RecordError as exc:
                    yield BadRecord(where, row, f"row {row}: {exc}")


READERS: dict[str, Reader] = {
    "kilt": _read_kilt,
    "squad": _read_squad,
    "dpr-json": _read_dpr_json,
    "dpr-tsv": _read_dpr_tsv,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}


# --------------------------------------------------------------------------------------------------
# Telling the formats apart by a record


def classify_record(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = record.keys()
    if "wikipedia_id" in keys and "text" in keys:
        return "kilt"
    if "id" in keys and "text" in keys:
        return "jsonl"
    return None


def sniff_json_document(path: Path) -> str | None:
    """The format of ``path`` from its first JSON value, walked as ijson events (nothing is built):
    a top-level object whose ``data`` is an array is SQuAD, any other object is classified by its
    keys like a JSON line, an array whose first element has ``*_ctxs`` is DPR json. Invalid JSON
    before that is decided raises ``JSONError`` (or ``UnicodeDecodeError``)."""
    with open_json(path) as fh:
        events = json_events(fh)
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
        return "dpr-json" if any(k in keys for k in DPR_CTX_KEYS) else None
    return classify_record(keys)

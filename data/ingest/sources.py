"""Where a corpus's records come from: the document and report types, files opened (gzip or not, decoded line by line
so that a bad byte costs one line) and JSON documents streamed one value at a time through ijson (its C backend
when it loads), so that a corpus is never held in memory as a whole."""

from __future__ import annotations

import codecs
import contextlib
import gzip
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import ijson
from ijson.common import JSONError

# Chunk size (bytes) of the JSON parser; module-level so that tests can shrink it to exercise boundaries.
JSON_BUF_BYTES = 1 << 16


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


class RecordError(Exception):
    """Internal: the record at hand is malformed (message = reason)."""


Item = tuple[int, Document] | BadRecord  # (line as in BadRecord.line, document) or a skipped record
Reader = Callable[[Path, "ReadState"], Iterator[Item]]


@dataclass
class ReadState:
    """State shared by the files of one ``iter_documents`` call."""

    seen_passage_ids: set[str] = field(default_factory=set)  # DPR json dedupe (ids only)
    # Every document id produced, to report duplicates: exact, ~100 bytes per id (~1 GB for 10M documents).
    doc_ids: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------------------------------
# Opening files


def is_gz(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def base_suffix(path: Path) -> str:
    """The suffix that names the format, ignoring a trailing ``.gz``."""
    return Path(path.stem).suffix.lower() if is_gz(path) else path.suffix.lower()


def open_binary(path: Path) -> IO[bytes]:
    try:
        return gzip.open(path, "rb") if is_gz(path) else path.open("rb")
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc


def iter_lines(path: Path) -> Iterator[tuple[int, str | None, str]]:
    """(1-based line number, decoded line or None, decode error) for every line, one at a time.

    Lines are decoded one by one so that a bad byte sequence costs one line, not the file."""
    with open_binary(path) as fh:
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


class JsonInvalid(ValueError):
    """Invalid JSON met while streaming a JSON document (message: what the parser said, and where)."""


def open_json(path: Path) -> IO[bytes]:
    """``path`` as bytes for ijson (which decodes the UTF-8 itself), past a UTF-8 byte-order mark."""
    fh = open_binary(path)
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


def json_values(path: Path, fh: IO[bytes], prefix: str) -> Iterator[Any]:
    """The values at ``prefix`` (ijson's notation: ``item`` = each element of the top-level array,
    ``data.item`` = each element of the top-level ``data`` array) of the JSON document in ``fh``,
    built one at a time. Invalid JSON raises ``JsonInvalid`` after the values before it; a file
    that cannot be read (a corrupt gzip stream) raises ``CorpusError``."""
    try:
        yield from _ijson.items(fh, prefix, use_float=True, buf_size=JSON_BUF_BYTES)
    except (JSONError, UnicodeDecodeError) as exc:
        raise JsonInvalid(_json_error(exc, fh)) from None
    except (OSError, EOFError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc


def json_events(fh: IO[bytes]) -> Iterator[tuple[str, Any]]:
    """ijson's parse events (`start_map`, `map_key`, ...) of the JSON value(s) in `fh`; nothing is built."""
    return _ijson.basic_parse(fh, multiple_values=True, buf_size=JSON_BUF_BYTES)


def json_first_event(path: Path) -> str | None:
    """The first ijson event of ``path`` (``start_array``, ``start_map``, ``string``...); None if none."""
    with open_json(path) as fh:
        try:
            return next(json_events(fh), (None,))[0]
        except (JSONError, UnicodeDecodeError):
            return None

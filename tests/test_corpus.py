"""Corpus ingestion: streaming readers (data.ingest.corpus) and passage chunking (data.ingest.passages)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import ijson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memvq.data.ingest import formats, sources
from memvq.data.ingest.corpus import FORMATS, detect_format, iter_documents
from memvq.data.ingest.passages import Passage, chunk_document, iter_passages
from memvq.data.ingest.sources import CorpusError, Document, IngestReport

# --------------------------------------------------------------------------------------------------
# helpers


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def kilt_row(wid: str, title: str, paragraphs: list[str]) -> dict[str, object]:
    return {"_id": wid, "wikipedia_id": wid, "wikipedia_title": title, "text": paragraphs}


def squad_obj(articles: list[tuple[str, list[str]]], version_first: bool = False) -> dict[str, object]:
    data = [
        {
            "title": t,
            "paragraphs": [{"context": c, "qas": [{"id": f"{t}{i}", "question": "q?"}]} for i, c in enumerate(cs)],
        }
        for t, cs in articles
    ]
    return {"version": "v2.0", "data": data} if version_first else {"data": data, "version": "1.1"}


def ctx(pid: str | int, title: str, text: str, key: str = "passage_id") -> dict[str, object]:
    return {"title": title, "text": text, "score": 1.0, key: pid}


def read(path: Path | str, fmt: str | None = None) -> tuple[list[Document], IngestReport]:
    report = IngestReport()
    return list(iter_documents(path, fmt=fmt, report=report)), report


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def doc_words(doc: Document, first_paragraph: int = 0) -> list[str]:
    return [w for p in doc.paragraphs[first_paragraph:] for w in p.split()]


def assert_provenance(doc: Document, passages: list[Passage]) -> None:
    """Every passage's paragraph range and character offsets point at exactly its words in the source."""
    for p in passages:
        tokens = p.text.split(" ")
        first, last = tokens[0], tokens[-1]
        assert doc.paragraphs[p.start_paragraph_id][p.start_character :].startswith(first)
        assert doc.paragraphs[p.end_paragraph_id][: p.end_character].endswith(last)
        if p.start_paragraph_id == p.end_paragraph_id:
            source = doc.paragraphs[p.start_paragraph_id][p.start_character : p.end_character]
        else:
            source = " ".join(
                [
                    doc.paragraphs[p.start_paragraph_id][p.start_character :],
                    *doc.paragraphs[p.start_paragraph_id + 1 : p.end_paragraph_id],
                    doc.paragraphs[p.end_paragraph_id][: p.end_character],
                ]
            )
        assert " ".join(source.split()) == p.text


# --------------------------------------------------------------------------------------------------
# readers, one format at a time


def test_kilt_reads_paragraph_lists_as_is(tmp_path):
    path = write_jsonl(
        tmp_path / "ks.jsonl",
        [
            kilt_row("12", "Alpha", ["Alpha", "First para.", "Second para."]),
            kilt_row("7", "Beta", ["Beta text"]),
        ],
    )
    assert detect_format(path) == "kilt"
    docs, report = read(path)
    assert docs == [
        Document("12", "Alpha", ["Alpha", "First para.", "Second para."]),
        Document("7", "Beta", ["Beta text"]),
    ]
    assert report.documents == 2 and report.skipped == 0


def test_kilt_dump_named_json_is_detected_as_kilt(tmp_path):
    # The official KILT knowledge source is JSON lines despite its .json name.
    rows = [kilt_row("1", "A", ["A", "x y"]), kilt_row("2", "B", ["B", "x y"])]
    path = write_jsonl(tmp_path / "kilt_knowledgesource.json", rows)
    assert detect_format(path) == "kilt"
    assert len(read(path)[0]) == 2


@pytest.mark.parametrize("version_first", [False, True])
def test_squad_one_document_per_article(tmp_path, version_first):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_obj([("Art_1", ["c one", "c two"]), ("Art_2", ["c three"])], version_first)))
    assert detect_format(path) == "squad"
    docs, report = read(path)
    assert docs == [Document("Art_1", "Art_1", ["c one", "c two"]), Document("Art_2", "Art_2", ["c three"])]
    assert report.skipped == 0


def test_dpr_json_dedupes_passages_by_id(tmp_path):
    records = [
        {
            "question": "q1",
            "answers": ["a"],
            "positive_ctxs": [ctx("11", "T1", "text one")],
            "negative_ctxs": [ctx("12", "T2", "text two")],
            "hard_negative_ctxs": [ctx("11", "T1", "text one"), ctx(13, "T3", "text three", key="psg_id")],
        },
        {"question": "q2", "positive_ctxs": [ctx("12", "T2", "text two")], "hard_negative_ctxs": []},
    ]
    path = tmp_path / "dpr.json"
    path.write_text(json.dumps(records, indent=1))
    assert detect_format(path) == "dpr-json"
    docs, report = read(path)
    assert docs == [
        Document("11", "T1", ["text one"]),
        Document("12", "T2", ["text two"]),
        Document("13", "T3", ["text three"]),
    ]
    assert report.skipped == 0


def test_dpr_tsv_reads_rows_and_unquotes(tmp_path):
    path = tmp_path / "psgs.tsv"
    path.write_text(
        'id\ttext\ttitle\n1\t"He said ""hi"" there"\tAaron\n2\tplain text\tBee\n3\tonly two fields\n4\tfour\tD\n'
    )
    assert detect_format(path) == "dpr-tsv"
    docs, report = read(path)
    assert docs == [
        Document("1", "Aaron", ['He said "hi" there']),
        Document("2", "Bee", ["plain text"]),
        Document("4", "D", ["four"]),
    ]
    assert [(b.line, b.reason) for b in report.bad_records] == [(4, "expected 3 tab-separated fields, got 2")]


def test_dpr_tsv_without_header_is_rejected(tmp_path):
    path = tmp_path / "psgs.tsv"
    path.write_text("1\tsome text\tTitle\n")
    with pytest.raises(CorpusError, match="header"):
        detect_format(path)
    with pytest.raises(CorpusError, match="header"):
        list(iter_documents(path, fmt="dpr-tsv"))


def test_plain_jsonl_string_or_list_text(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "a", "title": "A", "text": "one paragraph"},
            {"id": 5, "title": "", "text": ["p0", "p1"]},
        ],
    )
    assert detect_format(path) == "jsonl"
    docs, _ = read(path)
    assert docs == [Document("a", "A", ["one paragraph"]), Document("5", "", ["p0", "p1"])]


def test_parquet_in_batches_with_bad_row(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "PARQUET_BATCH_ROWS", 2)
    path = tmp_path / "c.parquet"
    table = pa.table(
        {
            "id": [f"d{i}" for i in range(5)],
            "title": ["T0", "T1", "T2", "T3", "T4"],
            "text": ["a b", "c", None, "d e f", "g"],
            "extra": [1, 2, 3, 4, 5],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    assert detect_format(path) == "parquet"
    docs, report = read(path)
    assert [d.doc_id for d in docs] == ["d0", "d1", "d3", "d4"]
    assert docs[2] == Document("d3", "T3", ["d e f"])
    assert [b.line for b in report.bad_records] == [3]
    assert "row 3" in report.bad_records[0].reason


def test_parquet_missing_column_is_a_corpus_error(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["1"], "text": ["x"]}), path)
    with pytest.raises(CorpusError, match="title"):
        list(iter_documents(path))


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "z", "title": "Z", "text": "zipped"}) + "\n")
    assert detect_format(path) == "jsonl"
    assert read(path)[0] == [Document("z", "Z", ["zipped"])]


# --------------------------------------------------------------------------------------------------
# bad records, errors


def test_malformed_lines_are_skipped_and_reported_with_line_numbers(tmp_path, caplog):
    path = tmp_path / "ks.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(kilt_row("1", "A", ["A", "a text"])),
                json.dumps(kilt_row("2", "B", ["B", "b text"])),
                '{"wikipedia_id": "3", "wikipedia_title": "C", "text": ["trunc',  # invalid JSON
                json.dumps(kilt_row("4", "D", ["D", "d text"])),
                json.dumps({"wikipedia_id": "5", "text": ["no title"]}),  # missing field
                "",  # blank line: not a record
                json.dumps(kilt_row("6", "F", ["  ", ""])),  # empty text
                json.dumps({"wikipedia_id": "7", "wikipedia_title": "G", "text": 3}),  # wrong type
                json.dumps(kilt_row("8", "H", ["H", "h text"])),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="memvq.data.ingest.corpus"):
        docs, report = read(path)
    assert [d.doc_id for d in docs] == ["1", "2", "4", "8"]
    assert [b.line for b in report.bad_records] == [3, 5, 7, 8]
    assert all(b.path == str(path) for b in report.bad_records)
    assert "invalid JSON" in report.bad_records[0].reason
    assert "wikipedia_title" in report.bad_records[1].reason
    assert "empty" in report.bad_records[2].reason
    assert "text" in report.bad_records[3].reason
    assert report.documents == 4 and report.skipped == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{path}:3:" in m for m in warnings) and any(f"{path}:8:" in m for m in warnings)


def test_invalid_utf8_line_is_a_bad_record(tmp_path):
    path = tmp_path / "c.jsonl"
    good = json.dumps({"id": "1", "title": "t", "text": "ok"}).encode()
    path.write_bytes(good + b"\n" + b'{"id": "2", "title": "t", "text": "\xff\xfe"}\n' + good.replace(b'"1"', b'"3"'))
    docs, report = read(path)
    assert [d.doc_id for d in docs] == ["1", "3"]
    assert [(b.line, b.reason.startswith("invalid UTF-8")) for b in report.bad_records] == [(2, True)]


def test_wrong_id_type_is_a_bad_record(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "1", "title": "t", "text": "ok"},
            {"id": True, "title": "t", "text": "x"},
            {"id": None, "title": "t", "text": "x"},
        ],
    )
    docs, report = read(path)
    assert [d.doc_id for d in docs] == ["1"]
    assert [b.line for b in report.bad_records] == [2, 3]


def test_empty_corpus_raises_with_counts(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "title": "t", "text": ""}, "not json"])
    report = IngestReport()
    with pytest.raises(CorpusError, match=r"empty corpus: 0 documents in .*c\.jsonl \(2 bad records\)"):
        list(iter_documents(path, fmt="jsonl", report=report))
    assert report.skipped == 2


def test_directory_without_supported_files_is_empty(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(CorpusError, match="empty corpus: 0 documents"):
        iter_documents(tmp_path)


def test_unknown_format_names_the_supported_formats(tmp_path):
    path = write_jsonl(tmp_path / "tasks.jsonl", [{"id": "q1", "input": "who?", "output": []}])
    with pytest.raises(CorpusError) as excinfo:
        detect_format(path)
    for name in FORMATS:
        assert name in str(excinfo.value)
    with pytest.raises(CorpusError) as excinfo:
        iter_documents(path, fmt="csv")
    assert "csv" in str(excinfo.value) and all(name in str(excinfo.value) for name in FORMATS)


def test_missing_path_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        iter_documents(tmp_path / "nope")


def test_detection_survives_a_broken_first_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["{broken", {"id": "1", "title": "t", "text": "ok"}])
    assert detect_format(path) == "jsonl"
    docs, report = read(path)
    assert [d.doc_id for d in docs] == ["1"] and [b.line for b in report.bad_records] == [1]


def test_reading_is_lazy(tmp_path):
    # A bad record further down is only met (and reported) when iteration gets there.
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"id": "1", "title": "t", "text": "a"}, "bad", {"id": "3", "title": "t", "text": "c"}],
    )
    report = IngestReport()
    docs = iter_documents(path, report=report)
    assert next(docs).doc_id == "1"
    assert report.documents == 1 and report.skipped == 0
    assert [d.doc_id for d in docs] == ["3"]
    assert report.documents == 2 and report.skipped == 1


# --------------------------------------------------------------------------------------------------
# streaming JSON documents (ijson)


@pytest.fixture(params=["yajl2_c", "python"])
def json_backend(request, monkeypatch):
    """Runs a test with ijson's C backend (the one used when it loads) and with its pure-Python fallback."""
    try:
        backend = ijson.get_backend(request.param)
    except ImportError:
        pytest.skip(f"ijson backend {request.param} is not installed")
    monkeypatch.setattr(sources, "_ijson", backend)
    return request.param


def test_json_documents_use_ijsons_c_backend_when_it_loads():
    try:
        ijson.get_backend("yajl2_c")
    except ImportError:
        pytest.skip("ijson's C backend is not installed")
    assert sources._ijson.backend_name == "yajl2_c"


def test_json_documents_parse_across_tiny_buffer_chunks(tmp_path, monkeypatch, json_backend):
    squad_path = tmp_path / "squad.json"
    squad = squad_obj([("A", ["x " * 30, "y"]), ("B", ["z 123456789"])], version_first=True)
    squad_path.write_text(json.dumps({"count": 123456789, "flag": True, **squad}))  # top-level scalars
    dpr_path = tmp_path / "dpr.json"
    dpr_path.write_text(json.dumps([{"positive_ctxs": [ctx(i, f"T{i}", f"text {i} é ü")]} for i in range(40)]))
    expected_squad, expected_dpr = read(squad_path)[0], read(dpr_path)[0]
    monkeypatch.setattr(sources, "JSON_BUF_BYTES", 3)  # splits the two-byte characters too
    assert read(squad_path)[0] == expected_squad
    assert read(dpr_path)[0] == expected_dpr
    assert len(expected_dpr) == 40 and expected_dpr[12] == Document("12", "T12", ["text 12 é ü"])


def test_json_documents_with_a_byte_order_mark_or_gzipped(tmp_path, json_backend):
    records = [{"positive_ctxs": [ctx(i, "T", f"text {i}")]} for i in range(3)]
    bom = tmp_path / "dpr.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert detect_format(bom) == "dpr-json"
    assert [d.doc_id for d in read(bom)[0]] == ["0", "1", "2"]
    zipped = tmp_path / "squad.json.gz"
    zipped.write_bytes(gzip.compress(json.dumps(squad_obj([("A", ["ctx a"])])).encode("utf-8-sig")))
    assert detect_format(zipped) == "squad"
    assert read(zipped)[0] == [Document("A", "A", ["ctx a"])]


def test_corrupt_gzip_json_is_a_corpus_error_naming_the_file(tmp_path):
    records = [{"positive_ctxs": [ctx(i, "T", words(50, f"r{i}x"))]} for i in range(300)]
    path = tmp_path / "dpr.json.gz"
    path.write_bytes(gzip.compress(json.dumps(records).encode())[:-200])  # the gzip stream is cut short
    report = IngestReport()
    docs = iter_documents(path, fmt="dpr-json", report=report)
    with pytest.raises(CorpusError, match=r"cannot read .*dpr\.json\.gz"):
        list(docs)


def test_forced_json_format_that_does_not_fit(tmp_path):
    dpr = tmp_path / "dpr.json"
    dpr.write_text(json.dumps([{"positive_ctxs": [ctx("1", "T", "x")]}]))
    with pytest.raises(CorpusError, match=r"dpr\.json: not a SQuAD file"):
        list(iter_documents(dpr, fmt="squad"))
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(squad_obj([("A", ["ctx a"])])))
    report = IngestReport()
    with pytest.raises(CorpusError, match="empty corpus"):
        list(iter_documents(squad, fmt="dpr-json", report=report))
    [bad] = report.bad_records
    assert bad.line == 1 and "not an array" in bad.reason


def test_truncated_dpr_json_keeps_earlier_records(tmp_path, json_backend):
    records = [{"positive_ctxs": [ctx(i, "T", f"text {i}")]} for i in range(3)]
    path = tmp_path / "dpr.json"
    path.write_text(json.dumps(records)[:-30])  # cut inside the third record
    docs, report = read(path, fmt="dpr-json")
    assert [d.doc_id for d in docs] == ["0", "1"]
    [bad] = report.bad_records
    assert bad.line == 3 and "record #3" in bad.reason and "invalid JSON" in bad.reason
    # where: the record index, and how far into the file the parser had read (all of it, here)
    assert f"(the parser had read {path.stat().st_size} bytes)" in bad.reason


def test_syntax_error_mid_array_is_reported_at_its_record(tmp_path, json_backend):
    good = json.dumps({"positive_ctxs": [ctx("1", "T", "one")]})
    later = json.dumps({"positive_ctxs": [ctx("3", "T", "three")]})
    path = tmp_path / "dpr.json"
    path.write_text(f'[{good},\n {{"positive_ctxs": [,]}},\n {later}' + " " * 5000 + "]")
    docs, report = read(path)
    assert [d.doc_id for d in docs] == ["1"]
    [bad] = report.bad_records
    assert bad.line == 2 and "rest of file skipped" in bad.reason and "line 1 column" not in bad.reason
    assert "\n" not in bad.reason and "bytes)" in bad.reason
    if json_backend == "yajl2_c":  # yajl quotes the text around the error
        assert "near " in bad.reason and "[,]" in bad.reason


def test_trailing_data_after_the_json_document_is_reported(tmp_path, json_backend):
    path = tmp_path / "dpr.json"
    path.write_text(json.dumps([{"positive_ctxs": [ctx("1", "T", "one")]}]) + " [2]")
    docs, report = read(path)
    assert [d.doc_id for d in docs] == ["1"]
    [bad] = report.bad_records
    assert bad.line == 2 and "invalid JSON" in bad.reason and "rest of file skipped" in bad.reason


def test_bad_dpr_ctx_and_squad_article_are_reported_by_record_index(tmp_path):
    dpr = tmp_path / "dpr.json"
    dpr.write_text(
        json.dumps(
            [
                {"positive_ctxs": [ctx("1", "T", "ok")]},
                {"positive_ctxs": [{"title": "T", "text": "no id"}, ctx("2", "T", "fine")]},
                "not a record",
            ]
        )
    )
    docs, report = read(dpr)
    assert [d.doc_id for d in docs] == ["1", "2"]
    assert [b.line for b in report.bad_records] == [2, 3]
    assert "positive_ctxs[0]" in report.bad_records[0].reason

    squad = tmp_path / "squad.json"
    obj = squad_obj([("A", ["ok"]), ("B", ["fine"])])
    obj["data"].insert(1, {"paragraphs": []})  # article #2 has no title
    obj["data"][2]["paragraphs"].append({"qas": []})  # article #3 has a paragraph without context
    squad.write_text(json.dumps(obj))
    docs, report = read(squad)
    assert docs == [Document("A", "A", ["ok"]), Document("B", "B", ["fine"])]
    assert [b.line for b in report.bad_records] == [2, 3]
    assert all("article #" in b.reason for b in report.bad_records)


# --------------------------------------------------------------------------------------------------
# directories


def test_directory_reads_every_supported_file_sorted_recursively(tmp_path):
    write_jsonl(tmp_path / "b_kilt.jsonl", [kilt_row("k1", "K", ["K", "kilt text"])])
    (tmp_path / "a_sub").mkdir()
    (tmp_path / "a_sub" / "psgs.tsv").write_text("id\ttext\ttitle\n9\ttsv text\tTsv\n")
    (tmp_path / "c.json").write_text(json.dumps(squad_obj([("S", ["squad ctx"])])))
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.jsonl").write_text("ignored too")
    docs, report = read(tmp_path)
    assert [d.doc_id for d in docs] == ["9", "k1", "S"]
    assert report.documents == 3 and report.skipped == 0


def test_directory_with_forced_format_and_dedupe_across_files(tmp_path):
    for name in ("one.json", "two.json"):
        (tmp_path / name).write_text(json.dumps([{"positive_ctxs": [ctx("1", "T", "x"), ctx(name, "T", "y")]}]))
    docs, _ = read(tmp_path, fmt="dpr-json")
    assert [d.doc_id for d in docs] == ["1", "one.json", "two.json"]


def test_directory_with_an_undetectable_file_fails_up_front(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "title": "t", "text": "ok"}])
    write_jsonl(tmp_path / "b.jsonl", [{"question": "?"}])
    with pytest.raises(CorpusError, match=r"b\.jsonl"):
        iter_documents(tmp_path)


# --------------------------------------------------------------------------------------------------
# chunking


def test_word_counts_and_tail_merging():
    def sizes(n: int, w: int = 100) -> list[int]:
        doc = Document("d", "T", [words(n)])
        return [len(p.text.split()) for p in chunk_document(doc, words_per_passage=w)]

    assert sizes(250) == [100, 100, 50]
    assert sizes(225) == [100, 100, 25]  # a tail of exactly 100 // 4 words stays a passage
    assert sizes(224) == [100, 124]
    assert sizes(200) == [100, 100]
    assert sizes(20) == [20]  # only passage: never merged away
    assert sizes(7, w=3) == [3, 3, 1]  # 3 // 4 == 0: nothing is merged
    assert sizes(17, w=8) == [8, 9]
    assert sizes(0) == []


def test_passages_span_paragraphs_with_kilt_provenance():
    doc = Document(
        "42",
        "Some Page",
        ["Some Page", "  alpha beta\tgamma  ", "delta\n epsilon", "zeta eta theta iota", "kappa"],
    )
    passages = list(chunk_document(doc, words_per_passage=4))
    assert [p.text for p in passages] == ["alpha beta gamma delta", "epsilon zeta eta theta", "iota kappa"]
    first, second, third = passages
    assert (first.start_paragraph_id, first.start_character, first.end_paragraph_id, first.end_character) == (
        1,
        2,
        2,
        5,
    )
    assert (
        second.start_paragraph_id,
        second.start_character,
        second.end_paragraph_id,
        second.end_character,
    ) == (2, 7, 3, 14)
    assert (third.start_paragraph_id, third.end_paragraph_id) == (3, 4)
    assert [p.passage_id for p in passages] == ["42::0", "42::1", "42::2"]
    assert all(p.doc_id == "42" and p.title == "Some Page" for p in passages)
    assert_provenance(doc, passages)


def test_title_paragraph_skipping():
    doc = Document("1", "Title", [" Title ", "body words here"])
    [p] = chunk_document(doc)
    assert (p.text, p.start_paragraph_id, p.start_character) == ("body words here", 1, 0)
    [p] = chunk_document(doc, skip_title_paragraph=False)
    assert (p.text, p.start_paragraph_id, p.end_paragraph_id) == ("Title body words here", 0, 1)
    # only the title paragraph (or nothing but blank ones after it): it is kept
    assert [p.text for p in chunk_document(Document("2", "Title", ["Title"]))] == ["Title"]
    assert [p.text for p in chunk_document(Document("3", "Title", ["Title", "  "]))] == ["Title"]
    # a first paragraph that is not the title is never skipped
    [p] = chunk_document(Document("4", "Title", ["Intro text", "more"]))
    assert p.start_paragraph_id == 0 and p.text == "Intro text more"


def test_all_words_kept_in_order():
    doc = Document("d", "T", ["T", words(57, "a"), "", words(131, "b"), " x  y "])
    passages = list(chunk_document(doc, words_per_passage=50))
    assert [w for p in passages for w in p.text.split(" ")] == doc_words(doc, first_paragraph=1)
    assert all(len(p.text.split()) <= 50 for p in passages[:-1])
    assert_provenance(doc, passages)


def test_chunking_is_deterministic_and_ids_are_unique():
    docs = [Document(f"d{i}", f"T{i}", [f"T{i}", words(40 + 37 * i)]) for i in range(6)]
    first = list(iter_passages(docs, words_per_passage=30))
    second = list(iter_passages(iter(docs), words_per_passage=30))
    assert first == second
    assert len({p.passage_id for p in first}) == len(first)
    assert [p.passage_id for p in first if p.doc_id == "d2"] == ["d2::0", "d2::1", "d2::2", "d2::3"]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_invalid_words_per_passage(bad):
    doc = Document("d", "T", ["x"])
    with pytest.raises(ValueError, match="words_per_passage"):
        chunk_document(doc, words_per_passage=bad)
    with pytest.raises(ValueError, match="words_per_passage"):
        iter_passages([doc], words_per_passage=bad)


# --------------------------------------------------------------------------------------------------
# the real shared data

KILT_PASSAGES = 4609  # passages of the shared KILT mini knowledge source at 100 words


def test_shared_kilt_knowledge_source(shared_data):
    path = shared_data / "nq_open_oracle" / "wiki-mini-knowledgesource.jsonl"
    assert detect_format(path) == "kilt"
    report = IngestReport()
    docs = list(iter_documents(path, report=report))
    assert len(docs) == 1948 and report.documents == 1948 and report.skipped == 0
    assert len({d.doc_id for d in docs}) == 1948
    by_id = {d.doc_id: d for d in docs}
    assert by_id["List of Nobel laureates in Physics"].paragraphs[0].startswith("The first Nobel Prize in Physics")
    passages = list(iter_passages(docs))
    assert len(passages) == KILT_PASSAGES
    assert len({p.passage_id for p in passages}) == len(passages)
    assert all(1 <= len(p.text.split()) < 125 for p in passages)
    total_words = sum(len(doc_words(d)) for d in docs)
    assert sum(len(p.text.split()) for p in passages) == total_words  # no title paragraphs in this dump
    for p in passages[::7]:
        assert_provenance(by_id[p.doc_id], [p])
    prefix = list(iter_passages(docs[:50]))
    assert prefix == passages[: len(prefix)]


def test_shared_squad_dev(shared_data):
    path = shared_data / "squad" / "dev-v1.1.json"
    assert detect_format(path) == "squad"
    docs, report = read(path)
    assert len(docs) == 48 and report.skipped == 0
    assert sum(len(d.paragraphs) for d in docs) == 2067
    assert docs[0].doc_id == docs[0].title == "Super_Bowl_50"


def test_shared_squad_v2_sample(shared_data):
    docs, report = read(shared_data / "haystack_samples" / "squad_v2_dev_small.json")
    assert len(docs) == 2 and sum(len(d.paragraphs) for d in docs) == 87 and report.skipped == 0


def test_shared_dpr_sample_distinct_passages(shared_data):
    path = shared_data / "haystack_samples" / "dpr_nq_dev_sample.json"
    assert detect_format(path) == "dpr-json"
    records = json.loads(path.read_text(encoding="utf-8"))
    ctxs = [c for r in records for k in ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs") for c in r[k]]
    distinct = {str(c.get("passage_id", c.get("psg_id"))) for c in ctxs}
    docs, report = read(path)
    assert report.skipped == 0
    assert len(ctxs) == 755 and len(docs) == len(distinct) == 751
    assert {d.doc_id for d in docs} == distinct
    first = docs[0]
    assert first.doc_id == "11828866" and first.title == "Does He Love You" and len(first.paragraphs) == 1


def test_shared_sample_directory(shared_data):
    docs, report = read(shared_data / "haystack_samples")
    assert len(docs) == 751 + 2 and report.skipped == 0


def test_shared_kilt_task_files_are_not_a_corpus(shared_data):
    with pytest.raises(CorpusError, match="Supported formats: kilt, squad"):
        iter_documents(shared_data / "kilt_samples")

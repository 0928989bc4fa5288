"""Ingest of one planned file: formats, stores, mapping, filters, every kind of bad input."""

from __future__ import annotations

import codecs
import hashlib
import io
import re
import tracemalloc

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import datasets
import pytest
import zstandard

from storage.store import LocalStore, Store
from tasks.config import Filters, SourceConfig
from tasks.ingest import DOC_SCHEMA, IngestError, docs_key, ingest_file, quarantine_key
from tasks.plan import PlannedFile, document_id

ORDINAL = 7
FILTERS = Filters(min_chars=10)


def source(fmt: str = "jsonl", **fields) -> SourceConfig:
    return SourceConfig(name="web", uri="unused", format=fmt, **fields)


def place(store: Store, key: str, data: bytes, ordinal: int = ORDINAL) -> PlannedFile:
    store.put_bytes(key, data)
    return PlannedFile(source="web", uri=store.url(key), size=len(data), ordinal=ordinal)


def jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in records)


def docs(out: Store, file: PlannedFile) -> list[dict]:
    table = pq.read_table(pa.BufferReader(out.get_bytes(docs_key(file))))
    assert table.schema == DOC_SCHEMA
    return table.to_pylist()


def quarantined(out: Store, file: PlannedFile) -> list[dict]:
    return [orjson.loads(line) for line in out.get_bytes(quarantine_key(file)).splitlines()]


def ids(*records: int) -> list[int]:
    return [document_id(ORDINAL, r) for r in records]


def doc(record: int, text: str, meta: str = "{}") -> dict:
    return {"id": document_id(ORDINAL, record), "source": "web", "text": text, "meta": meta}


@pytest.fixture
def out(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "build")


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst"])
def test_jsonl_records_become_documents(store, fmt):
    data = jsonl(
        {"text": "Cafe\u0301 au lait, s'il vous pla\u00eet", "meta": {"set": "Web", "n": 1}, "other": [1]},
        {"text": "an excluded document of enough length", "meta": {"set": "Github"}},
        {"text": "short", "meta": {"set": "Web"}},
        {"text": "a second kept document", "meta": {}},
        b"   ",
        {"text": "it has a NUL\u0000 character inside", "meta": {"set": "Web", "n": {"deep": [2]}}},
    )
    if fmt == "jsonl.zst":
        data = zstandard.ZstdCompressor().compress(data)
    file = place(store, f"raw/input.{fmt}", data)
    build = store.child("build")
    src = source(fmt, meta_fields=["meta.set", "meta.n"], exclude={"meta.set": ["Github"]})

    receipt = ingest_file(file, src, FILTERS, quarantine=True, out=build)

    assert receipt.sources[src.name].model_dump(include={"docs_in", "kept", "filtered", "malformed"}) == {
        "docs_in": 5, "kept": 3, "filtered": 2, "malformed": 0
    }  # fmt: skip
    kept = ["Caf\u00e9 au lait, s'il vous pla\u00eet", "a second kept document", "it has a NUL character inside"]
    assert docs(build, file) == [
        doc(0, kept[0], '{"meta.n":1,"meta.set":"Web"}'),  # NFC: e + combining accent became one character
        doc(3, kept[1]),
        doc(5, kept[2], '{"meta.n":{"deep":[2]},"meta.set":"Web"}'),
    ]
    assert receipt.counts.as_dict() == {
        "docs_in": 5, "kept": 3, "filtered": 2, "malformed": 0, "excluded": 1, "nul_stripped": 1,
        "bytes_in": sum(len(text.encode()) for text in kept),
    }  # fmt: skip
    [output] = receipt.outputs  # nothing was malformed: no quarantine object
    body = build.get_bytes(docs_key(file))
    assert (output.key, output.size, output.sha256) == (docs_key(file), len(body), hashlib.sha256(body).hexdigest())
    assert not build.exists(quarantine_key(file))


DEEP = b"[" * 1100 + b"]" * 1100  # orjson parses up to 1024 levels
LONG = orjson.dumps({"text": "y" * 5000})
BAD_LINES = {
    2: (b'{"text": "unterminated', "invalid JSON"),
    3: (b'["a", "list"]', "record is of type list, not a JSON object"),
    4: (b'{"body": "no text field here"}', "no text field 'text'"),
    5: (b'{"text": 42}', "text field 'text' is of type int, not a string"),
    6: (b'{"text": "invalid \xff\xfe UTF-8 bytes"}', "UTF-8"),
    7: (b'{"text": "a lone \\ud800 surrogate escape"}', "surrogate"),
    8: (DEEP, "depth"),
    9: (b'{"text": "a raw \x00 NUL byte in a JSON string"}', "control character"),
    10: (LONG, f"line of {len(LONG)} bytes exceeds max_record_bytes=4096"),
    12: (b'{"text": null}', "text field 'text' is null"),
    13: (b'{"text": "meta nested too deep", "meta": ' + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}", "meta fields"),
}


def test_bad_records_are_quarantined_and_counted(tmp_path, out):
    lines = {1: b'{"text": "the first good document"}', 11: b'{"text": ""}', 14: b'{"text": "the last good document"}'}
    lines.update({number: line for number, (line, _) in BAD_LINES.items()})
    file = place(LocalStore(tmp_path / "raw"), "bad.jsonl", b"\n".join(lines[n] for n in sorted(lines)) + b"\n")
    src = source(meta_fields=["meta"])

    receipt = ingest_file(file, src, Filters(min_chars=0, max_record_bytes=4096), quarantine=True, out=out)

    assert receipt.counts.docs_in == 14
    assert (receipt.counts.kept, receipt.counts.filtered, receipt.counts.malformed) == (2, 1, 11)
    assert [d["id"] for d in docs(out, file)] == ids(0, 13)  # ids count every line, bad ones too
    entries = quarantined(out, file)
    assert [e["line"] for e in entries] == sorted(BAD_LINES)
    for entry in entries:
        line, reason = BAD_LINES[entry["line"]]
        assert reason in entry["reason"]
        assert entry["uri"] == file.uri
        assert entry["raw"] == line[:1024].decode("utf-8", "replace")
    assert [o.key for o in receipt.outputs] == [docs_key(file), quarantine_key(file)]
    assert receipt.outputs[1].size == len(out.get_bytes(quarantine_key(file)))


@pytest.mark.parametrize("bad", [2, 6, 7, 10], ids=["json", "utf8", "surrogate", "too-long"])
def test_without_quarantine_the_first_bad_record_fails_the_file(tmp_path, out, bad):
    line, reason = BAD_LINES[bad]
    data = jsonl({"text": "a good document first"}, line, {"text": "never reached, another bad:"}, b"[1]")
    file = place(LocalStore(tmp_path / "raw"), "bad.jsonl", data)
    with pytest.raises(IngestError, match=f"{re.escape(file.uri)} line 2: .*{re.escape(reason)}"):
        ingest_file(file, source(), Filters(max_record_bytes=4096), quarantine=False, out=out)
    assert list(out.list()) == []  # nothing committed


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst"])
def test_a_byte_order_mark_at_the_start_of_a_file_is_not_text(tmp_path, out, fmt):
    data = codecs.BOM_UTF8 + jsonl({"text": "the first document, after the mark"}, {"text": "the second document"})
    if fmt == "jsonl.zst":
        data = zstandard.ZstdCompressor().compress(data)
    file = place(LocalStore(tmp_path / "raw"), f"bom.{fmt}", data)
    receipt = ingest_file(file, source(fmt), FILTERS, quarantine=True, out=out)
    assert (receipt.counts.kept, receipt.counts.malformed) == (2, 0)
    assert [d["text"] for d in docs(out, file)] == ["the first document, after the mark", "the second document"]


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst"])
def test_invalid_utf8_is_quarantined_naming_its_line_and_byte_offset(tmp_path, out, fmt):
    first, bad = b'{"text": "a good first document"}', b'{"text": "caf\xc3 au lait"}'
    data = codecs.BOM_UTF8 + first + b"\n" + bad + b"\n"
    offset, in_line = data.index(b"\xc3"), bad.index(b"\xc3")
    stream = "file"
    if fmt == "jsonl.zst":
        data, stream = zstandard.ZstdCompressor().compress(data), "decompressed stream"
    file = place(LocalStore(tmp_path / "raw"), f"bad.{fmt}", data)
    receipt = ingest_file(file, source(fmt), FILTERS, quarantine=True, out=out)
    assert (receipt.counts.kept, receipt.counts.malformed) == (1, 1)
    [entry] = quarantined(out, file)
    assert entry["line"] == 2
    assert entry["reason"] == f"invalid UTF-8: byte 0xc3 at byte offset {offset} of the {stream} ({in_line} into the line)"
    with pytest.raises(IngestError, match=f"{re.escape(file.uri)} line 2: invalid UTF-8: byte 0xc3 at byte offset {offset} "):
        ingest_file(file, source(fmt), FILTERS, quarantine=False, out=LocalStore(tmp_path / "strict"))


def test_empty_text_is_filtered_even_with_no_minimum(tmp_path, out):
    file = place(LocalStore(tmp_path / "raw"), "e.jsonl", jsonl({"text": ""}, {"text": "\u0000"}, {"text": "x"}))
    receipt = ingest_file(file, source(), Filters(min_chars=0), quarantine=True, out=out)
    assert (receipt.counts.kept, receipt.counts.filtered) == (1, 2)
    assert [d["text"] for d in docs(out, file)] == ["x"]


def _lines(n: int) -> bytes:
    return jsonl(*({"text": f"document number {i} " + "w" * (i % 50)} for i in range(n)))


def test_truncated_zst_keeps_what_was_read(store):
    data = _lines(30_000)  # many zstd blocks: the cut leaves whole blocks before it
    compressed = zstandard.ZstdCompressor().compress(data)
    cut = compressed[: len(compressed) // 2]
    readable = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(cut)).read()  # silently short
    complete_lines = readable.count(b"\n")
    file = place(store, "raw/cut.jsonl.zst", cut)
    build = store.child("build")

    receipt = ingest_file(file, source("jsonl.zst"), FILTERS, quarantine=True, out=build)

    assert receipt.counts.kept == complete_lines > 0
    assert receipt.counts.malformed == 1
    [entry] = quarantined(build, file)
    assert entry["line"] == complete_lines + 1
    assert f"ends inside a frame at compressed byte {len(cut)}" in entry["reason"]
    expected = [orjson.loads(line)["text"] for line in data.splitlines()[:complete_lines]]
    assert [d["text"] for d in docs(build, file)] == expected

    with pytest.raises(IngestError, match=f"line {complete_lines + 1}: zstd stream ends inside a frame"):
        ingest_file(file, source("jsonl.zst"), FILTERS, quarantine=False, out=store.child("other"))


def test_zst_cut_anywhere_but_between_frames_is_reported(tmp_path):
    """Multi-frame files (checksums, skippable frames, RLE and raw blocks) end cleanly only between frames."""
    compress = zstandard.ZstdCompressor(write_checksum=True)
    frames = [
        compress.compress(jsonl({"text": "first frame document"})),
        b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"skip!",  # a skippable frame
        zstandard.ZstdCompressor(write_content_size=False).compress(b'{"text": "' + b"a" * 300 + b'"}\n'),
        compress.compress(b"\n" * 5000),  # blank lines: an RLE block, no records
        zstandard.ZstdCompressor(level=1).compress(jsonl({"text": "a third frame, stored raw"})),
    ]
    data = b"".join(frames)
    boundaries = {sum(len(f) for f in frames[:i]) for i in range(len(frames) + 1)}
    raw, out = LocalStore(tmp_path / "raw"), LocalStore(tmp_path / "build")
    for cut in range(len(data) + 1):
        file = place(raw, "f.jsonl.zst", data[:cut])
        receipt = ingest_file(file, source("jsonl.zst"), FILTERS, quarantine=True, out=out)
        assert receipt.counts.malformed == (cut not in boundaries), cut
    assert receipt.counts.kept == 3


def test_zstd_bomb_and_overlong_lines_keep_memory_bounded(tmp_path, out):
    bomb = 256 << 20
    writer = zstandard.ZstdCompressor(level=1).compressobj()
    data = writer.compress(b'{"text": "') + b"".join(writer.compress(b"a" * (1 << 20)) for _ in range(bomb >> 20))
    data += writer.compress(b'"}\n' + jsonl({"text": "the document after the bomb"})) + writer.flush()
    assert len(data) < 1 << 20  # it expands more than 256 times
    file = place(LocalStore(tmp_path / "raw"), "bomb.jsonl.zst", data)

    filters = Filters(min_chars=1, max_record_bytes=4 << 20)
    tracemalloc.start()
    try:
        receipt = ingest_file(file, source("jsonl.zst"), filters, quarantine=True, out=out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak < 32 << 20
    assert (receipt.counts.kept, receipt.counts.malformed) == (1, 1)
    [entry] = quarantined(out, file)
    assert entry["reason"] == f"line of {bomb + 12} bytes exceeds max_record_bytes={4 << 20}"
    assert entry["raw"] == '{"text": "' + "a" * 1014


def test_zst_frame_declaring_a_huge_window_is_refused(tmp_path, out):
    """zstd would allocate the declared window (2 GiB here); above 128 MiB the frame is malformed, as for the zstd CLI."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31)
    writer = zstandard.ZstdCompressor(compression_params=params).compressobj()
    data = writer.compress(_lines(10)) + writer.flush()
    file = place(LocalStore(tmp_path / "raw"), "window.jsonl.zst", data)
    receipt = ingest_file(file, source("jsonl.zst"), FILTERS, quarantine=True, out=out)
    assert (receipt.counts.kept, receipt.counts.malformed) == (0, 1)
    assert "Frame requires too much memory" in quarantined(out, file)[0]["reason"]


def test_long_lines_across_read_chunks(tmp_path, out):
    long_doc = "b" * (3 << 19)  # 1.5 MiB: spans read chunks, under the cap
    data = jsonl({"text": "before"}, {"text": "c" * (5 << 20)}, {"text": long_doc}) + b'{"text": "no final newline"}'
    file = place(LocalStore(tmp_path / "raw"), "long.jsonl", data)
    receipt = ingest_file(file, source(), Filters(min_chars=1, max_record_bytes=2 << 20), quarantine=True, out=out)
    assert [d["text"] for d in docs(out, file)] == ["before", long_doc, "no final newline"]
    assert [d["id"] for d in docs(out, file)] == ids(0, 2, 3)
    [entry] = quarantined(out, file)
    assert entry["line"] == 2 and "exceeds max_record_bytes" in entry["reason"]
    assert receipt.counts.docs_in == 4


def test_a_50_mb_document_is_kept(tmp_path, out):
    text = "All work and no play makes Jack a dull boy. " * (50_000_000 // 44)
    data = zstandard.ZstdCompressor(level=1).compress(jsonl({"text": text}, {"text": "a small one after it"}))
    file = place(LocalStore(tmp_path / "raw"), "big.jsonl.zst", data)
    receipt = ingest_file(file, source("jsonl.zst"), FILTERS, quarantine=True, out=out)
    assert receipt.counts.kept == 2 and receipt.counts.bytes_in == len(text) + 20
    assert docs(out, file)[0]["text"] == text


def test_output_is_byte_identical_across_runs(tmp_path):
    file = place(LocalStore(tmp_path / "raw"), "many.jsonl", _lines(5000) + b"not json\n")
    digests = set()
    for run in range(2):
        out = LocalStore(tmp_path / f"build{run}")
        receipt = ingest_file(file, source(), FILTERS, quarantine=True, out=out)
        digests.add(tuple((o.key, o.sha256) for o in receipt.outputs))
        row_groups = pq.ParquetFile(pa.BufferReader(out.get_bytes(docs_key(file)))).num_row_groups
    assert len(digests) == 1 and row_groups == 3  # 2048 documents a row group


def write_parquet(store: Store, key: str, table: pa.Table, **kwargs) -> PlannedFile:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    return place(store, key, sink.getvalue().to_pybytes())


def test_parquet_rows_become_documents(store):
    table = pa.table(
        {
            "content": ["def f():\n    return 1\n", "package main // go", None, "", "print('hello')"],
            "lang": ["Python", "Go", "Python", "Python", "Python"],
            "meta": [{"repo": "a/b", "stars": 3}, {"repo": "c/d", "stars": 1}, None, None, {"repo": "e/f", "stars": 0}],
            "unused": [1, 2, 3, 4, 5],
        }
    )
    file = write_parquet(store, "raw/part-0.parquet", table, row_group_size=2)
    build = store.child("build")
    src = source("parquet", text_field="content", meta_fields=["lang", "meta.repo"], exclude={"lang": ["Go"]})

    receipt = ingest_file(file, src, FILTERS, quarantine=True, out=build)

    assert docs(build, file) == [
        doc(0, "def f():\n    return 1\n", '{"lang":"Python","meta.repo":"a/b"}'),
        doc(4, "print('hello')", '{"lang":"Python","meta.repo":"e/f"}'),
    ]
    assert receipt.counts.as_dict() | {"bytes_in": 0} == {
        "docs_in": 5, "kept": 2, "filtered": 2, "malformed": 1, "bytes_in": 0, "excluded": 1, "nul_stripped": 0
    }  # fmt: skip
    [entry] = quarantined(build, file)
    assert (entry["row"], entry["reason"]) == (2, "text field 'content' is null, not a string")
    assert entry["raw"] == '{"content":null,"lang":"Python","meta":null}'


@pytest.mark.parametrize(
    "data, error",
    [
        (pa.table({"text": ["a document without the column"]}), "no column 'content' .*columns are \\['text'\\]"),
        (pa.table({"content": [1, 2]}), "text column 'content' has type int64, not string"),
        (b"PAR1 this is not parquet at all", "not a readable parquet file"),
    ],
    ids=["missing-column", "wrong-type", "unreadable"],
)
def test_parquet_file_problems_are_errors_naming_the_file(tmp_path, out, data, error):
    raw = LocalStore(tmp_path / "raw")
    file = place(raw, "p.parquet", data) if isinstance(data, bytes) else write_parquet(raw, "p.parquet", data)
    with pytest.raises(IngestError, match=f"{re.escape(file.uri)}: {error}"):
        ingest_file(file, source("parquet", text_field="content"), FILTERS, quarantine=True, out=out)
    assert list(out.list()) == []


def test_hf_dataset_row_range(tmp_path, out):
    rows = [{"text": f"hugging face row {i:05d}", "meta": {"n": i}} for i in range(2500)]
    folder = tmp_path / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder), num_shards=3)
    src = source("hf", meta_fields=["meta.n"])

    file = PlannedFile(source="web", uri=str(folder), size=1, ordinal=ORDINAL, rows=(700, 1900))
    receipt = ingest_file(file, src, FILTERS, quarantine=True, out=out)

    got = docs(out, file)
    assert receipt.counts.kept == len(got) == 1200
    assert [d["text"] for d in got] == [r["text"] for r in rows[700:1900]]
    assert [d["id"] for d in got] == ids(*range(1200))
    assert got[0]["meta"] == '{"meta.n":700}'

    with pytest.raises(IngestError, match="no column 'body'"):
        ingest_file(file, source("hf", text_field="body"), FILTERS, quarantine=True, out=out)
    not_a_dataset = PlannedFile(source="web", uri=str(tmp_path / "raw"), size=1, ordinal=0, rows=(0, 1))
    with pytest.raises(IngestError, match="not a dataset folder written by Dataset.save_to_disk"):
        ingest_file(not_a_dataset, src, FILTERS, quarantine=True, out=out)

"""Stage 2, ingest: read one planned input file and write its documents as one parquet shard.

Every source's records map to one document schema (id, source, text, meta). Text is
NFC-normalized; NUL characters are stripped from it (they carry no text and break C-string
tools downstream; the record is kept and counted in `nul_stripped`). A record is:
- kept, or
- filtered: its `exclude` field matches, or its text is empty or shorter than `min_chars`, or
- malformed: not JSON, not an object, no string text field, invalid UTF-8 or lone
  surrogates, nesting deeper than the parser's limit, longer than `max_record_bytes`, or
  the point where a `.zst` stream ends inside a frame or is corrupt.
With quarantine on, malformed records are counted and written to a quarantine jsonl
(uri, 1-based line or 0-based row, reason, the first KiB of the record); with it off, the
first one fails the file with an IngestError naming file and line/row, and nothing is
written. A whole-file problem (an unreadable parquet file, a missing text column) is always
an IngestError: it is a configuration error, not a bad record. Blank lines are not records.

Memory stays bounded whatever the input: lines are read in chunks and a line over the cap
is skipped chunk by chunk, decompression is streamed, and documents are written in row groups.
"""

from __future__ import annotations

import json
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from storage.manifest import Receipt, upload
from storage.store import LocalStore, Store, open_object, open_store
from tasks.config import Filters, Format, SourceConfig
from tasks.fanout import run_shards
from tasks.plan import Build, PlannedFile, check_unchanged, document_id
from tasks.reporting import progress, stage_table
from tasks.stage import stage_task

DOC_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),  # large: no 2 GiB limit per row group
        pa.field("meta", pa.string(), nullable=False),  # JSON object of the kept meta fields
    ]
)

READ_CHUNK = 1 << 20  # bytes of (decompressed) input read at a time
ROW_GROUP_BYTES = 8 << 20  # a row group is written once this much text is buffered...
ROW_GROUP_DOCS = 2048  # ...or this many documents
RAW_SAMPLE = 1024  # bytes of a bad record kept in the quarantine


class IngestError(ValueError):
    """An input file cannot be ingested; the message names the file (and the line or row)."""


def docs_key(file: PlannedFile) -> str:
    """The document shard of a planned file, relative to the build folder."""
    return f"docs/{file.source}/{file.shard}.parquet"


def quarantine_key(file: PlannedFile) -> str:
    """The malformed records of a planned file, relative to the build folder."""
    return f"quarantine/{file.source}/{file.shard}.jsonl"


def ingest_file(file: PlannedFile, source: SourceConfig, filters: Filters, quarantine: bool, out: Store) -> Receipt:
    """Ingest one planned file into `out` (the build folder) and return its receipt.

    An input that is no longer the one planned (InputChanged) is refused before anything is
    written for it; it is checked again, cheaply, after it was read and before the upload.
    """
    if file.source != source.name:
        raise ValueError(f"planned file of source {file.source!r} given the config of source {source.name!r}")
    check_unchanged(file)
    to_document = _DocumentMapper(source, filters)
    docs_in = kept = excluded = too_short = bytes_in = nul_stripped = 0
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        docs_path, bad_path = Path(tmp) / "docs.parquet", Path(tmp) / "quarantine.jsonl"
        with _DocWriter(docs_path, source.name) as docs, _Quarantine(bad_path if quarantine else None, file.uri) as bad:
            for index, location, record, raw in _read_records(file, source, filters, Path(tmp)):
                docs_in += 1
                if type(record) is _Bad:
                    bad.add(location, record.reason, raw)
                    continue
                try:
                    document = to_document(record)
                except _Malformed as error:
                    bad.add(location, str(error), raw if raw is not None else _row_sample(record))
                    continue
                if document is _EXCLUDED:
                    excluded += 1
                elif document is _TOO_SHORT:
                    too_short += 1
                else:
                    text, meta, size, had_nul = document
                    docs.add(document_id(file.ordinal, index), text, meta, size)
                    kept += 1
                    bytes_in += size
                    nul_stripped += had_nul
        counts = {
            "docs_in": docs_in,
            "kept": kept,
            "filtered": excluded + too_short,
            "malformed": bad.count,
            "bytes_in": bytes_in,
            "excluded": excluded,
            "nul_stripped": nul_stripped,
        }
        assert docs_in == kept + counts["filtered"] + bad.count, counts
        check_unchanged(file, hash_content=False)
        outputs = [upload(out, docs_key(file), docs_path)]
        if bad.count:
            outputs.append(upload(out, quarantine_key(file), bad_path))
    return Receipt(stage="ingest", shard=file.shard, outputs=outputs, counts=counts)


@stage_task("ingest")
def ingest(build: Build) -> dict[str, int | float]:
    """Every planned file to a docs shard, one Ray task each; returns the stage's totals."""
    config, store = build.config, build.store
    sources = {s.name: s for s in config.sources}
    receipts = run_shards(
        "ingest", store, build.plan, lambda f: f.shard,
        lambda f: ingest_file(f, sources[f.source], config.filters, config.quarantine, store),
        on_progress=progress("ingest", config.name), max_in_flight=config.parallelism,
    )
    return stage_table("ingest", config.name, receipts)


# --- mapping a record to a document ---------------------------------------------------------

_MISSING = object()
_EXCLUDED = object()
_TOO_SHORT = object()


class _Malformed(Exception):
    """A record that cannot become a document; the message is the reason."""


class _Bad:
    """A record the reader already found bad (unparseable, too long, cut off)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _lookup(record: dict, path: tuple[str, ...]) -> Any:
    value: Any = record
    for key in path:
        if type(value) is not dict:
            return _MISSING
        value = value.get(key, _MISSING)
        if value is _MISSING:
            break
    return value


class _DocumentMapper:
    """Turns a parsed record (a dict) into (text, meta JSON, UTF-8 size, had NULs), or a filter verdict."""

    def __init__(self, source: SourceConfig, filters: Filters):
        self.text_field = source.text_field
        self.text_path = tuple(source.text_field.split("."))
        self.meta_paths = [(name, tuple(name.split("."))) for name in sorted(source.meta_fields)]
        self.exclude = [(tuple(field.split(".")), tuple(values)) for field, values in source.exclude.items()]
        self.min_chars = max(filters.min_chars, 1)  # an empty document is never kept
        self.max_bytes = filters.max_record_bytes

    def __call__(self, record: Any) -> tuple[str, str, int, bool] | object:
        if type(record) is not dict:
            raise _Malformed(f"record is of type {type(record).__name__}, not a JSON object")
        text = _lookup(record, self.text_path)
        if text is _MISSING:
            raise _Malformed(f"no text field {self.text_field!r}")
        if type(text) is not str:
            kind = "null" if text is None else f"of type {type(text).__name__}"
            raise _Malformed(f"text field {self.text_field!r} is {kind}, not a string")
        for path, values in self.exclude:
            if _lookup(record, path) in values:
                return _EXCLUDED
        text = unicodedata.normalize("NFC", text)
        had_nul = "\x00" in text
        if had_nul:
            text = text.replace("\x00", "")
        if len(text) < self.min_chars:
            return _TOO_SHORT
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        if size > self.max_bytes:
            raise _Malformed(f"text of {size} bytes exceeds max_record_bytes={self.max_bytes}")
        if not self.meta_paths:
            return text, "{}", size, had_nul
        meta = {name: value for name, path in self.meta_paths if (value := _lookup(record, path)) is not _MISSING}
        try:
            meta_json = orjson.dumps(meta, default=str, option=orjson.OPT_SORT_KEYS).decode()
        except orjson.JSONEncodeError as error:  # e.g. nesting deeper than orjson writes
            raise _Malformed(f"meta fields cannot be written as JSON: {error}") from None
        return text, meta_json, size, had_nul


def _row_sample(record: Any) -> bytes:
    """The start of a table row, for the quarantine."""
    try:
        return orjson.dumps(record, default=str)[:RAW_SAMPLE]
    except orjson.JSONEncodeError:
        return repr(record)[:RAW_SAMPLE].encode("utf-8", "replace")


# --- writing ---------------------------------------------------------------------------------


class _DocWriter:
    """Buffers documents and writes them to a parquet file, one row group per ~8 MiB of text."""

    def __init__(self, path: Path, source: str):
        self._writer = pq.ParquetWriter(
            path, DOC_SCHEMA, compression="zstd", use_dictionary=["source"], write_statistics=["id"]
        )
        self._source = source
        self._ids: list[int] = []
        self._texts: list[str] = []
        self._metas: list[str] = []
        self._bytes = 0

    def add(self, doc_id: int, text: str, meta: str, size: int) -> None:
        self._ids.append(doc_id)
        self._texts.append(text)
        self._metas.append(meta)
        self._bytes += size
        if self._bytes >= ROW_GROUP_BYTES or len(self._ids) >= ROW_GROUP_DOCS:
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        rows = len(self._ids)
        table = pa.table(
            [
                pa.array(self._ids, pa.int64()),
                pa.array([self._source] * rows, pa.string()),
                pa.array(self._texts, pa.large_string()),
                pa.array(self._metas, pa.string()),
            ],
            schema=DOC_SCHEMA,
        )
        self._writer.write_table(table, row_group_size=rows)
        self._ids, self._texts, self._metas, self._bytes = [], [], [], 0

    def __enter__(self) -> _DocWriter:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self._flush()
        finally:
            self._writer.close()


class _Quarantine:
    """Writes bad records to a local jsonl; with no path (quarantine off) the first one raises."""

    def __init__(self, path: Path | None, uri: str):
        self._file = open(path, "wb") if path is not None else None
        self._uri = uri
        self.count = 0

    def add(self, location: tuple[str, int], reason: str, raw: bytes) -> None:
        kind, number = location
        if self._file is None:
            raise IngestError(
                f"{self._uri} {kind} {number}: {reason} (set quarantine: true to count and quarantine bad records)"
            )
        entry = {"uri": self._uri, kind: number, "reason": reason, "raw": raw[:RAW_SAMPLE].decode("utf-8", "replace")}
        self._file.write(orjson.dumps(entry) + b"\n")
        self.count += 1

    def __enter__(self) -> _Quarantine:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()


# --- reading ---------------------------------------------------------------------------------

# A record as read: (index in the file, for its id; ("line", 1-based) or ("row", 0-based);
# the parsed record or a _Bad; the raw line, or None for a table row).
RawRecord = tuple[int, tuple[str, int], Any, bytes | None]


def _read_records(file: PlannedFile, source: SourceConfig, filters: Filters, tmp: Path) -> Iterator[RawRecord]:
    if source.format in (Format.jsonl, Format.jsonl_zst):
        return _jsonl_records(file, source.format == Format.jsonl_zst, filters.max_record_bytes)
    if source.format == Format.parquet:
        return _parquet_records(file, source, tmp)
    return _hf_records(file, source)


def _jsonl_records(file: PlannedFile, compressed: bool, max_bytes: int) -> Iterator[RawRecord]:
    store, key = open_object(file.uri)
    with store.open_read(key) as raw:
        stream = _ZstdStream(raw) if compressed else raw
        for number, line, problem in _lines(stream, max_bytes):
            if problem is not None:
                yield number - 1, ("line", number), _Bad(problem), line
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as error:
                if not line.strip():
                    continue  # a blank line is not a record
                record = _Bad(f"invalid JSON: {error}")
            yield number - 1, ("line", number), record, line


class _CorruptStream(Exception):
    """The compressed input is cut off or damaged; the message says where."""


def _too_long(size: int, max_bytes: int) -> str:
    return f"line of {size} bytes exceeds max_record_bytes={max_bytes}"


def _lines(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes, str | None]]:
    """Split a byte stream into lines, holding at most max_bytes of any one line.

    Yields (1-based line number, line, problem). A line longer than max_bytes comes back as
    its first KiB with the problem named, its rest skipped chunk by chunk. A damaged stream
    ends with one last bad line: whatever of the current line was read, and the damage.
    """
    number = 0
    pending: list[bytes] = []  # the start of a line that continues in the next chunk
    pending_size = 0
    overlong_head: bytes | None = None  # set while skipping a line found to be too long
    while True:
        try:
            chunk = stream.read(READ_CHUNK)
        except _CorruptStream as error:
            head = overlong_head if overlong_head is not None else b"".join(pending)[:RAW_SAMPLE]
            yield number + 1, head, str(error)
            return
        if not chunk:
            break
        pieces = chunk.split(b"\n")
        tail = pieces.pop()
        if pieces and (pending or overlong_head is not None):
            # the first piece ends the line carried over from earlier chunks
            size = pending_size + len(pieces[0])
            if overlong_head is None and size <= max_bytes:
                pieces[0] = b"".join(pending) + pieces[0]
            else:
                number += 1
                head = overlong_head if overlong_head is not None else (b"".join(pending) + pieces[0])[:RAW_SAMPLE]
                yield number, head, _too_long(size, max_bytes)
                del pieces[0]
            pending, pending_size, overlong_head = [], 0, None
        for line in pieces:
            number += 1
            if len(line) > max_bytes:
                yield number, line[:RAW_SAMPLE], _too_long(len(line), max_bytes)
            else:
                yield number, line, None
        if tail:
            pending_size += len(tail)
            if overlong_head is not None:
                continue
            if pending_size > max_bytes:
                overlong_head = (b"".join(pending) + tail[:RAW_SAMPLE])[:RAW_SAMPLE]
                pending = []
            else:
                pending.append(tail)
    if overlong_head is not None:
        yield number + 1, overlong_head, _too_long(pending_size, max_bytes)
    elif pending:
        yield number + 1, b"".join(pending), None


class _ZstdStream:
    """The decompressed bytes of a zstd stream (one or more frames); raises _CorruptStream.

    zstandard's stream reader ends silently where a file is cut inside a frame, so the frame
    layout is followed on the compressed bytes as they pass by and checked at the end.
    """

    def __init__(self, raw: BinaryIO):
        self._frames = _ZstdFrames(raw)
        self._reader = zstandard.ZstdDecompressor().stream_reader(self._frames, read_across_frames=True)

    def read(self, size: int) -> bytes:
        try:
            data = self._reader.read(size)
        except zstandard.ZstdError as error:
            offset = self._frames.offset
            raise _CorruptStream(f"corrupt zstd data within the first {offset} compressed bytes: {error}") from None
        if not data and not self._frames.at_frame_end:
            offset = self._frames.offset
            raise _CorruptStream(f"zstd stream ends inside a frame at compressed byte {offset} (truncated file)")
        return data


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # the low 4 bits are free


class _ZstdFrames:
    """A pass-through reader that follows zstd frame headers and block headers (RFC 8878)."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.offset = 0  # compressed bytes read so far
        self._skip = 0  # bytes of block content (or a skippable frame) still to pass over
        self._header = b""  # the header being collected
        self._need = 4  # its length
        self._on_header = self._magic  # what to do with it once complete
        self._checksum = False

    @property
    def at_frame_end(self) -> bool:
        return self._on_header == self._magic and not self._header and not self._skip

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        position, end = 0, len(data)
        while position < end:
            if self._skip:
                step = min(self._skip, end - position)
                self._skip -= step
                position += step
                continue
            take = min(self._need - len(self._header), end - position)
            self._header += data[position : position + take]
            position += take
            if len(self._header) == self._need:
                header, self._header = self._header, b""
                self._on_header(header, self.offset + position)
        self.offset += end
        return data

    def _expect(self, size: int, on_header) -> None:
        self._need, self._on_header = size, on_header

    def _magic(self, header: bytes, offset: int) -> None:
        magic = int.from_bytes(header, "little")
        if magic == _ZSTD_MAGIC:
            self._expect(1, self._descriptor)
        elif magic & ~0xF == _SKIPPABLE_MAGIC:
            self._expect(4, self._skippable_size)
        else:
            raise _CorruptStream(f"no zstd frame at compressed byte {offset - 4}")

    def _descriptor(self, header: bytes, offset: int) -> None:
        flags = header[0]
        single_segment = flags >> 5 & 1
        self._checksum = bool(flags >> 2 & 1)
        window = 0 if single_segment else 1
        dictionary_id = (0, 1, 2, 4)[flags & 3]
        content_size = (single_segment, 2, 4, 8)[flags >> 6]
        rest = window + dictionary_id + content_size
        if rest:
            self._expect(rest, self._frame_header_rest)
        else:
            self._expect(3, self._block)

    def _frame_header_rest(self, header: bytes, offset: int) -> None:
        self._expect(3, self._block)

    def _block(self, header: bytes, offset: int) -> None:
        value = int.from_bytes(header, "little")
        last, kind, size = value & 1, value >> 1 & 3, value >> 3
        if kind == 3:
            raise _CorruptStream(f"reserved zstd block type at compressed byte {offset - 3}")
        self._skip = 1 if kind == 1 else size  # an RLE block holds one byte
        if last:
            self._skip += 4 if self._checksum else 0
            self._expect(4, self._magic)
        else:
            self._expect(3, self._block)

    def _skippable_size(self, header: bytes, offset: int) -> None:
        self._skip = int.from_bytes(header, "little")
        self._expect(4, self._magic)


def _table_columns(schema: pa.Schema, source: SourceConfig, uri: str) -> list[str]:
    """The top-level columns a source needs; a missing or non-string text column is a config error."""
    text_column = source.text_field.split(".")[0]
    if text_column not in schema.names:
        raise IngestError(
            f"{uri}: no column {text_column!r} (text_field of source {source.name!r}); columns are {schema.names}"
        )
    kind = schema.field(text_column).type
    if "." not in source.text_field and not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    ):
        raise IngestError(f"{uri}: text column {text_column!r} has type {kind}, not string")
    wanted = [text_column] + [field.split(".")[0] for field in [*source.meta_fields, *source.exclude]]
    return [name for name in dict.fromkeys(wanted) if name in schema.names]


def _table_rows(batches: Iterator[pa.RecordBatch], uri: str, first_row: int) -> Iterator[RawRecord]:
    """Rows of record batches as dicts, indexed from `first_row`; a batch that cannot be read is an IngestError."""
    row = first_row
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as error:
            raise IngestError(f"{uri}: cannot read the rows from row {row} on: {error}") from None
        if batch is None:
            return
        names = batch.schema.names
        for values in zip(*(column.to_pylist() for column in batch.columns)):
            yield row - first_row, ("row", row), dict(zip(names, values)), None
            row += 1


def _parquet_records(file: PlannedFile, source: SourceConfig, tmp: Path) -> Iterator[RawRecord]:
    store, key = open_object(file.uri)
    path = store.local_path(key) or store.download(key, tmp / "input.parquet")
    try:
        parquet = pq.ParquetFile(path)
        columns = _table_columns(parquet.schema_arrow, source, file.uri)
    except (pa.ArrowException, OSError) as error:
        raise IngestError(f"{file.uri}: not a readable parquet file: {error}") from None
    with parquet:
        yield from _table_rows(parquet.iter_batches(batch_size=1024, columns=columns), file.uri, 0)


def _hf_records(file: PlannedFile, source: SourceConfig) -> Iterator[RawRecord]:
    """Rows [start, end) of a dataset saved with `datasets.Dataset.save_to_disk`, read with pyarrow."""
    store = open_store(file.uri)
    if not isinstance(store, LocalStore):
        raise IngestError(f"{file.uri}: format hf reads a local folder written by Dataset.save_to_disk")
    try:
        state = json.loads((store.root / "state.json").read_text())
        paths = [store.root / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise IngestError(f"{file.uri}: not a dataset folder written by Dataset.save_to_disk: {error}") from None
    start, end = file.rows if file.rows is not None else (0, None)
    yield from _table_rows(_hf_batches(paths, start, end, source, file.uri), file.uri, start)


def _hf_batches(
    paths: list[Path], start: int, end: int | None, source: SourceConfig, uri: str
) -> Iterator[pa.RecordBatch]:
    position = 0  # dataset row of the next batch
    columns: list[str] | None = None
    for path in paths:
        try:
            mapped = pa.memory_map(str(path))
            reader = pa.ipc.open_stream(mapped)
        except (pa.ArrowException, OSError) as error:
            raise IngestError(f"{uri}: cannot read {path.name}: {error}") from None
        with mapped:
            if columns is None:
                columns = _table_columns(reader.schema, source, uri)
            for batch in reader:
                first, position = position, position + batch.num_rows
                if position <= start:
                    continue
                if end is not None and first >= end:
                    return
                lo = max(start, first)
                hi = position if end is None else min(end, position)
                yield batch.slice(lo - first, hi - lo).select(columns)

"""Formats jsonl and jsonl.zst: one JSON object per line, split in bounded chunks.

A line longer than `max_record_bytes` is a bad record (its first KiB kept), skipped chunk by
chunk so it is never held whole; a `.zst` stream that ends inside a frame or is corrupt ends
with one last bad record saying where. A UTF-8 byte order mark at the start of the (decompressed)
file is not text; a line that is not valid UTF-8 is a bad record naming the byte offset.
"""

from __future__ import annotations

from codecs import BOM_UTF8
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import orjson

from tasks.ingest.reader import RAW_SAMPLE, Bad, Location, Reader, Record
from tasks.ingest.zstd_frames import CorruptStream, ZstdStream
from tasks.plan import open_input

READ_CHUNK = 1 << 20  # bytes of (decompressed) input read at a time


class JsonlReader(Reader):
    compressed = False

    def records(self) -> Iterator[Record]:
        with open_input(self.file) as raw:
            stream = ZstdStream(raw) if self.compressed else raw
            for number, start, line, problem in _lines(stream, self.filters.max_record_bytes):
                if number == 1 and line.startswith(BOM_UTF8):
                    line, start = line[len(BOM_UTF8) :], start + len(BOM_UTF8)
                if problem is not None:
                    yield Record(number - 1, Location("line", number), Bad(problem), line)
                    continue
                try:
                    value = orjson.loads(line)
                except orjson.JSONDecodeError as error:
                    if not line.strip():
                        continue  # a blank line is not a record
                    value = Bad(self._not_json(line, start, error))
                yield Record(number - 1, Location("line", number), value, line)

    def _not_json(self, line: bytes, start: int, error: orjson.JSONDecodeError) -> str:
        """Why a line is not JSON; for invalid UTF-8, where (orjson names no place for it)."""
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as invalid:
            stream = "decompressed stream" if self.compressed else "file"
            return (
                f"invalid UTF-8: byte 0x{line[invalid.start]:02x} at byte offset {start + invalid.start} of the "
                f"{stream} ({invalid.start} into the line)"
            )
        return f"invalid JSON: {error}"


class JsonlZstReader(JsonlReader):
    compressed = True


def _too_long(size: int, max_bytes: int) -> str:
    return f"line of {size} bytes exceeds max_record_bytes={max_bytes}"


class Line(NamedTuple):
    number: int  # 1-based
    start: int  # the byte offset of the line in the stream
    data: bytes  # without its newline; only the first KiB of a line that is too long
    problem: str | None  # why the line is bad (too long, the stream damaged), None if it is not


def _lines(stream: BinaryIO, max_bytes: int) -> Iterator[Line]:
    """Split a byte stream into lines, holding at most max_bytes of any one line.

    A line longer than max_bytes comes back as its first KiB with the problem named, its rest
    skipped chunk by chunk. A damaged stream ends with one last bad line: whatever of the
    current line was read, and the damage.
    """
    number = 0
    start = 0  # the offset of the line being read
    pending: list[bytes] = []  # the start of a line that continues in the next chunk
    pending_size = 0
    overlong_head: bytes | None = None  # set while skipping a line found to be too long
    while True:
        try:
            chunk = stream.read(READ_CHUNK)
        except CorruptStream as error:
            head = overlong_head if overlong_head is not None else b"".join(pending)[:RAW_SAMPLE]
            yield Line(number + 1, start, head, str(error))
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
                yield Line(number, start, head, _too_long(size, max_bytes))
                start += size + 1
                del pieces[0]
            pending, pending_size, overlong_head = [], 0, None
        for line in pieces:
            number += 1
            if len(line) > max_bytes:
                yield Line(number, start, line[:RAW_SAMPLE], _too_long(len(line), max_bytes))
            else:
                yield Line(number, start, line, None)
            start += len(line) + 1
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
        yield Line(number + 1, start, overlong_head, _too_long(pending_size, max_bytes))
    elif pending:
        yield Line(number + 1, start, b"".join(pending), None)

"""A zstd stream's decompressed bytes, with the frame layout followed to catch a cut-off or corrupt file.

zstandard's `stream_reader` ends silently where a file is cut inside a frame, and its
`decompressobj` (which does report `eof`) has no output limit, so one small chunk of a zstd
bomb would inflate whole. So the stream is read through `stream_reader` (bounded output) while
`ZstdFrames` follows the frame and block headers (RFC 8878) on the compressed bytes as they
pass by; at the end of the input it must stand at a frame boundary.
"""

from __future__ import annotations

from typing import BinaryIO

import zstandard

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # the low 4 bits are free


class CorruptStream(Exception):
    """The compressed input is cut off or damaged; the message says where."""


class ZstdStream:
    """The decompressed bytes of a zstd stream (one or more frames); raises CorruptStream."""

    def __init__(self, raw: BinaryIO):
        self._frames = ZstdFrames(raw)
        self._reader = zstandard.ZstdDecompressor().stream_reader(self._frames, read_across_frames=True)

    def read(self, size: int) -> bytes:
        try:
            data = self._reader.read(size)
        except zstandard.ZstdError as error:
            offset = self._frames.offset
            raise CorruptStream(f"corrupt zstd data within the first {offset} compressed bytes: {error}") from None
        if not data and not self._frames.at_frame_end:
            offset = self._frames.offset
            raise CorruptStream(f"zstd stream ends inside a frame at compressed byte {offset} (truncated file)")
        return data


class ZstdFrames:
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
            raise CorruptStream(f"no zstd frame at compressed byte {offset - 4}")

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
            raise CorruptStream(f"reserved zstd block type at compressed byte {offset - 3}")
        self._skip = 1 if kind == 1 else size  # an RLE block holds one byte
        if last:
            self._skip += 4 if self._checksum else 0
            self._expect(4, self._magic)
        else:
            self._expect(3, self._block)

    def _skippable_size(self, header: bytes, offset: int) -> None:
        self._skip = int.from_bytes(header, "little")
        self._expect(4, self._magic)

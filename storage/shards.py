"""Token shards in the Megatron-LM indexed format: `<prefix>.bin` + `<prefix>.idx`.

The `.bin` is every document's tokens back to back, nothing else. The `.idx` describes it
(all little-endian), exactly as megatron.core.datasets.indexed_dataset writes it:

    b"MMIDIDX\\x00\\x00"              9-byte magic
    version            u64        always 1
    dtype code         u8         1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16
    sequence count     u64        n
    document count     u64        n + 1 (document indices, including the leading 0)
    sequence lengths   int32[n]   tokens per sequence
    sequence pointers  int64[n]   byte offset of each sequence in the .bin
    document indices   int64[n+1] sequence index where each document starts, then n

We write one sequence per document, so document indices are 0..n. Shards written here load
unmodified in Megatron-Core's IndexedDataset; the reader here accepts any valid shard.
"""

from __future__ import annotations

import io
import operator
import os
import struct
import tempfile
from array import array
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType

import numpy as np


INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic, version, dtype code, sequence count, document count
_HEADER = struct.Struct("<9sQBQQ")

# Megatron's DType enum; float codes (6 float64, 7 float32) exist there but are not tokens.
_DTYPE_BY_CODE: dict[int, np.dtype] = {
    1: np.dtype("<u1"),
    2: np.dtype("<i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    8: np.dtype("<u2"),
}
_CODE_BY_DTYPE = {dtype: code for code, dtype in _DTYPE_BY_CODE.items()}

# Bytes of .bin output held in memory by a writer before they go to the file.
WRITE_BUFFER_BYTES = 1 << 20


class ShardError(Exception):
    """A corrupt or inconsistent shard; the message names the file or URI and the defect."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The token type for a vocabulary: uint16 below 65500 entries (Megatron's rule), else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size < 65500 else np.dtype("<i4")


def _dtype_code(dtype: np.dtype) -> int:
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype not in _CODE_BY_DTYPE:
        supported = ", ".join(str(d) for d in _DTYPE_BY_CODE.values())
        raise ValueError(f"unsupported token dtype {dtype}; use one of: {supported}")
    return _CODE_BY_DTYPE[dtype]


@dataclass(frozen=True)
class Index:
    """A validated `.idx`: where each sequence lies in the `.bin`."""

    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32[n]
    sequence_pointers: np.ndarray  # int64[n], byte offsets
    document_indices: np.ndarray  # int64[documents + 1]

    @cached_property  # readers bounds-check every range against it
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def data_size(self) -> int:
        """The exact size in bytes the matching `.bin` must have."""
        return self.num_tokens * self.dtype.itemsize

    def check_data_size(self, size: int, name: str) -> None:
        """Raise ShardError unless the `.bin` called `name` has `size` bytes, as the index says."""
        if size != self.data_size:
            raise ShardError(
                f"{name}: data file is {size} bytes but its index describes {self.num_tokens} "
                f"{self.dtype} tokens = {self.data_size} bytes"
            )


def read_index(data: bytes, name: str) -> Index:
    """Parse and validate the bytes of a `.idx` file called `name` (a path or URI, for errors)."""
    if len(data) < _HEADER.size:
        raise ShardError(
            f"{name}: truncated index: {len(data)} bytes, the header alone is {_HEADER.size}"
        )
    magic, version, code, sequence_count, document_count = _HEADER.unpack_from(data)
    if magic != INDEX_MAGIC:
        raise ShardError(f"{name}: not a Megatron index: magic {magic!r}, expected {INDEX_MAGIC!r}")
    if version != INDEX_VERSION:
        raise ShardError(f"{name}: unsupported index version {version}, expected {INDEX_VERSION}")
    if code not in _DTYPE_BY_CODE:
        raise ShardError(f"{name}: unknown or non-integer token dtype code {code}")

    expected = _HEADER.size + sequence_count * (4 + 8) + document_count * 8
    if len(data) != expected:
        problem = "truncated index" if len(data) < expected else "trailing bytes after the index"
        raise ShardError(
            f"{name}: {problem}: {len(data)} bytes, but {sequence_count} sequences and "
            f"{document_count} document indices need {expected}"
        )
    offset = _HEADER.size
    lengths = np.frombuffer(data, dtype="<i4", count=sequence_count, offset=offset)
    offset += lengths.nbytes
    pointers = np.frombuffer(data, dtype="<i8", count=sequence_count, offset=offset)
    offset += pointers.nbytes
    document_indices = np.frombuffer(data, dtype="<i8", count=document_count, offset=offset)

    dtype = _DTYPE_BY_CODE[code]
    if sequence_count and lengths.min() < 0:
        bad = int(np.argmax(lengths < 0))
        raise ShardError(f"{name}: sequence {bad} has negative length {lengths[bad]}")
    # Sequences are packed back to back: each pointer is the byte sum of the lengths before it.
    expected_pointers = np.zeros(sequence_count, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=expected_pointers[1:])
    expected_pointers *= dtype.itemsize
    if not np.array_equal(pointers, expected_pointers):
        bad = int(np.argmax(pointers != expected_pointers))
        raise ShardError(
            f"{name}: sequence {bad} points at byte {pointers[bad]}, but the lengths before it "
            f"put it at byte {expected_pointers[bad]}"
        )
    if document_count == 0 or document_indices[0] != 0 or document_indices[-1] != sequence_count:
        ends = document_indices[[0, -1]].tolist() if document_count else "none"
        raise ShardError(
            f"{name}: document indices must run from 0 to the sequence count {sequence_count}, "
            f"got first and last {ends}"
        )
    if np.any(np.diff(document_indices) < 0):
        bad = int(np.argmax(np.diff(document_indices) < 0)) + 1
        raise ShardError(f"{name}: document index {bad} ({document_indices[bad]}) decreases")
    return Index(dtype, lengths, pointers, document_indices)


class ShardWriter:
    """Streams documents into `<prefix>.bin` and writes `<prefix>.idx` on close.

    Memory stays bounded: tokens go through a fixed-size write buffer to a temp file, and
    only one int32 length per document is kept. Both files appear under their final names
    at close (the `.idx` last, so a visible `.idx` means a complete shard); if the `with`
    block raises, nothing is left behind.
    """

    def __init__(self, path_prefix: str | os.PathLike, dtype: np.dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._code = _dtype_code(self.dtype)
        self._limits = np.iinfo(self.dtype)
        prefix = os.fspath(path_prefix)
        self.bin_path = Path(prefix + ".bin")
        self.idx_path = Path(prefix + ".idx")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._bin_tmp = self._temp_file(self.bin_path)
        self._bin = io.BufferedWriter(io.FileIO(fd, "w"), buffer_size=WRITE_BUFFER_BYTES)
        self._idx_tmp: Path | None = None  # made at close
        self._lengths = array("i")  # int32 per document, as the index stores them
        self._tokens = 0
        self._closed = False

    @staticmethod
    def _temp_file(final: Path) -> tuple[int, Path]:
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        return fd, Path(tmp)

    @property
    def documents(self) -> int:
        return len(self._lengths)

    @property
    def tokens(self) -> int:
        return self._tokens

    def add_document(self, tokens) -> None:
        """Append one document (any sequence of ints); it becomes one sequence of the shard."""
        if self._closed:
            raise ValueError(f"{self.bin_path}: add_document after close")
        where = f"{self.bin_path}: document {self.documents}"
        values = np.asarray(tokens)
        if values.ndim != 1:
            raise ValueError(f"{where}: tokens must be one-dimensional, got shape {values.shape}")
        if values.size and values.dtype.kind not in "iu":
            raise ValueError(f"{where}: tokens must be integers, got {values.dtype}")
        if values.size >= 2**31:
            raise ValueError(f"{where}: {values.size} tokens exceed the int32 length field")
        if values.size:
            low, high = values.min(), values.max()
            if low < self._limits.min or high > self._limits.max:
                bad = low if low < self._limits.min else high
                position = int(np.argmax(values == bad))
                raise ValueError(
                    f"{where}: token {bad} at position {position} is outside the range of "
                    f"{self.dtype} [{self._limits.min}, {self._limits.max}]"
                )
        # A document larger than the buffer is written straight through, not copied into it.
        self._bin.write(np.ascontiguousarray(values, dtype=self.dtype).data)
        self._lengths.append(values.size)
        self._tokens += values.size

    def close(self) -> None:
        """Finish the `.bin`, write the `.idx`, and move both to their final names."""
        if self._closed:
            return
        self._closed = True
        try:
            self._bin.close()
            self._write_index()
            # An old .idx must not sit beside the new .bin, even for a moment.
            self.idx_path.unlink(missing_ok=True)
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, self.idx_path)
        except BaseException:
            self._remove_files()
            if not self.idx_path.exists():  # a .bin without its .idx is not a shard
                self.bin_path.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        """Discard everything written so far."""
        self._closed = True
        self._remove_files()

    def _write_index(self) -> None:
        count = len(self._lengths)
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if count else np.zeros(0, np.int32)
        pointers = np.zeros(count, dtype="<i8")
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        fd, self._idx_tmp = self._temp_file(self.idx_path)
        with open(fd, "wb") as f:
            f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, self._code, count, count + 1))
            f.write(lengths.astype("<i4", copy=False).tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(count + 1, dtype="<i8").tobytes())

    def _remove_files(self) -> None:
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if path is not None:
                path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class IndexedShard:
    """A local shard; the `.bin` is memory-mapped, so reads return read-only views."""

    def __init__(self, path_prefix: str | os.PathLike):
        prefix = os.fspath(path_prefix)
        idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
        self.name = str(bin_path)
        try:
            self.index = read_index(idx_path.read_bytes(), str(idx_path))
            size = bin_path.stat().st_size
        except FileNotFoundError as e:
            raise ShardError(f"{e.filename}: missing shard file") from None
        self.index.check_data_size(size, str(bin_path))
        # numpy cannot map an empty file; a shard of empty documents has no bytes to map.
        self._data = (
            np.memmap(bin_path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return len(self.index.sequence_lengths)

    @property
    def dtype(self) -> np.dtype:
        return self.index.dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        return self.index.sequence_pointers

    @property
    def num_tokens(self) -> int:
        return self.index.num_tokens

    def document(self, i: int) -> np.ndarray:
        """The tokens of document (sequence) `i`; negative indices count from the end."""
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: document {i} out of range for {len(self)} documents")
        start = int(self.index.sequence_pointers[i]) // self.dtype.itemsize
        return self._read(start, int(self.index.sequence_lengths[i]))

    def tokens(self, start: int, length: int) -> np.ndarray:
        """`length` tokens from token offset `start` of the whole shard, across documents."""
        start, length = operator.index(start), operator.index(length)
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"{self.name}: token range [{start}, {start + length}) "
                f"outside [0, {self.num_tokens})"
            )
        return self._read(start, length)

    def _read(self, start: int, length: int) -> np.ndarray:
        return np.asarray(self._data[start : start + length])

"""Token shards: round trips, Megatron-Core compatibility, remote reads, corrupt input."""

from __future__ import annotations

import struct
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from storage.shards import (
    WRITE_BUFFER_BYTES,
    IndexedShard,
    ShardError,
    ShardWriter,
    read_index,
    token_dtype,
)


def random_documents(dtype: np.dtype, seed: int = 0) -> list[np.ndarray]:
    """Mixed sizes: empty ones, short ones, and one larger than the writer's buffer."""
    rng = np.random.default_rng(seed)
    high = 32000 if dtype == np.uint16 else 2**31 - 1
    sizes = [0, 1, 7, 0, 513, 1, 0] + list(rng.integers(0, 3000, size=40))
    sizes.append(WRITE_BUFFER_BYTES // np.dtype(dtype).itemsize + 12345)
    sizes.append(0)
    return [rng.integers(0, high, size=n, dtype=np.int64) for n in rng.permutation(sizes)]


def write_shard(prefix: Path, documents: list, dtype: np.dtype) -> Path:
    with ShardWriter(prefix, dtype) as writer:
        for tokens in documents:
            writer.add_document(tokens)
    return prefix


@pytest.fixture(params=["uint16", "int32"])
def shard(request, tmp_path) -> tuple[Path, list[np.ndarray], np.dtype]:
    dtype = np.dtype(request.param)
    documents = random_documents(dtype)
    return write_shard(tmp_path / "shard", documents, dtype), documents, dtype


def test_token_dtype_follows_megatron_rule():
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(128256) == np.int32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_round_trip(shard):
    prefix, documents, dtype = shard
    reader = IndexedShard(prefix)
    total = sum(len(d) for d in documents)
    assert len(reader) == len(documents)
    assert reader.dtype == dtype
    assert reader.num_tokens == total
    assert Path(f"{prefix}.bin").stat().st_size == total * dtype.itemsize
    assert reader.sequence_lengths.tolist() == [len(d) for d in documents]
    assert reader.sequence_pointers[0] == 0
    for i, tokens in enumerate(documents):
        got = reader.document(i)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, tokens)
    np.testing.assert_array_equal(reader.document(-1), documents[-1])
    with pytest.raises(IndexError, match="shard.bin"):
        reader.document(len(documents))


def test_writer_counts_and_accepts_lists_and_arrays(tmp_path):
    with ShardWriter(tmp_path / "s", np.uint16) as writer:
        writer.add_document([1, 2, 3])
        writer.add_document([])
        writer.add_document(np.array([65535, 0], dtype=np.uint64))
        writer.add_document(range(10))
        assert (writer.documents, writer.tokens) == (4, 15)
    reader = IndexedShard(tmp_path / "s")
    documents = [reader.document(i).tolist() for i in range(4)]
    assert documents == [[1, 2, 3], [], [65535, 0], list(range(10))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]


def test_token_ranges_cross_document_boundaries(shard):
    prefix, documents, _ = shard
    reader = IndexedShard(prefix)
    flat = np.concatenate(documents)
    ends = np.cumsum([len(d) for d in documents])
    rng = np.random.default_rng(1)
    ranges = [(0, len(flat)), (0, 0), (len(flat), 0), (int(ends[3]) - 2, 9)]
    ranges += [(int(s), int(rng.integers(0, 5000))) for s in rng.integers(0, len(flat) - 5000, 20)]
    for start, length in ranges:
        np.testing.assert_array_equal(reader.tokens(start, length), flat[start : start + length])
    for start, length in [(-1, 2), (len(flat) - 1, 2), (0, -1)]:
        with pytest.raises(IndexError, match="token range"):
            reader.tokens(start, length)


def test_megatron_core_loads_our_shard(shard):
    prefix, documents, dtype = shard
    # Megatron imports torch and warns that Transformer Engine/Apex are missing: harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == len(documents)
    assert dataset.index.dtype == dtype
    assert dataset.sequence_lengths.tolist() == [len(d) for d in documents]
    assert dataset.document_indices.tolist() == list(range(len(documents) + 1))
    for i, tokens in enumerate(documents):
        np.testing.assert_array_equal(dataset[i], tokens)
    # Megatron's partial read (offset, length) inside one sequence.
    big = max(range(len(documents)), key=lambda i: len(documents[i]))
    np.testing.assert_array_equal(dataset.get(big, offset=100, length=50), documents[big][100:150])


def _error(make: Callable[[], object]) -> str:
    with pytest.raises(ShardError) as info:
        make()
    return str(info.value)


def _set(offset: int, fmt: str, value: int) -> Callable[[bytearray], bytes]:
    def edit(idx: bytearray) -> bytes:
        struct.pack_into(fmt, idx, offset, value)
        return bytes(idx)

    return edit


# Edits of the .idx of a 3-document uint16 shard: (edit, file the error names, what it says).
_LENGTHS = 34  # after the header: 3 int32 lengths, 3 int64 pointers, 4 int64 document indices
_POINTERS = _LENGTHS + 3 * 4
_DOC_INDICES = _POINTERS + 3 * 8
CORRUPT_INDEX = {
    "wrong magic": (lambda idx: b"MMIDIDY\x00\x00" + bytes(idx[9:]), "idx", "not a Megatron index"),
    "wrong version": (_set(9, "<Q", 2), "idx", "unsupported index version 2"),
    "unknown dtype code": (_set(17, "<B", 9), "idx", "dtype code 9"),
    "float dtype code": (_set(17, "<B", 7), "idx", "dtype code 7"),
    "truncated header": (lambda idx: bytes(idx[:20]), "idx", "truncated index: 20 bytes"),
    "truncated arrays": (lambda idx: bytes(idx[:-5]), "idx", "index: 97 bytes, but 3 sequences"),
    "count larger than data": (_set(18, "<Q", 4), "idx", "4 document indices need 114"),
    "trailing bytes": (lambda idx: bytes(idx) + b"\x00" * 3, "idx", "trailing bytes"),
    "negative length": (_set(_LENGTHS + 4, "<i", -1), "idx", "sequence 1 has negative length -1"),
    "pointer off": (_set(_POINTERS + 8, "<q", 3), "idx", "sequence 1 points at byte 3, but"),
    "lengths disagree with bin": (_set(_LENGTHS + 8, "<i", 5), "bin", "data file is 18 bytes"),
    "doc indices end early": (_set(_DOC_INDICES + 24, "<q", 2), "idx", "first and last [0, 2]"),
    "doc indices start late": (_set(_DOC_INDICES, "<q", 1), "idx", "first and last [1, 3]"),
    "doc indices decrease": (_set(_DOC_INDICES + 16, "<q", 0), "idx", "index 2 (0) decreases"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_INDEX))
def test_corrupt_index_raises_shard_error_naming_the_file(tmp_path, case):
    prefix = write_shard(tmp_path / "corrupt", [[5, 6], [7, 8, 9], [10, 11, 12, 13]], np.uint16)
    idx_path = Path(f"{prefix}.idx")
    edit, named_file, says = CORRUPT_INDEX[case]
    idx_path.write_bytes(edit(bytearray(idx_path.read_bytes())))
    message = _error(lambda: IndexedShard(prefix))
    assert message.startswith(f"{prefix}.{named_file}: "), message
    assert says in message, message
    if named_file == "idx":  # the remote reader runs the same validation on the fetched bytes
        assert _error(lambda: read_index(idx_path.read_bytes(), "s3://b/x.idx")) == message.replace(
            str(idx_path), "s3://b/x.idx"
        )


def test_bin_size_disagreeing_with_index(tmp_path):
    prefix = write_shard(tmp_path / "s", [[1, 2], [3]], np.int32)
    bin_path = Path(f"{prefix}.bin")
    bin_path.write_bytes(bin_path.read_bytes() + b"\x00\x00")
    with pytest.raises(ShardError, match=rf"{bin_path}: data file is 14 bytes .* 12 bytes"):
        IndexedShard(prefix)


def test_missing_files(tmp_path):
    prefix = write_shard(tmp_path / "s", [[1]], np.uint16)
    Path(f"{prefix}.bin").unlink()
    with pytest.raises(ShardError, match=r"s\.bin: missing shard file"):
        IndexedShard(prefix)
    with pytest.raises(ShardError, match=r"nothing\.idx: missing shard file"):
        IndexedShard(tmp_path / "nothing")


def test_empty_shard_round_trips(tmp_path):
    with ShardWriter(tmp_path / "none", np.uint16):
        pass
    reader = IndexedShard(tmp_path / "none")
    assert (len(reader), reader.num_tokens) == (0, 0)
    assert reader.tokens(0, 0).size == 0
    write_shard(tmp_path / "blank", [[], [], []], np.uint16)
    reader = IndexedShard(tmp_path / "blank")
    assert len(reader) == 3 and reader.document(1).size == 0


def test_failure_inside_with_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "s", np.uint16) as writer:
            writer.add_document(np.arange(WRITE_BUFFER_BYTES, dtype=np.int64) % 1000)
            assert list(tmp_path.iterdir())  # the temp files exist while writing
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writing_over_an_existing_shard_replaces_it(tmp_path):
    write_shard(tmp_path / "s", [[1, 2, 3]], np.uint16)
    write_shard(tmp_path / "s", [[4], [5, 6]], np.uint16)
    reader = IndexedShard(tmp_path / "s")
    assert [reader.document(i).tolist() for i in range(len(reader))] == [[4], [5, 6]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]


@pytest.mark.parametrize(
    "dtype, bad, shown",
    [
        (np.uint16, 65536, "token 65536 at position 1"),
        (np.uint16, -1, "token -1 at position 1"),
        (np.int32, 2**31, "token 2147483648 at position 1"),
    ],
)
def test_out_of_range_token_names_the_document(tmp_path, dtype, bad, shown):
    with pytest.raises(ValueError, match=rf"s\.bin: document 2: {shown} is outside the range"):
        with ShardWriter(tmp_path / "s", dtype) as writer:
            writer.add_document([1, 2])
            writer.add_document([])
            writer.add_document([3, bad, 4])
    assert list(tmp_path.iterdir()) == []


def test_rejected_document_leaves_writer_consistent(tmp_path):
    with ShardWriter(tmp_path / "s", np.uint16) as writer:
        writer.add_document([1])
        for bad in ([70000], [1.5, 2.0], [[1, 2]]):
            with pytest.raises(ValueError, match="document 1"):
                writer.add_document(bad)
        writer.add_document([2])
    reader = IndexedShard(tmp_path / "s")
    assert [reader.document(i).tolist() for i in range(len(reader))] == [[1], [2]]


def test_writer_memory_is_bounded(tmp_path):
    """10M tokens (20 MB of uint16) through the writer hold only its buffer and lengths."""
    document = np.arange(10_000, dtype=np.int64) % 32000  # reused: inputs cost nothing new
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        with ShardWriter(tmp_path / "big", np.uint16) as writer:  # its buffer counts too
            for _ in range(1000):
                writer.add_document(document)
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert writer.tokens == 10_000_000
    assert Path(tmp_path / "big.bin").stat().st_size == 20_000_000
    # Buffer + one converted document + 4 bytes per document length, far below 20 MB.
    assert peak - baseline < WRITE_BUFFER_BYTES + 2 * document.nbytes + 1000 * 4 + (64 << 10)

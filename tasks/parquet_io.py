"""Parquet tables on a store: read whole objects, write them atomically (zstd).

A shuffle step writes one *partitioned* object per map task (`write_partitions`): a header of
offsets, then one parquet table per partition, as Spark writes one shuffle file per map task
with its index. A reduce task reads its partition of every map task's object with two range
reads each (`read_partition_of_each`), so a step writes map-tasks objects, not
map-tasks x partitions; a reduce task that handles consecutive partitions reads them all
with two range reads per object (`read_partition_span`).
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.manifest import ObjectInfo, upload
from storage.store import Store

PARTITIONS_MAGIC = b"TLPARTS1"
_ENTRY = struct.Struct("<QQ")  # (partition count, offset): each read checks the count
READ_THREADS = 16  # range reads in flight in one reduce task


def read_table(store: Store, key: str, columns: list[str] | None = None) -> pa.Table:
    if (path := store.local_path(key)) is not None:
        return pq.read_table(path, columns=columns)
    return pq.read_table(pa.BufferReader(store.get_bytes(key)), columns=columns)


def write_table(store: Store, key: str, table: pa.Table) -> ObjectInfo:
    """Write a table (zstd) through a local temp file, so the store's put is one atomic object."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.parquet"
        pq.write_table(table, path, compression="zstd")
        return upload(store, key, path)


def write_partitions(store: Store, key: str, tables: Iterable[pa.Table], count: int | None = None) -> ObjectInfo:
    """Tables as one object: magic, then count + 1 entries (partition count, absolute offset) as
    little-endian uint64, then each non-empty table as parquet (zstd); an empty partition has
    no bytes. `tables` may be a generator of `count` tables, each built and freed in turn."""
    if count is None:
        tables = list(tables)
        count = len(tables)
    header = len(PARTITIONS_MAGIC) + _ENTRY.size * (count + 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "partitions"
        with open(path, "wb") as out:
            out.seek(header)
            offsets = [header]
            for table in tables:
                if table.num_rows:
                    pq.write_table(table, out, compression="zstd")
                offsets.append(out.tell())
            if len(offsets) != count + 1:
                raise ValueError(f"{store.url(key)}: {len(offsets) - 1} partitions written, {count} declared")
            out.seek(0)
            out.write(PARTITIONS_MAGIC + b"".join(_ENTRY.pack(count, offset) for offset in offsets))
        return upload(store, key, path)


def read_partition_span(store: Store, key: str, first: int, stop: int) -> tuple[bytes, list[int]]:
    """Partitions [first, stop) of an object `write_partitions` wrote, in two range reads however
    many they are: their bytes, and stop - first + 1 offsets into them (partition i is
    data[offsets[i - first]:offsets[i - first + 1]], for `parse_partition`)."""
    offsets = partition_offsets(store, key, first, stop)
    data = store.get_range(key, offsets[0], offsets[-1] - offsets[0]) if offsets[-1] > offsets[0] else b""
    return data, [offset - offsets[0] for offset in offsets]


def partition_offsets(store: Store, key: str, first: int, stop: int) -> list[int]:
    """Where partitions [first, stop) of an object `write_partitions` wrote begin, and where the
    last ends: stop - first + 1 absolute offsets, in one range read."""
    name = f"partition {first}" if stop == first + 1 else f"partitions {first}..{stop - 1}"
    if not 0 <= first < stop:
        raise ValueError(f"{store.url(key)}: no {name}")
    entries = stop - first + 1
    span = store.get_range(key, len(PARTITIONS_MAGIC) + _ENTRY.size * first, entries * _ENTRY.size)
    header = [_ENTRY.unpack_from(span, i * _ENTRY.size) for i in range(len(span) // _ENTRY.size)]
    counts = {count for count, _ in header}
    offsets = [offset for _, offset in header]
    if len(header) != entries or len(counts) != 1 or stop > counts.pop() or offsets != sorted(offsets):
        raise ValueError(f"{store.url(key)}: no {name} (not a partitioned object, or fewer partitions)")
    return offsets


def parse_partition(data: bytes, schema: pa.Schema, where: str) -> pa.Table:
    """One partition's bytes (empty: no rows) as a table; `where` names it in an error."""
    if not data:
        return schema.empty_table()
    try:
        return pq.read_table(pa.BufferReader(data), schema=schema)
    except pa.ArrowException as err:
        raise ValueError(f"{where} is not a parquet table: {err}") from None


def read_partition(store: Store, key: str, partition: int, schema: pa.Schema) -> pa.Table:
    """One partition of an object `write_partitions` wrote: two range reads."""
    data, _ = read_partition_span(store, key, partition, partition + 1)
    return parse_partition(data, schema, f"{store.url(key)}: partition {partition}")


def read_partition_of_each(store: Store, keys: Sequence[str], partition: int, schema: pa.Schema) -> list[pa.Table]:
    """Partition `partition` of each of `keys`, in their order, READ_THREADS range reads at a time."""
    with ThreadPoolExecutor(min(READ_THREADS, max(len(keys), 1))) as pool:
        return list(pool.map(lambda key: read_partition(store, key, partition, schema), keys))

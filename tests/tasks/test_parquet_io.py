"""Partitioned `.parts` objects: one map task's shuffle output, read a partition at a time."""

from __future__ import annotations

import pyarrow as pa
import pytest

from storage.store import Store
from tasks.parquet_io import read_partition, read_partition_of_each, write_partitions

SCHEMA = pa.schema([("id", pa.int64()), ("value", pa.uint32())])


def _table(ids: list[int]) -> pa.Table:
    return pa.table([pa.array(ids, pa.int64()), pa.array([i % 7 for i in ids], pa.uint32())], schema=SCHEMA)


def test_each_partition_reads_back_alone_including_empty_ones(store: Store):
    tables = [_table([1, 2, 3]), SCHEMA.empty_table(), _table(list(range(10, 1000))), SCHEMA.empty_table()]
    info = write_partitions(store, "shuffle/b000000.parts", tables)
    assert store.size("shuffle/b000000.parts") == info.size
    for index, table in enumerate(tables):
        assert read_partition(store, "shuffle/b000000.parts", index, SCHEMA).equals(table)
    write_partitions(store, "shuffle/b000001.parts", [_table([4]), _table([]), _table([5, 6]), _table([7])])
    keys = ["shuffle/b000000.parts", "shuffle/b000001.parts"]
    assert [t.column("id").to_pylist() for t in read_partition_of_each(store, keys, 2, SCHEMA)] == [list(range(10, 1000)), [5, 6]]


def test_same_tables_give_the_same_bytes(store: Store):
    tables = [_table([1, 2]), _table([3])]
    first = write_partitions(store, "a.parts", tables)
    second = write_partitions(store, "b.parts", [t.slice(0) for t in tables])
    assert first.sha256 == second.sha256


def test_a_missing_partition_or_a_foreign_object_is_a_clear_error(store: Store):
    write_partitions(store, "x.parts", [_table([1]), _table([2])])
    with pytest.raises(ValueError, match=r"x\.parts: no partition 2 "):
        read_partition(store, "x.parts", 2, SCHEMA)
    with pytest.raises(ValueError, match=r"x\.parts: no partition 100000 "):
        read_partition(store, "x.parts", 100_000, SCHEMA)
    store.put_bytes("plain.parquet", b"PAR1" + bytes(200))
    with pytest.raises(ValueError, match=r"plain\.parquet: no partition 0 "):
        read_partition(store, "plain.parquet", 0, SCHEMA)


def test_a_partition_costs_two_range_reads_on_s3(s3_bucket_uri):
    from storage.store import open_store
    from tests.builds import RequestCounter

    store = open_store(f"{s3_bucket_uri}/parts-requests")
    write_partitions(store, "m.parts", [_table(list(range(p, p + 50))) for p in range(300)])
    counter = RequestCounter()
    counter.take()
    assert read_partition(store, "m.parts", 217, SCHEMA).column("id").to_pylist() == list(range(217, 267))
    assert counter.take() == {"GetObject": 2}


def test_a_generator_of_tables_writes_the_same_object_and_its_count_is_checked(store: Store):
    tables = [_table([1, 2]), SCHEMA.empty_table(), _table([3])]
    listed = write_partitions(store, "listed.parts", tables)
    generated = write_partitions(store, "generated.parts", (t for t in tables), count=3)
    assert listed.sha256 == generated.sha256
    with pytest.raises(ValueError, match=r"short\.parts: 2 partitions written, 3 declared"):
        write_partitions(store, "short.parts", iter(tables[:2]), count=3)
    assert not store.exists("short.parts")

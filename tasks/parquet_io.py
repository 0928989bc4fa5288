"""Parquet tables on a store: read whole objects, write them atomically (zstd)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.manifest import ObjectInfo, upload
from storage.store import Store


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

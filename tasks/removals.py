"""The documents the dedup stages removed, as (id, kept_id) files per block of plan files.

A range task of exact or near dedup writes the pairs it found into one file per block of
consecutive plan files (storage.build_layout.removed_block); a reader of one docs shard takes
its slice of its block's files. An id's high bits are its plan file, so the slice is a range
of the sorted ids.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from storage import build_layout as layout
from storage.manifest import ObjectInfo
from storage.store import Store, join_key
from tasks.parquet_io import read_table, write_table
from tasks.plan import PlannedFile, document_id, ordinal_of

REMOVED_SCHEMA = pa.schema([("id", pa.int64()), ("kept_id", pa.int64())])
RemovedFolder = Callable[[int], str]  # block -> folder: layout.exact_removed or layout.near_removed


def write_removed(store: Store, folder_of: RemovedFolder, name: str, removed: np.ndarray, kept: np.ndarray) -> list[ObjectInfo]:
    """The pairs sorted by removed id, one file `<folder_of(block)><name>.parquet` per block they fall in."""
    order = np.argsort(removed, kind="stable")
    removed, kept = removed[order], kept[order]
    blocks, starts = np.unique(layout.removed_block(ordinal_of(removed)), return_index=True)
    ends = np.append(starts[1:], len(removed))
    return [
        write_table(store, join_key(folder_of(int(block)), f"{name}.parquet"), pa.table([removed[a:b], kept[a:b]], schema=REMOVED_SCHEMA))
        for block, a, b in zip(blocks.tolist(), starts.tolist(), ends.tolist())
    ]


def removed_pairs(store: Store, folder_of: RemovedFolder, file: PlannedFile) -> tuple[np.ndarray, np.ndarray]:
    """(removed ids, kept ids) of one plan file, sorted by removed id (empty when none)."""
    ids, kept = [], []
    low, high = document_id(file.ordinal, 0), document_id(file.ordinal + 1, 0)
    for key in store.list(folder_of(layout.removed_block(file.ordinal))):
        table = read_table(store, key)
        block_ids = table.column("id").to_numpy()
        a, b = np.searchsorted(block_ids, (low, high))
        ids.append(block_ids[a:b])
        kept.append(table.column("kept_id").to_numpy()[a:b])
    if not ids:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    ids, kept = np.concatenate(ids), np.concatenate(kept)
    order = np.argsort(ids, kind="stable")
    return ids[order], kept[order]


def deduplicated_ids(store: Store, file: PlannedFile) -> np.ndarray:
    """Sorted unique ids of one plan file removed by exact or near dedup (empty when neither ran)."""
    exact, _ = removed_pairs(store, layout.exact_removed, file)
    near, _ = removed_pairs(store, layout.near_removed, file)
    return np.union1d(exact, near)

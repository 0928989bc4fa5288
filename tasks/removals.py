"""The documents the dedup stages removed, as (id, kept_id) pairs per block of plan files.

A range task of exact or near dedup writes the pairs it found into one file per block of
consecutive plan files (storage.build_layout.removed_block). Then one merge task per block
joins its files into one object, sorted by removed id, with a partition per plan file of the
block (`merge_stage`); a reader of one docs shard reads its partition: two range reads, however
many range tasks wrote the block. A block without a merged object belongs to a build whose
dedup of that kind did not run (the flow runs the readers only after the dedup stages
completed, and their receipts vouch for every block's object).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pyarrow as pa

from storage import build_layout as layout
from storage.manifest import ObjectInfo, ShardResult
from storage.store import ObjectNotFound, Store, join_key
from tasks.parquet_io import READ_THREADS, read_partition, read_table, write_partitions, write_table
from tasks.partitioning import rows_by_partition
from tasks.plan import PlannedFile, ordinal_of
from tasks.stage import Stage
from tasks.stage_counts import MergedCounts

REMOVED_SCHEMA = pa.schema([("id", pa.int64()), ("kept_id", pa.int64())])
RemovedFolder = Callable[[int], str]  # block -> folder: layout.exact_removed or layout.near_removed
MergedKey = Callable[[int], str]  # block -> its merged object: layout.exact_merged or layout.near_merged


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


def merge_block(store: Store, folder_of: RemovedFolder, merged_of: MergedKey, block: int) -> ShardResult:
    """Every file of one block as one object sorted by removed id, a partition per plan file of
    the block (empty ones too, so every block of the plan has its object)."""
    keys = sorted(store.list(folder_of(block)))
    with ThreadPoolExecutor(min(READ_THREADS, max(len(keys), 1))) as pool:
        tables = list(pool.map(lambda key: read_table(store, key).cast(REMOVED_SCHEMA), keys))
    for key, table in zip(keys, tables):
        outside = layout.removed_block(ordinal_of(table.column("id").to_numpy())) != block
        if np.any(outside):
            raise ValueError(f"{store.url(key)}: removed id {table.column('id')[int(np.argmax(outside))]} is not in block {block}")
    table = pa.concat_tables(tables) if tables else REMOVED_SCHEMA.empty_table()
    ids, kept = table.column("id").to_numpy(), table.column("kept_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    ids, kept = ids[order], kept[order]
    rows = rows_by_partition(layout.removed_block_partition(ordinal_of(ids)), layout.REMOVED_BLOCK_FILES)
    info = write_partitions(store, merged_of(block), [pa.table([ids[r], kept[r]], schema=REMOVED_SCHEMA) for r in rows])
    return ShardResult(outputs=[info], counts=MergedCounts(removed=len(ids), files=len(keys)))


def merge_stage(name: str, store: Store, folder_of: RemovedFolder, merged_of: MergedKey, merged_prefix: str, plan_files: int) -> Stage:
    """One merge task per block of the plan's files."""
    blocks = list(range(layout.removed_blocks(plan_files)))
    return Stage(name, blocks, layout.removed_block_name, partial(merge_block, store, folder_of, merged_of), (merged_prefix,))


def removed_pairs(store: Store, merged_of: MergedKey, file: PlannedFile) -> tuple[np.ndarray, np.ndarray]:
    """(removed ids, kept ids) of one plan file, sorted by removed id: its partition of its block's merged object."""
    key = merged_of(layout.removed_block(file.ordinal))
    table = read_partition(store, key, layout.removed_block_partition(file.ordinal), REMOVED_SCHEMA)
    return table.column("id").to_numpy(), table.column("kept_id").to_numpy()


def deduplicated_ids(store: Store, file: PlannedFile) -> np.ndarray:
    """Sorted unique ids of one plan file removed by exact or near dedup (empty for a dedup that did not run)."""
    found = []
    for merged_of in (layout.exact_merged, layout.near_merged):
        try:
            found.append(removed_pairs(store, merged_of, file)[0])
        except ObjectNotFound:
            continue
    return np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)

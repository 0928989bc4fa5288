"""The documents the dedup stages removed, as (id, kept_id) pairs per block of plan files.

Duplicates fall anywhere in plan order, so every range task of exact or near dedup finds removed
ids in nearly every block of consecutive plan files (storage.build_layout.removed_block). The
pairs are therefore a shuffle (tasks.shuffle.MergedShuffle) from range tasks to blocks: a range
task writes one object with a partition per block (`write_removed`), merge levels run between,
and one merge task per block reads its partition of at most MERGE_FAN_IN objects and writes it as
one object sorted by removed id, with a partition per plan file of the block (`merge_stage`); a
reader of one docs shard reads its partition: two range reads, however many range tasks there
were. A block without a merged object belongs to a build whose dedup of that kind did not run
(the flow runs the readers only after the dedup stages completed, and their receipts vouch for
every block's object).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import pyarrow as pa

from storage import build_layout as layout
from storage.manifest import ObjectInfo, ShardResult
from storage.store import ObjectNotFound, Store
from tasks.parquet_io import read_partition, read_partition_of_each, write_partitions
from tasks.partitioning import rows_by_partition
from tasks.plan import PlannedFile, ordinal_of
from tasks.shuffle import MergedShuffle, merged_shuffle
from tasks.stage import Stage
from tasks.stage_counts import MergedCounts

REMOVED_SCHEMA = pa.schema([("id", pa.int64()), ("kept_id", pa.int64())])
MergedKey = Callable[[int], str]  # block -> its merged object: layout.exact_merged or layout.near_merged


def exact_removed_ids(ranges: int, plan_files: int) -> MergedShuffle:
    """Exact dedup's pairs, from each hash range to the blocks of plan files: steps `exact-runs-removed-lNN`."""
    runs, blocks = partial(layout.exact_runs, "removed"), layout.removed_blocks(plan_files)
    return merged_shuffle("exact-runs-removed", runs, layout.exact_removed, REMOVED_SCHEMA, ranges, blocks)


def near_removed_ids(vertex_partitions: int, plan_files: int) -> MergedShuffle:
    """Near dedup's pairs, from each vertex partition to the blocks of plan files: steps `near-runs-removed-lNN`."""
    runs, blocks = partial(layout.near_runs, "removed"), layout.removed_blocks(plan_files)
    return merged_shuffle("near-runs-removed", runs, layout.near_removed, REMOVED_SCHEMA, vertex_partitions, blocks)


def write_removed(store: Store, removed_ids: MergedShuffle, task: int, removed: np.ndarray, kept: np.ndarray) -> ObjectInfo:
    """One range task's pairs as its map object of the `removed_ids` shuffle: a partition per
    block of plan files, each sorted by removed id."""
    order = np.argsort(removed, kind="stable")
    removed, kept = removed[order], kept[order]
    blocks = layout.removed_block(ordinal_of(removed))  # sorted, as the ids are
    key = removed_ids.map_key(task)
    if len(blocks) and blocks[-1] >= removed_ids.partitions:
        past = f"is in block {blocks[-1]}, past the plan's {removed_ids.partitions} blocks"
        raise ValueError(f"{store.url(key)}: removed id {removed[-1]} {past}")
    bounds = np.searchsorted(blocks, np.arange(removed_ids.partitions + 1)).tolist()
    tables = (pa.table([removed[a:b], kept[a:b]], schema=REMOVED_SCHEMA) for a, b in zip(bounds[:-1], bounds[1:]))
    return write_partitions(store, key, tables, removed_ids.partitions)


def merge_block(store: Store, removed_ids: MergedShuffle, merged_of: MergedKey, block: int) -> ShardResult:
    """One block's pairs from every range task as one object sorted by removed id, a partition
    per plan file of the block (empty ones too, so every block of the plan has its object)."""
    keys, partition = removed_ids.sources(block)  # at most MERGE_FAN_IN objects, in range order
    tables = read_partition_of_each(store, keys, partition, REMOVED_SCHEMA)
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
    return ShardResult(outputs=[info], counts=MergedCounts(removed=len(ids), sources=len(keys)))


def merge_stage(name: str, store: Store, removed_ids: MergedShuffle, merged_of: MergedKey, merged_prefix: str) -> Stage:
    """One merge task per block of the plan's files, after `removed_ids.stages`."""
    blocks = list(range(removed_ids.partitions))
    return Stage(name, blocks, layout.removed_block_name, partial(merge_block, store, removed_ids, merged_of), (merged_prefix,))


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

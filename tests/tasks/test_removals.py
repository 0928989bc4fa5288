"""Removed ids: a shuffle from range tasks to blocks of plan files, merged once per block, read per docs shard."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from storage import build_layout as layout
from storage.store import Store, open_store
from tasks.fanout import run_stage
from tasks.parquet_io import write_partitions
from tasks.plan import PlannedFile, document_id
from tasks.removals import (
    REMOVED_SCHEMA, deduplicated_ids, exact_removed_ids, merge_block, merge_stage, near_removed_ids, removed_pairs, write_removed,
)
from tasks.shuffle import MergedShuffle
from tests.builds import RequestCounter

PLAN_FILES = 150  # three blocks, the last one partly filled


def plan_files() -> list[PlannedFile]:
    return [PlannedFile(source="web", uri=f"mem://{k}", size=0, ordinal=k) for k in range(PLAN_FILES)]


def write_ranges(store: Store, removed_ids: MergedShuffle, seed: int) -> dict[int, int]:
    """Removed ids spread over the plan files, each found by one of the shuffle's range tasks, as
    a dedup stage writes them; returns removed id -> kept id."""
    rng = np.random.default_rng(seed)
    ordinals = rng.integers(0, PLAN_FILES - 7, 3000)  # the last files have none
    removed = np.unique([document_id(int(o), int(r)) for o, r in zip(ordinals, rng.integers(0, 500, len(ordinals)))])
    kept = removed - 1
    range_of = rng.integers(0, removed_ids.maps, len(removed))
    for r in range(removed_ids.maps):
        found = rng.permutation(np.flatnonzero(range_of == r))  # in no particular order
        write_removed(store, removed_ids, r, removed[found], kept[found])
    return dict(zip(removed.tolist(), kept.tolist()))


def test_merged_blocks_hold_every_pair_of_every_range_whatever_the_merge_levels(tmp_path):
    """Through two merge levels (fan-in 2) or none (fan-in 16) the merged objects are the same
    bytes: each block's pairs from every range, sorted by removed id, a partition per plan file."""
    merged = {}
    for fan_in in (2, 16):
        store = open_store(tmp_path / f"fan-in-{fan_in}")
        removed_ids = replace(exact_removed_ids(7, PLAN_FILES), fan_in=fan_in)
        assert removed_ids.levels == (2 if fan_in == 2 else 0)
        expected = write_ranges(store, removed_ids, seed=1)
        for stage in [*removed_ids.stages(store), merge_stage("exact-merge", store, removed_ids, layout.exact_merged, layout.EXACT_MERGED)]:
            run_stage(store, stage, inline=True)
        found = {}
        for file in plan_files():
            ids, kept = removed_pairs(store, layout.exact_merged, file)
            assert ids.tolist() == sorted(ids.tolist()) and all(i >> 32 == file.ordinal for i in ids.tolist())
            found.update(zip(ids.tolist(), kept.tolist()))
            assert deduplicated_ids(store, file).tolist() == ids.tolist()  # near dedup did not run
        assert found == expected
        merged[fan_in] = [store.get_bytes(layout.exact_merged(block)) for block in range(layout.removed_blocks(PLAN_FILES))]
    assert len(merged[2]) == 3 and merged[2] == merged[16]


def test_merging_a_block_reads_at_most_fan_in_objects_however_many_ranges(s3_bucket_uri):
    """A block's merge task reads its partition of at most FAN_IN objects, with no listing, with 4
    or 40 range tasks (it was a listing and a GET of every range's file of its block); a docs shard
    then reads its removed ids in two requests."""
    files = plan_files()[::16]
    for ranges in (4, 40):
        store = open_store(f"{s3_bucket_uri}/removals-{ranges}")
        counter = RequestCounter()
        for removed_ids, merged_of, seed in (
            (exact_removed_ids(ranges, PLAN_FILES), layout.exact_merged, 1), (near_removed_ids(ranges, PLAN_FILES), layout.near_merged, 2),
        ):
            write_ranges(store, removed_ids, seed)
            for stage in removed_ids.stages(store):
                run_stage(store, stage, inline=True)
            for block in range(removed_ids.partitions):
                counter.take()
                merge_block(store, removed_ids, merged_of, block)
                sources = len(removed_ids.sources(block)[0])
                assert sources == (4 if ranges == 4 else 3)  # 40 ranges: one merge level of fan-in 16
                requests = counter.take()  # each source's partition offsets, then its bytes
                assert requests["GetObject"] == 2 * sources and not any("List" in op for op in requests), (ranges, block, requests)
        counter.take()
        # a partition's offsets, then its bytes (none to read for a file without removed ids)
        empty = sum(len(removed_pairs(store, layout.exact_merged, file)[0]) == 0 for file in files)
        assert counter.take() == {"GetObject": 2 * len(files) - empty}, ranges
        assert empty == 1  # plan file 144
        for file in files:
            deduplicated_ids(store, file)
        assert counter.take() == {"GetObject": 4 * len(files) - 2 * empty}, ranges


def test_an_id_outside_its_block_is_an_error(tmp_path):
    store = open_store(tmp_path)
    removed_ids = exact_removed_ids(1, PLAN_FILES)
    stray = document_id(layout.REMOVED_BLOCK_FILES, 0)  # plan file 64: block 1
    empty = REMOVED_SCHEMA.empty_table()
    write_partitions(store, layout.exact_removed(0), [pa.table([[stray], [0]], schema=REMOVED_SCHEMA), empty, empty])
    with pytest.raises(ValueError, match=r"dedup/exact/removed/p0000.parts: removed id 274877906944 is not in block 0$"):
        merge_block(store, removed_ids, layout.exact_merged, 0)


def test_an_id_past_the_plans_blocks_is_an_error(tmp_path):
    store = open_store(tmp_path)
    beyond = document_id(PLAN_FILES + layout.REMOVED_BLOCK_FILES, 0)  # block 3 of a plan of three
    with pytest.raises(ValueError, match=rf"dedup/near/removed/q0002.parts: removed id {beyond} is in block 3, past the plan's 3 blocks$"):
        write_removed(store, near_removed_ids(4, PLAN_FILES), 2, np.array([beyond]), np.array([0]))

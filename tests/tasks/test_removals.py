"""Removed ids: many range tasks' files per block, merged once per block, read per docs shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from storage import build_layout as layout
from storage.store import Store, join_key, open_store
from tasks.fanout import run_stage
from tasks.parquet_io import write_table
from tasks.plan import PlannedFile, document_id
from tasks.removals import REMOVED_SCHEMA, deduplicated_ids, merge_block, merge_stage, removed_pairs, write_removed
from tests.builds import RequestCounter

PLAN_FILES = 150  # three blocks, the last one partly filled


def plan_files() -> list[PlannedFile]:
    return [PlannedFile(source="web", uri=f"mem://{k}", size=0, ordinal=k) for k in range(PLAN_FILES)]


def write_ranges(store: Store, folder_of, ranges: int, seed: int) -> dict[int, int]:
    """Removed ids spread over the plan files, each found by one of `ranges` range tasks, as a
    dedup stage writes them; returns removed id -> kept id."""
    rng = np.random.default_rng(seed)
    ordinals = rng.integers(0, PLAN_FILES - 7, 3000)  # the last files have none
    removed = np.unique([document_id(int(o), int(r)) for o, r in zip(ordinals, rng.integers(0, 500, len(ordinals)))])
    kept = removed - 1
    range_of = rng.integers(0, ranges, len(removed))
    for r in range(ranges):
        write_removed(store, folder_of, layout.partition_name(r), removed[range_of == r], kept[range_of == r])
    return dict(zip(removed.tolist(), kept.tolist()))


def test_merged_blocks_hold_every_pair_of_every_range(tmp_path):
    store = open_store(tmp_path)
    expected = write_ranges(store, layout.exact_removed, 7, seed=1)
    stage = merge_stage("exact-merge", store, layout.exact_removed, layout.exact_merged, layout.EXACT_MERGED, PLAN_FILES)
    summary = run_stage(store, stage, inline=True)
    assert [r.shard for r in summary.receipts] == ["k000000", "k000001", "k000002"]
    assert sum(r.counts["removed"] for r in summary.receipts) == len(expected)
    found = {}
    for file in plan_files():
        ids, kept = removed_pairs(store, layout.exact_merged, file)
        assert ids.tolist() == sorted(ids.tolist()) and all(i >> 32 == file.ordinal for i in ids.tolist())
        found.update(zip(ids.tolist(), kept.tolist()))
        assert deduplicated_ids(store, file).tolist() == ids.tolist()  # near dedup did not run
    assert found == expected


def test_a_docs_shard_reads_its_removed_ids_in_two_requests_however_many_ranges(s3_bucket_uri):
    """Reading one docs shard's removed ids costs the same few requests with 4 or 40 range tasks
    (it was a listing and a GET per range file of its block)."""
    files = plan_files()[::16]
    for ranges in (4, 40):
        store = open_store(f"{s3_bucket_uri}/removals-{ranges}")
        for folder_of, merged_of, seed in ((layout.exact_removed, layout.exact_merged, 1), (layout.near_removed, layout.near_merged, 2)):
            write_ranges(store, folder_of, ranges, seed)
            for block in range(layout.removed_blocks(PLAN_FILES)):
                merge_block(store, folder_of, merged_of, block)
        counter = RequestCounter()
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
    stray = document_id(layout.REMOVED_BLOCK_FILES, 0)  # plan file 64: block 1
    write_table(store, join_key(layout.exact_removed(0), "p0000.parquet"), pa.table([[stray], [0]], schema=REMOVED_SCHEMA))
    with pytest.raises(ValueError, match=r"dedup/exact/removed/k000000/p0000.parquet: removed id 274877906944 is not in block 0"):
        merge_block(store, layout.exact_removed, layout.exact_merged, 0)

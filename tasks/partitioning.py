"""Partitions and batches sized from the data, so one task holds at most `task_memory_bytes`.

The counts come from the ingest summary (documents kept, docs-shard sizes), never from the
number of workers, so the outputs are the same on any cluster. The per-row costs are what a
task holds per document at its peak (arrow columns, the sort's copy, numpy views), measured
with benchmarks/scale.py.
"""

from __future__ import annotations

import math

import numpy as np

from storage import build_layout as layout
from storage.stage_summary import StageSummary

EXACT_ROW_BYTES = 96  # one (id, 16-byte hash) row in a hash-range task
NEAR_BAND_ROW_BYTES = 64  # one (band hash, id) row in a bucket task: bands rows per document
NEAR_EDGE_BYTES = 256  # one document's edges in a components task (both directions, two rounds' copies)
VERIFY_SHINGLE_BYTES = 8  # one 32-bit shingle of a candidate in a verify task: the parquet read's copy, the list
VERIFY_MEMBER_BYTES = 64  # one bucket membership in a verify task: (bucket, id) rows, id lookup, offsets
# Verify groups one verify task handles in turn: it reads their part of each object it reads
# (tasks.shuffle.MergedShuffle) as one byte range and spills it to local disk (about
# half a budget a group).
VERIFY_SPAN_GROUPS = 16
BATCH_FRACTION = 8  # a map task reads docs parquet of budget / 8: texts inflate ~3-4x as strings
HEADROOM = 1.25  # hash ranges are filled unevenly: plan for the fullest, not the average


def partitions(documents: int, bytes_per_document: int, budget: int, explicit: int | None = None) -> int:
    """`explicit` if given, else enough partitions that each holds at most `budget` bytes."""
    if explicit is not None:
        return explicit
    return max(1, math.ceil(HEADROOM * documents * bytes_per_document / budget))


def verify_member_bytes(shingles_per_document: float) -> int:
    """What a verify task holds per bucket membership: the candidate's shingles and its rows.
    Counting memberships, not distinct candidates, plans for a candidate in several buckets."""
    return math.ceil(VERIFY_MEMBER_BYTES + VERIFY_SHINGLE_BYTES * shingles_per_document)


def batch_bytes(budget: int) -> int:
    """Docs-parquet bytes one map task (hashes, signatures) reads as one batch."""
    return max(1, budget // BATCH_FRACTION)


def batches(sizes: list[int], limit: int) -> list[range]:
    """Consecutive index ranges of items, a new one once a range holds `limit` bytes."""
    ranges: list[range] = []
    start, held = 0, 0
    for index, size in enumerate(sizes):
        if index > start and held + size > limit:
            ranges.append(range(start, index))
            start, held = index, 0
        held += size
    if start < len(sizes):
        ranges.append(range(start, len(sizes)))
    return ranges


def ingested_documents(summary: StageSummary) -> tuple[int, dict[str, int]]:
    """From the ingest summary: documents kept, and each docs shard's size in bytes."""
    documents = sum(acc.kept for acc in summary.sources().values())
    sizes = summary.outputs_size(layout.DOCS)
    return documents, sizes


def rows_by_partition(partition: np.ndarray, count: int) -> list[np.ndarray]:
    """Each partition's row indices, in row order: one stable sort, not one pass per partition
    (a map task splits millions of rows into up to thousands of partitions)."""
    order = np.argsort(partition, kind="stable")
    bounds = np.searchsorted(partition[order], np.arange(count + 1))
    return [order[start:end] for start, end in zip(bounds[:-1], bounds[1:])]

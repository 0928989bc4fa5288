"""What a task of the dedup stages is given does not grow with the plan: each task gets its own
slice of it (a batch's docs shards) or a few values for all of it (source ranges, one int64 per
batch or bucket range, passed zero-copy), never the whole plan. 10x the plan's docs shards, at
the same shards per batch, must leave every task's arguments within 1.5x.

Measured as Ray passes them: the stage's work is put once and each task unpickles it with its
item, so the cost per task is the pickle's in-band bytes (protocol 5, numpy's buffers out of band:
Ray maps those, zero-copy)."""

from __future__ import annotations

import random
import string

import cloudpickle
import pyarrow as pa
import pytest

from storage import build_layout as layout
from storage.store import LocalStore, Store
from tasks.config import MinHashConfig
from tasks.exact_dedup import run_exact_dedup
from tasks.fanout import run_stage
from tasks.near_dedup.steps import DocsShard, run_near_dedup
from tasks.parquet_io import write_table
from tasks.plan import PlannedFile, document_id

SHARDS_PER_BATCH = 10
VERIFY_BUDGET = 4096  # a verify group per few bucket memberships: several verify spans
SMALL = 100  # docs shards of the smaller plan; the larger has 10x
CONFIG = MinHashConfig(bands=16, rows=8, bucket_partitions=2, component_partitions=2)


def task_bytes(work, item) -> tuple[int, int]:
    """(in-band, out-of-band) bytes of what a task unpickles: the stage's work and its item."""
    buffers: list[int] = []
    inband = len(cloudpickle.dumps((work, item), protocol=5, buffer_callback=lambda b: buffers.append(b.raw().nbytes)))
    return inband, sum(buffers)


def docs_shards(store: Store, count: int) -> list[PlannedFile]:
    """`count` one-document docs shards of two sources; every 20th repeats the first document,
    and the one after it is a near copy (one word of 60 changed)."""
    rng = random.Random(count)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 8))) for _ in range(3000)]
    first = rng.choices(words, k=60)
    plan = []
    for ordinal in range(count):
        file = PlannedFile(source="web" if ordinal < count // 2 else "code", uri=f"file:///in/{ordinal}.jsonl", size=1, ordinal=ordinal)
        if ordinal % 20 == 0:
            text = " ".join(first)
        elif ordinal % 20 == 1:
            text = " ".join(first[:30] + [rng.choice(words)] + first[31:])
        else:
            text = " ".join(rng.choices(words, k=60))
        write_table(store, layout.docs(file.source, file.shard), pa.table({"id": [document_id(ordinal, 0)], "text": [text]}))
        plan.append(file)
    return plan


def largest_task_arguments(store: Store, shards: int) -> dict[str, tuple[int, int]]:
    """Per stage of exact and near dedup run over `shards` docs shards: the largest (in-band,
    out-of-band) bytes of a task's arguments. Stages of one task are left out: they are given
    their inputs once, not once per task."""
    plan = docs_shards(store, shards)
    largest: dict[str, tuple[int, int]] = {}

    def run(stage):
        if len(stage.items) > 1:
            sizes = [task_bytes(stage.work, item) for item in stage.items]
            largest[stage.name] = (max(s[0] for s in sizes), max(s[1] for s in sizes))
        return run_stage(store, stage, inline=True)

    run_exact_dedup(store, plan, {f.shard: f.size for f in plan}, 2, 8 * SHARDS_PER_BATCH, run)
    near_shards = [DocsShard(f, layout.docs(f.source, f.shard), exclude=True, size=f.size) for f in plan]
    run_near_dedup(store, near_shards, CONFIG, run, SHARDS_PER_BATCH, VERIFY_BUDGET)
    return largest


@pytest.mark.slow
def test_a_tasks_arguments_do_not_grow_with_the_plan(tmp_path):
    small = largest_task_arguments(LocalStore(tmp_path / "small"), SMALL)
    large = largest_task_arguments(LocalStore(tmp_path / "large"), 10 * SMALL)
    stages = {"exact-hash", "exact-dedup", "exact-merge", "near-signatures", "near-buckets", "near-shingles", "near-verify", "near-dedup"}
    assert stages <= small.keys() & large.keys(), (small.keys(), large.keys())
    for stage in small.keys() & large.keys():
        (small_inband, _), (large_inband, large_buffers) = small[stage], large[stage]
        print(f"{stage}: {small_inband} -> {large_inband} bytes in band; {large_buffers} zero-copy at {10 * SMALL:,} shards")
        assert large_inband <= 1.5 * small_inband, (stage, small[stage], large[stage])
        assert large_buffers <= 8 * (10 * SMALL // SHARDS_PER_BATCH + 1), (stage, large[stage])  # one int64 per batch at most

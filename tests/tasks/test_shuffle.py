"""tasks.shuffle: every shuffle of exact and near dedup goes through merge levels, so a step's
requests grow with its tasks as the budget shrinks, never as map tasks x reduce tasks."""

from __future__ import annotations

import pytest

from benchmarks.dedup import sized, write_shards, zipf_corpus
from storage.store import open_store
from tasks.config import MinHashConfig
from tasks.exact_dedup import run_exact_dedup
from tasks.fanout import run_stage
from tasks.near_dedup.steps import run_near_dedup
from tasks.partitioning import EXACT_ROW_BYTES, batch_bytes, partitions
from tests.builds import RequestCounter

DOCUMENTS = 3000
BUDGETS = {"roomy": 1 << 18, "tight": 1 << 16}  # data / budget 4x apart
# Map tasks outnumber a fan-in of 4 at both budgets here, as they outnumber the default 16 at
# the full build's size: each step then has its merge levels, not a direct read of every map.
FAN_IN = 4
# Docs shards of 10 documents: 300 plan files, so the removed ids (tasks.removals) spread over 5
# blocks of plan files, each merged by one task of exact-merge and near-merge.
PER_SHARD = 10
# Exact dedup has 2 hash ranges at the roomy budget, half a fan-in: a block's merge task then
# reads 2 objects, where a merge level's task reads FAN_IN. exact-merge is compared at budgets
# of 4 and 15 hash ranges (as near-merge at 4 and 15 vertex partitions above), whose reads fill
# the fan-in at both (90 hash ranges at the full build's size), over 120 plan files (2 blocks:
# fewer hashing tasks at these budgets).
EXACT_MERGE_BUDGETS = {"roomy": 96 << 10, "tight": 24 << 10}
EXACT_MERGE_PER_SHARD = 25
# Steps whose work is not a shuffle read: one task reads the first removed documents.
FIXED_STEPS = ("near-sample",)


def steps_at(s3_bucket_uri: str, name: str, budget: int, per_shard: int = PER_SHARD, near: bool = True) -> dict[str, tuple[int, int]]:
    """Inline exact (and near) dedup on S3 at one budget: (tasks, requests) of each step, a step
    counting the merge levels (`*-runs-*`) of the shuffle it reads."""
    store = open_store(f"{s3_bucket_uri}/shuffle-{name}")
    shards = write_shards(store, zipf_corpus(DOCUMENTS, seed=3, log_words=3.0), per_shard=per_shard)
    counter = RequestCounter()
    steps: dict[str, tuple[int, int]] = {}
    merges = [0, 0]  # tasks and requests of merge levels not yet given to their reading step

    def run(stage):
        counter.take()
        summary = run_stage(store, stage, inline=True)
        requests = sum(counter.take().values())
        if "-runs-" in stage.name:
            merges[0] += len(stage.items)
            merges[1] += requests
        else:
            steps[stage.name] = (len(stage.items) + merges[0], requests + merges[1])
            merges[:] = [0, 0]
        return summary

    sizes = {s.file.shard: s.size for s in shards}
    ranges = partitions(DOCUMENTS, EXACT_ROW_BYTES, budget)
    run_exact_dedup(store, [s.file for s in shards], sizes, ranges, budget, run)
    if near:
        run_near_dedup(store, shards, sized(MinHashConfig(), DOCUMENTS, budget), run, batch_bytes(budget), budget)
    return steps


def assert_requests_grow_no_faster_than_tasks(roomy: dict[str, tuple[int, int]], tight: dict[str, tuple[int, int]], steps: list[str]) -> None:
    for step in steps:
        (roomy_tasks, roomy_requests), (tight_tasks, tight_requests) = roomy[step], tight[step]
        assert tight_requests / roomy_requests <= 1.1 * tight_tasks / roomy_tasks, (step, roomy[step], tight[step])


@pytest.mark.slow
def test_each_steps_requests_grow_no_faster_than_its_tasks_as_the_budget_shrinks(s3_bucket_uri, monkeypatch):
    """At a 4x smaller budget the map and reduce tasks of every shuffle grow ~4x each; reading
    every map object from every reduce task made ~16x the requests (exact dedup's hash ranges,
    near dedup's bucket ranges, components rounds), and a block's merge of removed ids read a
    file of every vertex partition; through merge levels the requests grow no faster than the
    tasks."""
    monkeypatch.setattr("tasks.shuffle.MERGE_FAN_IN", FAN_IN)
    roomy, tight = (steps_at(s3_bucket_uri, name, budget) for name, budget in BUDGETS.items())
    compared = [step for step in roomy if step in tight and step not in (*FIXED_STEPS, "exact-merge")]  # exact-merge: below
    for step in ("exact-dedup", "near-buckets", "near-shingles", "near-verify", "near-components-r000-large", "near-dedup", "near-merge"):
        assert step in compared, (step, list(roomy))
    assert tight["near-buckets"][0] >= 3 * roomy["near-buckets"][0]  # the budget did grow the shuffle
    assert_requests_grow_no_faster_than_tasks(roomy, tight, compared)


@pytest.mark.slow
def test_exact_merge_requests_grow_no_faster_than_its_tasks_as_the_budget_shrinks(s3_bucket_uri, monkeypatch):
    """A block's merge of exact dedup's removed ids read a file of every hash range: ~4x the
    hash ranges, ~2x the requests for the same 2 tasks. Through merge levels its requests grow
    no faster than its tasks."""
    monkeypatch.setattr("tasks.shuffle.MERGE_FAN_IN", FAN_IN)
    roomy, tight = (
        steps_at(s3_bucket_uri, f"exact-{name}", budget, EXACT_MERGE_PER_SHARD, near=False) for name, budget in EXACT_MERGE_BUDGETS.items()
    )
    assert [partitions(DOCUMENTS, EXACT_ROW_BYTES, budget) for budget in EXACT_MERGE_BUDGETS.values()] == [4, 15]
    assert_requests_grow_no_faster_than_tasks(roomy, tight, ["exact-merge"])

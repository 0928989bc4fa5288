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
# Steps whose work is not a shuffle read: one task per block of plan files (merge, sample).
FIXED_STEPS = ("exact-merge", "near-merge", "near-sample")


def steps_at(s3_bucket_uri: str, name: str, budget: int) -> dict[str, tuple[int, int]]:
    """Inline exact and near dedup on S3 at one budget: (tasks, requests) of each step, a step
    counting the merge levels (`*-runs-*`) of the shuffle it reads."""
    store = open_store(f"{s3_bucket_uri}/shuffle-{name}")
    shards = write_shards(store, zipf_corpus(DOCUMENTS, seed=3, log_words=3.0), per_shard=100)
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
    run_near_dedup(store, shards, sized(MinHashConfig(), DOCUMENTS, budget), run, batch_bytes(budget), budget)
    return steps


@pytest.mark.slow
def test_each_steps_requests_grow_no_faster_than_its_tasks_as_the_budget_shrinks(s3_bucket_uri, monkeypatch):
    """At a 4x smaller budget the map and reduce tasks of every shuffle grow ~4x each; reading
    every map object from every reduce task made ~16x the requests (exact dedup's hash ranges,
    near dedup's bucket ranges, components rounds); through merge levels the requests grow no
    faster than the tasks."""
    monkeypatch.setattr("tasks.shuffle.MERGE_FAN_IN", FAN_IN)
    roomy, tight = (steps_at(s3_bucket_uri, name, budget) for name, budget in BUDGETS.items())
    compared = [step for step in roomy if step in tight and step not in FIXED_STEPS]
    for step in ("exact-dedup", "near-buckets", "near-shingles", "near-verify", "near-components-r000-large", "near-dedup"):
        assert step in compared, (step, list(roomy))
    assert tight["near-buckets"][0] >= 3 * roomy["near-buckets"][0]  # the budget did grow the shuffle
    for step in compared:
        (roomy_tasks, roomy_requests), (tight_tasks, tight_requests) = roomy[step], tight[step]
        assert tight_requests / roomy_requests <= 1.1 * tight_tasks / roomy_tasks, (step, roomy[step], tight[step])

"""The stage contract every pipeline stage is written against, and its Prefect task.

A stage is datatrove's `run(data, rank, world_size)` made typed: a name, its work items, each
item's shard name, and `work(item) -> ShardResult`. `tasks.fanout.run_stage` runs it (Ray,
receipts, progress); a stage knows none of that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.lease import LeaseHeld
from storage.manifest import ShardResult
from storage.stage_summary import StageSummary
from storage.store import StoreAccessError
from tasks.reporting import record_run_time

STAGE_RETRIES = 2
RETRY_DELAY_S = 5

# The build's steps (its Prefect tasks, in pipeline order: flows/build_dataset.py). A step's name
# is also that of its own stage, whose summary later steps read through the step's result
# (tasks.step_result): ingest's documents, each dedup step's per-source losses, tokenize's shards.
PLAN = "plan"
INGEST = "ingest"
EXACT_DEDUP = "exact-dedup"
NEAR_DEDUP = "near-dedup"
TOKENIZER = "tokenizer"
TOKENIZER_SAMPLE = "tokenizer-sample"  # the tokenizer step's training sample
TOKENIZE = "tokenize"
MANIFEST = "manifest"

Item = TypeVar("Item")


@dataclass(frozen=True)
class Stage(Generic[Item]):
    """One step of a build: `work(item)` for every item, each item one shard.

    `work` writes its outputs (keys from storage.build_layout) and returns what it wrote; it
    runs in a Ray worker, so it must pickle and must not depend on which worker runs it.
    `outputs` are the key prefixes holding everything the stage writes: a rerun lists them
    (1,000 keys a request) to check that every receipt's outputs are still as committed.
    """

    name: str
    items: Sequence[Item]
    shard_of: Callable[[Item], str]
    work: Callable[[Item], ShardResult]
    outputs: tuple[str, ...]


Run = Callable[[Stage], StageSummary]
"""run(stage) -> its summary: tasks.fanout.run_stage with the store (and reporting) bound (tasks.step_result.StepRun)."""


def is_transient(_task, _task_run, state) -> bool:
    """Retry crashes, lost workers and store outages; not bad input or bad config (ValueError),
    nor a store that refuses access (StoreAccessError), which fail the same way every time, nor a
    training run that another job holds."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, (ValueError, LeaseHeld, StoreAccessError))


def stage_task(name: str, retries: int = STAGE_RETRIES):
    """A stage's Prefect task. Receipts, not Prefect's cache, decide what a rerun skips."""
    return task(
        name=name,
        retries=retries,
        retry_delay_seconds=RETRY_DELAY_S,
        retry_condition_fn=is_transient,
        cache_policy=NO_CACHE,
        on_completion=[record_run_time],
    )

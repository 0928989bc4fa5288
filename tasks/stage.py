"""The Prefect task every pipeline stage is: tracked, retried on transient failures only."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.lease import LeaseHeld
from storage.store import StoreAccessError

STAGE_RETRIES = 2
RETRY_DELAY_S = 5


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
    )

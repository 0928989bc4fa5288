"""Prefect schedules, Ray fans out: run one Ray task per shard and commit a receipt for each.

A shard whose receipt exists (and whose outputs are all present at the recorded sizes) is
done and is skipped, so a Prefect retry, a rerun, or a recovery after a crash redoes only
the unfinished shards. Outputs are written by the shard's work; the receipt is written last.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import ray
from ray.exceptions import RayTaskError

from storage.manifest import Receipt, read_record, write_record
from storage.store import ObjectNotFound, Store, join_key

Item = TypeVar("Item")
log = logging.getLogger(__name__)


def receipt_key(stage: str, shard: str) -> str:
    return join_key("receipts", stage, f"{shard}.json")


def list_receipts(store: Store, stage: str) -> list[Receipt]:
    """Every receipt a stage has committed, in shard order."""
    prefix = join_key("receipts", stage) + "/"
    return [read_record(store, key, Receipt) for key in store.list(prefix) if key.endswith(".json")]


def ensure_ray() -> None:
    """Start a local Ray, or join the cluster named by RAY_ADDRESS; once per process."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)


def finished_receipt(store: Store, stage: str, shard: str) -> Receipt | None:
    """The shard's receipt if it and every output it names are intact, else None."""
    try:
        receipt = read_record(store, receipt_key(stage, shard), Receipt)
    except ObjectNotFound:
        return None
    for output in receipt.outputs:
        try:
            if store.size(output.key) != output.size:
                return None
        except ObjectNotFound:
            return None
    return receipt


def _work_and_commit(stage: str, store: Store, work: Callable[[Item], Receipt], item: Item) -> Receipt:
    started = time.perf_counter()
    receipt = work(item)
    receipt = receipt.model_copy(update={"seconds": round(time.perf_counter() - started, 3)})
    write_record(store, receipt_key(stage, receipt.shard), receipt)
    return receipt


def run_shards(
    stage: str,
    store: Store,
    items: Sequence[Item],
    shard_of: Callable[[Item], str],
    work: Callable[[Item], Receipt],
    on_progress: Callable[[int, int], None] | None = None,
    max_in_flight: int | None = None,
) -> list[Receipt]:
    """Run `work(item)` as a Ray task for every item without a receipt; receipts in item order.

    `work` must return a Receipt whose `shard` equals `shard_of(item)`. A worker that dies is
    retried by Ray; an exception from `work` (bad input, say) is raised here unchanged after
    the tasks already running have finished and committed.
    """
    receipts: dict[str, Receipt] = {}
    todo = []
    for item in items:
        shard = shard_of(item)
        if (done := finished_receipt(store, stage, shard)) is not None:
            receipts[shard] = done
        else:
            todo.append(item)
    total = len(items)
    if on_progress:
        on_progress(len(receipts), total)
    if todo:
        log.info("%s: %d of %d shards to run (%d already done)", stage, len(todo), total, len(receipts))
        _fan_out(stage, store, todo, work, receipts, total, on_progress, max_in_flight)
    return [receipts[shard_of(item)] for item in items]


def _fan_out(stage, store, todo, work, receipts, total, on_progress, max_in_flight) -> None:
    ensure_ray()
    remote = ray.remote(num_cpus=1, max_retries=3)(_work_and_commit)
    window = max_in_flight or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    store_ref, work_ref = ray.put(store), ray.put(work)
    queue = list(reversed(todo))
    pending: list = []
    failure: RayTaskError | None = None
    while queue or pending:
        while queue and failure is None and len(pending) < window:
            pending.append(remote.remote(stage, store_ref, work_ref, queue.pop()))
        if not pending:
            break
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            receipt = ray.get(ready[0])
        except RayTaskError as error:
            failure = failure or error
            continue
        receipts[receipt.shard] = receipt
        if on_progress:
            on_progress(len(receipts), total)
    if failure is not None:
        # The work's own exception (an IngestError naming the file, say), with Ray's remote
        # traceback chained to it.
        raise (failure.cause or failure) from failure

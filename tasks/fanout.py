"""The one stage runner: "Prefect schedules, Ray fans out", with a receipt per shard.

`run_stage(store, stage)` runs `stage.work(item)` as one Ray task per item that is not done,
and returns the stage's summary. What is done is decided by the page, never by a request
per object in the driver:

1. one paginated listing of `receipts/<stage>/` (keys, sizes, versions; 1,000 a request);
2. one GET of `summaries/<stage>.json`: every receipt whose listed version is the one the
   summary recorded is taken from it; the others (a stage cut short, a receipt rewritten or
   damaged) are read in a thread pool, and an unreadable or invalid one counts as missing;
   so does one whose content no longer matches its checksum (edited after it was written:
   valid JSON with a count changed), wherever it was read;
3. one paginated listing of the stage's output prefixes: a receipt is intact only if each of
   its outputs is listed at the size and version the task recorded when it committed, so an
   output deleted, truncated or rewritten (even at the same size) after its receipt is redone.

A task writes its outputs, checks each one's size on the store and records its version, then
writes its receipt last. When the stage completes, the summary is written once (unless a
rerun found everything as its summary said, then nothing is written).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import ray
from pydantic import ValidationError
from ray.exceptions import RayError, RayTaskError

from storage import build_layout as layout
from storage.manifest import Receipt, ShardResult, StageSummary, read_record, write_record
from storage.processes import guard_process_tree
from storage.store import ObjectNotFound, ListedObject, Store, StoreError
from tasks.reporting import progress
from tasks.stage import Item, Stage

if TYPE_CHECKING:
    from tasks.config import BuildConfig

log = logging.getLogger(__name__)
READ_THREADS = 32  # receipts read at once when the summary does not have them
NAMED_SHARDS = 5  # shards a message names before it counts the rest
SHARD_ATTEMPTS = 3  # runs of a shard whose worker dies (crash, OOM kill, lost node); the last one alone


class ShardFailed(RuntimeError):
    """A shard's worker died on every attempt; the stage's other shards are committed."""


def ensure_ray() -> None:
    """Start a local Ray, or join the cluster named by RAY_ADDRESS; once per process.

    A local Ray dies with this process, however it ends (a guardian: Ray's own shutdown leaves
    its agents and idle workers behind when a flow run is cancelled). ray.init replaces the
    SIGTERM handler with one that exits: inside a flow run that handler is Prefect's, which
    turns the runner's SIGTERM into a cancellation (else the run ends Crashed), so it is put back.
    """
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        sigterm = signal.getsignal(signal.SIGTERM)
        # Ray's local default (token authentication) stays; its notice of it at every start goes.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
        if not address:
            guard_process_tree()


@contextlib.contextmanager
def interrupts_unwrapped() -> Iterator[None]:
    """Let an interrupt raised by a signal handler during a Ray call (Prefect's TerminationSignal
    when the run is cancelled, KeyboardInterrupt) propagate as itself: raised inside Ray's C
    code it can surface as CPython's SystemError("... returned a result with an exception set"),
    which Prefect would take for a task failure and retry."""
    try:
        yield
    except SystemError as error:
        if isinstance(error.__cause__, BaseException) and not isinstance(error.__cause__, Exception):
            raise error.__cause__ from None
        raise


def read_valid(store: Store, key: str, cls):
    """The record at `key`, or None when it is missing, unreadable or invalid (logged with its key)."""
    try:
        return read_record(store, key, cls)
    except ObjectNotFound:
        return None
    except (ValidationError, ValueError, UnicodeDecodeError) as error:
        log.warning("%s is damaged and counts as missing (%s)", store.url(key), type(error).__name__)
        return None


def read_receipt(store: Store, key: str) -> Receipt | None:
    """The receipt at `key`, or None when it is missing, invalid or fails its checksum (logged with its key)."""
    receipt = read_valid(store, key, Receipt)
    if receipt is not None and not receipt.intact:
        log.warning("%s does not match its checksum (edited after it was written) and counts as missing", store.url(key))
        return None
    return receipt


def _read_stage_summary(store: Store, stage: str) -> StageSummary | None:
    summary = read_valid(store, layout.summary(stage), StageSummary)
    return summary if summary is not None and summary.stage == stage else None


def read_summary(store: Store, stage: str) -> StageSummary | None:
    """A completed stage's summary (None when the stage has not completed, or it is damaged: invalid,
    or holding a receipt that fails its checksum)."""
    summary = _read_stage_summary(store, stage)
    if summary is not None and (edited := [r.shard for r in summary.receipts if not r.intact]):
        log.warning("%s: %s fail their checksum; it counts as missing", store.url(layout.summary(stage)), _receipts(edited))
        return None
    return summary


def _receipts(shards: list[str]) -> str:
    """'the receipts of shards a, b and 3 more', for a message."""
    more = f" and {len(shards) - NAMED_SHARDS} more" if len(shards) > NAMED_SHARDS else ""
    return f"the receipts of shards {', '.join(shards[:NAMED_SHARDS])}{more}"


def _listing(store: Store, prefixes: tuple[str, ...]) -> dict[str, ListedObject]:
    return {listed.key: listed for prefix in prefixes for listed in store.list_info(prefix)}


def _intact(receipt: Receipt, outputs: dict[str, ListedObject]) -> bool:
    for output in receipt.outputs:
        listed = outputs.get(output.key)
        if listed is None or listed.size != output.size or listed.version != receipt.versions.get(output.key):
            log.warning("%s: output %s changed since its receipt; shard %s is redone", receipt.stage, output.key, receipt.shard)
            return False
    return True


def finished_receipts(store: Store, stage: Stage) -> tuple[dict[str, Receipt], StageSummary | None]:
    """The intact receipts of the stage's shards, and the stage's summary when it holds them all."""
    listed = {o.key: o for o in store.list_info(layout.receipts(stage.name))}
    shards = [shard for item in stage.items if layout.receipt(stage.name, shard := stage.shard_of(item)) in listed]
    version = {shard: listed[layout.receipt(stage.name, shard)].version for shard in shards}
    summary = _read_stage_summary(store, stage.name) if shards else None
    known = {r.shard: r for r in summary.receipts} if summary else {}
    receipts = {s: known[s] for s in shards if s in known and summary.receipt_versions.get(s) == version[s]}
    if edited := [s for s, receipt in receipts.items() if not receipt.intact]:
        summary_url = store.url(layout.summary(stage.name))
        log.warning("%s: %s fail their checksum; they are read from their objects", summary_url, _receipts(edited))
        for shard in edited:
            del receipts[shard]
    unread = [s for s in shards if s not in receipts]
    if unread:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for shard, receipt in zip(unread, pool.map(lambda s: read_receipt(store, layout.receipt(stage.name, s)), unread)):
                if receipt is not None and (receipt.stage, receipt.shard) == (stage.name, shard):
                    receipts[shard] = receipt
    if receipts:
        outputs = _listing(store, stage.outputs)
        receipts = {shard: r for shard, r in receipts.items() if _intact(r, outputs)}
    current = summary is not None and not unread and len(receipts) == len(shards)
    return receipts, summary if current else None


def commit(store: Store, stage_name: str, prefixes: tuple[str, ...], shard: str, result: ShardResult, seconds: float) -> Receipt:
    """Check the outputs the work reported against the store, record their versions, then
    write the receipt; runs in the task that produced them."""
    versions = {}
    for output in result.outputs:
        if not output.key.startswith(prefixes):
            raise RuntimeError(f"{stage_name}: output {output.key} lies outside the stage's prefixes {prefixes}")
        listed = store.info(output.key)
        if listed.size != output.size:
            raise StoreError(f"{store.url(output.key)} holds {listed.size} bytes after {output.size} were written")
        versions[output.key] = listed.version
    receipt = Receipt(**dict(result), stage=stage_name, shard=shard, versions=versions, seconds=round(seconds, 3))
    receipt = receipt.sealed()
    write_record(store, layout.receipt(stage_name, shard), receipt)
    return receipt


# Test-only hook (tests/reliability/test_multinode.py SIGKILLs a worker inside each stage): with
# TINYLLAMA_TEST_HOLD_WORK=FOLDER set and FOLDER present, every task appends "STAGE SHARD PID" to
# FOLDER/attempts, and the first task of each stage also creates FOLDER/STAGE (holding "SHARD PID")
# and blocks for good, until it is killed; its retry (run_stage's) finds FOLDER/STAGE and works. Else a no-op.
HOLD_WORK_ENV = "TINYLLAMA_TEST_HOLD_WORK"


def _hold_for_test(stage_name: str, shard: str) -> None:
    folder = os.environ.get(HOLD_WORK_ENV)
    if not folder or not os.path.isdir(folder):
        return
    with open(os.path.join(folder, "attempts"), "a") as attempts:
        attempts.write(f"{stage_name} {shard} {os.getpid()}\n")
    try:
        held = os.open(os.path.join(folder, stage_name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(held, f"{shard} {os.getpid()}".encode())
    os.close(held)
    threading.Event().wait()


def _work_and_commit(store: Store, stage_name: str, prefixes: tuple[str, ...], work, shard: str, item) -> Receipt:
    _hold_for_test(stage_name, shard)
    started = time.perf_counter()
    result = work(item)
    return commit(store, stage_name, prefixes, shard, result, time.perf_counter() - started)


def run_stage(
    store: Store,
    stage: Stage[Item],
    build_config: BuildConfig | None = None,
    max_in_flight: int | None = None,
    inline: bool = False,
) -> StageSummary:
    """Run every shard of `stage` that is not done; returns the stage's summary (receipts in
    item order). With the build's config, its step's progress artifact in Prefect follows it.
    `inline` runs the work in this process, one item after another (tests, benchmarks).

    A shard whose worker dies is retried alone, up to SHARD_ATTEMPTS runs, while its siblings
    go on; then ShardFailed names it (a rerun redoes only shards without a receipt). An exception
    from `work` (bad input, say) is raised here unchanged after the tasks already running have
    finished and committed.
    """
    receipts, summary = finished_receipts(store, stage)
    total = len(stage.items)
    on_progress = progress(stage.name, build_config) if build_config else None
    if on_progress:
        on_progress(len(receipts), total)
    todo = [item for item in stage.items if stage.shard_of(item) not in receipts]
    if todo:
        log.info("%s: %d of %d shards to run (%d already done)", stage.name, len(todo), total, len(receipts))
        run = _run_inline if inline else _fan_out
        run(store, stage, todo, receipts, total, on_progress, max_in_flight)
    ordered = [receipts[stage.shard_of(item)] for item in stage.items]
    if summary is None or todo:
        listed = {o.key: o.version for o in store.list_info(layout.receipts(stage.name))}
        versions = {r.shard: listed[layout.receipt(stage.name, r.shard)] for r in ordered}
        summary = StageSummary(stage=stage.name, receipts=ordered, receipt_versions=versions)
        write_record(store, layout.summary(stage.name), summary)
    return summary


def _run_inline(store, stage, todo, receipts, total, on_progress, _max_in_flight) -> None:
    for item in todo:
        shard = stage.shard_of(item)
        receipts[shard] = _work_and_commit(store, stage.name, stage.outputs, stage.work, shard, item)
        if on_progress:
            on_progress(len(receipts), total)


def _fan_out(store, stage, todo, receipts, total, on_progress, max_in_flight) -> None:
    """Run `todo` on Ray, at most `window` at once. A shard whose worker dies (a crash, an OOM
    kill, a lost node) goes to the back of the queue while its siblings go on; its last attempt
    runs alone, once nothing else is in flight (a shard killed for memory gets the node to
    itself). An exception from the work itself stops new submissions, as bad input fails the
    same way every time."""
    ensure_ray()
    remote = ray.remote(num_cpus=1, max_retries=0)(_work_and_commit)  # attempts are counted here
    window = max_in_flight or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    store_ref, work_ref = ray.put(store), ray.put(stage.work)  # put once: each task gets refs
    queue, alone = deque(todo), deque()
    attempts: Counter[str] = Counter()
    pending: dict = {}  # ref: item
    failure: RayTaskError | None = None
    died: dict[str, str] = {}  # shard: why its last attempt failed

    def submit(item) -> None:
        shard = stage.shard_of(item)
        attempts[shard] += 1
        pending[remote.remote(store_ref, stage.name, stage.outputs, work_ref, shard, item)] = item

    try:
        with interrupts_unwrapped():
            while True:
                if failure is None:
                    while queue and len(pending) < window:
                        submit(queue.popleft())
                    if alone and not queue and not pending:
                        submit(alone.popleft())
                if not pending:
                    break
                [ready], _ = ray.wait(list(pending), num_returns=1)
                item = pending.pop(ready)
                try:
                    receipt = ray.get(ready)
                except RayTaskError as error:
                    failure = failure or error
                    continue
                except RayError as error:
                    shard, reason = stage.shard_of(item), _first_line(error)
                    if attempts[shard] >= SHARD_ATTEMPTS:
                        died[shard] = reason
                        continue
                    log.warning(
                        "%s: shard %s failed on attempt %d of %d (%s); retried", stage.name, shard, attempts[shard],
                        SHARD_ATTEMPTS, reason,
                    )
                    (alone if attempts[shard] == SHARD_ATTEMPTS - 1 else queue).append(item)
                    continue
                receipts[receipt.shard] = receipt
                if on_progress:
                    on_progress(len(receipts), total)
    except BaseException:
        # Leaving early (the run cancelled, Ctrl-C, a failure here): stop the tasks in flight;
        # whatever they half wrote has no receipt, so a rerun redoes it.
        for ref in pending:
            with contextlib.suppress(Exception):  # a Ray going down: its tasks end with it
                ray.cancel(ref, force=True)
        raise
    if failure is not None:
        # The work's own exception (an IngestError naming the file, say), with Ray's remote
        # traceback chained to it.
        raise (failure.cause or failure) from failure
    if died:
        shards = sorted(died)
        more = f" (and {len(shards) - 1} more)" if len(shards) > 1 else ""
        raise ShardFailed(
            f"{stage.name}: shard {shards[0]}{more} failed {SHARD_ATTEMPTS} times ({died[shards[0]]}); "
            f"the other shards are committed and a rerun redoes only the failed ones"
        )


def _first_line(error: BaseException) -> str:
    """`WorkerCrashedError: The worker died unexpectedly ...`: Ray's messages run on for lines."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")

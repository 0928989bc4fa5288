"""The one stage runner: "Prefect schedules, Ray fans out", with a receipt per shard.

`run_stage(store, stage)` runs `stage.work(item)` as one Ray task per item that is not done,
and returns the stage's summary. What is done is decided by the page, never by a request
per object in the driver:

1. one paginated listing of `receipts/<stage>/` (keys, sizes, versions; 1,000 a request);
2. one GET of `summaries/<stage>.parquet` (a row per receipt, storage.stage_summary): every
   row whose receipt's listed version is the one the summary recorded is taken from it; the
   others (a stage cut short, a receipt rewritten or damaged) are read in a thread pool, and
   an unreadable or invalid one counts as missing; so does one whose content no longer
   matches its checksum (edited after it was written: valid JSON with a count changed),
   wherever it was read;
3. paginated listings of the stage's output prefixes (on S3, sub-prefixes of at most LIST_KEYS
   outputs each, several at once), held as columns and joined with the rows' outputs: a receipt
   is intact only if each of its outputs is listed at the size and version the task recorded
   when it committed, so an output deleted, truncated or rewritten (even at the same size)
   after its receipt is redone.

A task writes its outputs, checks each one's size on the store and records its version, then
writes its receipt last. The driver keeps the receipts that come back as rows of a table
(never as objects: 60,000 of them would cost gigabytes); when the stage completes, the
summary is written once (unless a rerun found everything as its summary said, then nothing
is written).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import ValidationError
from ray.exceptions import RayError, RayTaskError

from runtime.processes import guard_process_tree
from storage import build_layout as layout
from storage.manifest import Receipt, ShardResult, read_record, sha256_bytes, write_record
from storage.stage_summary import (
    DECODE_ROWS,
    Listing,
    ReceiptRows,
    StageSummary,
    flat,
    in_order,
    receipt_row,
    row_intact,
    version_text,
    with_receipt_versions,
)
from storage.store import ObjectNotFound, Store, StoreError
from tasks.code_version import check_ray_nodes, on_driver_code
from tasks.reporting import progress
from tasks.stage import Item, Stage

if TYPE_CHECKING:
    from tasks.config import BuildConfig

log = logging.getLogger(__name__)
READ_THREADS = 32  # receipts read at once when the summary does not have them
LIST_THREADS = 8  # listings of a stage's outputs at once on a rerun (each is held whole until it ends)
LIST_KEYS = 10_000  # outputs one such listing covers, at most (~10 pages; its objects are held until it ends)
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
        else:
            check_ray_nodes()


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
    """The stage's summary table, or None when it is missing or not a summary of the stage (logged)."""
    key = layout.summary(stage)
    try:
        return StageSummary.from_parquet(stage, store.get_bytes(key))
    except ObjectNotFound:
        return None
    except (ValueError, pa.ArrowException) as error:  # not parquet (ArrowInvalid), or not a summary (SummaryDamaged)
        log.warning("%s is damaged and counts as missing (%s)", store.url(key), type(error).__name__)
        return None


def read_summary(store: Store, stage: str, checked: str | None = None) -> StageSummary | None:
    """A completed stage's summary (None when the stage has not completed, or it is damaged: invalid,
    or holding a row that fails its receipt's checksum). `checked`: the sha256 of a summary whose
    rows were all checked already (run_stage's); read as those bytes, its rows are not checked again."""
    summary = _read_stage_summary(store, stage)
    if summary is not None and summary.sha256 != checked and (edited := summary.edited()):
        log.warning("%s: %s fail their checksum; it counts as missing", store.url(layout.summary(stage)), _receipts(edited))
        return None
    return summary


def _receipts(shards: list[str]) -> str:
    """'the receipts of shards a, b and 3 more', for a message."""
    more = f" and {len(shards) - NAMED_SHARDS} more" if len(shards) > NAMED_SHARDS else ""
    return f"the receipts of shards {', '.join(shards[:NAMED_SHARDS])}{more}"


def list_outputs(store: Store, prefixes: Sequence[str], keys: pa.Array) -> Listing:
    """The objects under `prefixes` that may be the outputs `keys`. On S3 each prefix is split
    into sub-prefixes that cover at most LIST_KEYS of them (layout keys end in zero-padded shard
    numbers), listed LIST_THREADS at a time: ~480,000 token files take seconds, not minutes of
    pages one after another, and a listing holds only its own objects until it ends."""
    if store.local_path() is not None:  # a local folder's listing walks the folder, whatever the key prefix
        return Listing.concat(Listing.of(store.list_info(prefix)) for prefix in prefixes)
    covers = [cover for prefix in prefixes for cover in _cover(keys.filter(pc.starts_with(keys, prefix)), prefix)]
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        return Listing.concat(pool.map(lambda prefix: Listing.of(store.list_info(prefix)), covers))


def _cover(keys: pa.Array, prefix: str) -> list[str]:
    """Sub-prefixes of `prefix`, in order, that together hold every one of `keys` (all under it),
    each holding at most LIST_KEYS of them unless a key ends where the split would go."""
    if len(keys) <= LIST_KEYS or pc.any(pc.equal(pc.utf8_length(keys), len(prefix))).as_py():
        return [prefix] if len(keys) else []
    heads = pc.utf8_slice_codeunits(keys, 0, len(prefix) + 1)
    split = sorted(pc.unique(heads).to_pylist())
    return [cover for head in split for cover in _cover(keys.filter(pc.equal(heads, head)), head)]


def intact_rows(stage: str, rows: pa.Table, outputs: pa.StructArray, listing: Listing) -> np.ndarray:
    """The numbers of the `rows` (storage.stage_summary) whose every output (`outputs`: the rows'
    outputs in turn) is listed at the size and version its task recorded when it committed; each
    other row's first changed output is logged."""
    owner = pc.list_parent_indices(rows.column("outputs")).to_numpy(zero_copy_only=False)
    changed = changed_outputs(outputs, listing)
    keys, shards = outputs.field("key"), rows.column("shard")
    for row, first in zip(*np.unique(owner[changed], return_index=True)):
        output = keys[changed[first]].as_py()
        log.warning("%s: output %s changed since its receipt; shard %s is redone", stage, output, shards[row].as_py())
    return np.setdiff1d(np.arange(rows.num_rows), owner[changed])


def changed_outputs(outputs: pa.StructArray, listing: Listing) -> np.ndarray:
    """The positions, in order, of the `outputs` (key, size, version as committed) that the
    listing does not show at that size and version."""
    listed = pc.index_in(outputs.field("key"), value_set=listing.keys)
    same = listed.is_valid().to_numpy(zero_copy_only=False)
    at = listed.filter(listed.is_valid()).to_numpy(zero_copy_only=False)
    same[same] = listing.sizes[at] == outputs.field("size").filter(listed.is_valid()).to_numpy(zero_copy_only=False)
    versions = listing.versions.take(listed)
    for start in range(0, len(outputs), DECODE_ROWS):  # the recorded versions as Python values, a slice at a time
        end = min(start + DECODE_ROWS, len(outputs))
        recorded = outputs.field("version").slice(start, end - start).to_pylist()
        listed_versions = versions[start:end].to_pylist()
        same[start:end] &= [v is not None and version_text(v) == text for v, text in zip(recorded, listed_versions)]
    return np.flatnonzero(~same)


def finished_rows(store: Store, stage: Stage) -> tuple[ReceiptRows, StageSummary | None]:
    """The rows of the stage's intact receipts (the shards done), and the stage's summary when it
    holds them all."""
    shards = _shards(stage)
    version = _receipt_versions(store, stage.name, shards)
    rows = ReceiptRows()
    if version.null_count == len(version):  # no receipt listed
        return rows, None
    summary = _read_stage_summary(store, stage.name)
    read = np.zeros(len(shards), bool)  # items whose receipts the summary holds as they are
    kept, edited = [], []  # summary row numbers taken as they are; shards whose rows are edited
    if summary is not None:
        item = pc.index_in(summary.table.column("shard"), value_set=shards)
        listed = version.take(item).to_pylist()
        for number, (row, at, text) in enumerate(zip(summary.rows(), item.to_pylist(), listed)):
            if text is None or row["receipt_version"] is None or version_text(row["receipt_version"]) != text:
                continue
            if not row_intact(row):
                edited.append(row["shard"])
                continue
            read[at] = True
            kept.append(number)
    if edited:
        summary_url = store.url(layout.summary(stage.name))
        log.warning("%s: %s fail their checksum; they are read from their objects", summary_url, _receipts(edited))
    candidates = ReceiptRows()
    if kept:  # rows are taken (copied) only when some are not
        candidates.add_table(summary.table if len(kept) == len(summary) else summary.table.take(kept))
    unread = shards.filter(pa.array(version.is_valid().to_numpy(zero_copy_only=False) & ~read)).to_pylist()
    if unread:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for shard, receipt in zip(unread, pool.map(lambda s: read_receipt(store, layout.receipt(stage.name, s)), unread)):
                if receipt is not None and (receipt.stage, receipt.shard) == (stage.name, shard):
                    candidates.add(receipt_row(receipt))
    table = candidates.release()
    outputs = _flat_outputs(table)
    intact = intact_rows(stage.name, table, outputs, list_outputs(store, stage.outputs, outputs.field("key")))
    del outputs
    rows.add_table(table if len(intact) == table.num_rows else table.take(intact))
    current = summary is not None and not unread and len(rows) == len(version) - version.null_count
    return rows, summary if current else None


def _flat_outputs(rows: pa.Table) -> pa.StructArray:
    """Every row's outputs in turn, as one array."""
    return flat(rows.column("outputs"))


def _shards(stage: Stage) -> pa.Array:
    return pa.array([stage.shard_of(item) for item in stage.items], pa.string())


def _receipt_versions(store: Store, stage: str, shards: pa.Array) -> pa.Array:
    """The listed version (version_text) of each shard's receipt, null where it has none: one
    paginated listing, matched by a hash join, not a dict per receipt."""
    receipts = Listing.of(store.list_info(layout.receipts(stage)))
    keys = pa.array([layout.receipt(stage, shard) for shard in shards.to_pylist()], pa.string())
    return receipts.versions.take(pc.index_in(keys, value_set=receipts.keys))


def commit(store: Store, stage_name: str, prefixes: tuple[str, ...], shard: str, result: ShardResult, seconds: float) -> Receipt:
    """Check the outputs the work reported against what the store answered to their writes,
    record their versions, then write the receipt; runs in the task that produced them. An
    output without the store's answer (ObjectInfo.stored) is asked for it: a request each."""
    versions = {}
    for output in result.outputs:
        if not output.key.startswith(prefixes):
            raise RuntimeError(f"{stage_name}: output {output.key} lies outside the stage's prefixes {prefixes}")
        stored = output.stored or store.info(output.key)
        if stored.size != output.size:
            raise StoreError(f"{store.url(output.key)} holds {stored.size} bytes after {output.size} were written")
        versions[output.key] = stored.version
    stored = {**dict(result), "counts": result.counts.as_dict()}
    receipt = Receipt(**stored, stage=stage_name, shard=shard, versions=versions, seconds=round(seconds, 3))
    receipt = receipt.sealed()
    write_record(store, layout.receipt(stage_name, shard), receipt)
    return receipt


def _work_and_commit(store: Store, stage_name: str, prefixes: tuple[str, ...], work, shard: str, item) -> dict:
    """Work, commit, and return the receipt as a row (storage.stage_summary): the driver keeps rows."""
    started = time.perf_counter()
    result = work(item)
    return receipt_row(commit(store, stage_name, prefixes, shard, result, time.perf_counter() - started))


def run_stage(
    store: Store,
    stage: Stage[Item],
    build_config: BuildConfig | None = None,
    max_in_flight: int | None = None,
    inline: bool = False,
) -> StageSummary:
    """Run every shard of `stage` that is not done; returns the stage's summary (a row per
    receipt, in item order). With the build's config, its step's progress artifact in Prefect follows it.
    `inline` runs the work in this process, one item after another, through the same commits and
    receipts: a runner without Ray (as datatrove's LocalPipelineExecutor), where a stage's own logic
    is what is checked and a Ray start would cost more than the work (tests).

    A shard whose worker dies is retried alone, up to SHARD_ATTEMPTS runs, while its siblings
    go on; then ShardFailed names it (a rerun redoes only shards without a receipt). An exception
    from `work` (bad input, say) is raised here unchanged after the tasks already running have
    finished and committed.
    """
    rows, summary = finished_rows(store, stage)
    total = len(stage.items)
    on_progress = progress(stage.name, build_config) if build_config else None
    if on_progress:
        on_progress(len(rows), total)
    done = set(rows.table().column("shard").to_pylist())
    todo = [item for item in stage.items if stage.shard_of(item) not in done]
    del done
    if todo:
        log.info("%s: %d of %d shards to run (%d already done)", stage.name, len(todo), total, len(rows))
        run = _run_inline if inline else _fan_out
        run(store, stage, todo, rows, total, on_progress, max_in_flight)
    if summary is None or todo:
        shards = _shards(stage)
        versions = [orjson.loads(v) for v in _receipt_versions(store, stage.name, shards).to_pylist()]
        table = in_order(rows.release(), shards.to_pylist())  # released: the rows are not held twice
        summary = StageSummary(stage.name, with_receipt_versions(table, versions))
        body = summary.to_parquet()
        store.put_bytes(layout.summary(stage.name), body)
        summary = StageSummary(stage.name, summary.table, sha256_bytes(body))
    return summary


def _run_inline(store, stage, todo, rows: ReceiptRows, total, on_progress, _max_in_flight) -> None:
    for item in todo:
        rows.add(_work_and_commit(store, stage.name, stage.outputs, stage.work, stage.shard_of(item), item))
        if on_progress:
            on_progress(len(rows), total)


def _fan_out(store, stage, todo, rows: ReceiptRows, total, on_progress, max_in_flight) -> None:
    """Run `todo` on Ray, at most `window` at once. A shard whose worker dies (a crash, an OOM
    kill, a lost node) goes to the back of the queue while its siblings go on; its last attempt
    runs alone, once nothing else is in flight (a shard killed for memory gets the node to
    itself). An exception from the work itself stops new submissions, as bad input fails the
    same way every time."""
    ensure_ray()
    remote = ray.remote(num_cpus=1, max_retries=0)(on_driver_code(_work_and_commit))  # attempts are counted here
    window = max_in_flight or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    store_ref, work_ref = ray.put(store), ray.put(stage.work)  # put once: each task gets refs
    queue, alone = deque(todo), deque()
    failed: dict[str, int] = {}  # shard: its attempts so far, for the shards that failed (none kept per shard done)
    pending: dict = {}  # ref: item
    failure: RayTaskError | None = None
    died: dict[str, str] = {}  # shard: why its last attempt failed

    def submit(item) -> None:
        shard = stage.shard_of(item)
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
                    row = ray.get(ready)
                except RayTaskError as error:
                    failure = failure or error
                    continue
                except RayError as error:
                    shard, reason = stage.shard_of(item), _first_line(error)
                    failed[shard] = attempt = failed.get(shard, 0) + 1
                    if attempt >= SHARD_ATTEMPTS:
                        died[shard] = reason
                        continue
                    log.warning(
                        "%s: shard %s failed on attempt %d of %d (%s); retried", stage.name, shard, attempt, SHARD_ATTEMPTS, reason
                    )
                    (alone if attempt == SHARD_ATTEMPTS - 1 else queue).append(item)
                    continue
                rows.add(row)
                if on_progress:
                    on_progress(len(rows), total)
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

"""One writer per folder: a lease object on the store that a second would-be writer sees.

    with acquire_lease(run_store, "lease.json", owner="flow run 'odd-fox'") as lease:
        ...              # long work; call lease.check() now and then: it raises LeaseLost
                         # if the lease was taken over (say, after a long network outage)

The lease is a small JSON object: a random holder id, the owner's description, host, pid,
when it was taken, the last heartbeat and when it expires. A daemon thread renews it every
ttl/3. A second `acquire_lease` on the same key raises LeaseHeld, whose message names the
holder, unless the lease is stale: its expiry has passed (by the reader's clock, so hosts
need roughly synchronized clocks, NTP-level), or it was taken on this host by a process that
no longer exists. A stale lease is taken over; a released lease is deleted.

Every change is one of the store's compare-and-swap operations (Store.create, replace,
delete_version), so two racing writers never both win: on S3 conditional requests (If-None-Match,
If-Match), in a local folder read-compare-write under flock(2) (storage/store.py, storage/s3.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel, ConfigDict

from runtime.processes import process_alive, process_start
from storage.manifest import record_bytes
from storage.retry import retry_deadline
from storage.store import Store, StoreError, VersionConflict, check_key

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 120.0
# A takeover re-reads and retries when another acquirer changed the lease in between.
ACQUIRE_ATTEMPTS = 5


class LeaseHeld(StoreError):
    """Another live holder has the lease; the message names it."""


class LeaseLost(StoreError):
    """This process's lease was taken over or deleted by someone else while it was held."""


class LeaseRecord(BaseModel):
    """What the lease object holds."""

    model_config = ConfigDict(extra="forbid")

    holder: str  # random id of one acquisition
    owner: str  # who holds it, in words: "train-epoch flow run 'odd-fox' (…)"
    host: str
    pid: int
    pid_started: int | None  # the process's start time in clock ticks since boot (tells a reused pid apart)
    started: datetime
    heartbeat: datetime
    expires: datetime

    def describe(self) -> str:
        return (
            f"{self.owner} (host {self.host}, pid {self.pid}, holder {self.holder[:8]}, since "
            f"{_iso(self.started)}, last heartbeat {_iso(self.heartbeat)}, expires {_iso(self.expires)})"
        )


def _now() -> datetime:
    return datetime.now(timezone.utc)


Clock = Callable[[], datetime]  # the time leases are stamped and judged by (a test can pass its own)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def is_stale(record: LeaseRecord, clock: Clock = _now) -> bool:
    """Expired, or taken on this host by a process that is gone."""
    if clock() >= record.expires:
        return True
    return record.host == socket.gethostname() and not process_alive(record.pid, record.pid_started)


# --- the lease -------------------------------------------------------------------------------------


class Lease:
    """A held lease; renewed by a daemon thread until release(). Use as a context manager."""

    def __init__(self, store: Store, key: str, record: LeaseRecord, version: str, ttl_s: float, clock: Clock = _now):
        self.uri = store.url(key)
        self.record = record
        self.ttl_s = ttl_s
        self._clock = clock
        self._store, self._key = store, key
        self._version = version
        self._lost: str | None = None
        self._lock = threading.Lock()  # one change of the object at a time: a renewal or the release
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.uri}", daemon=True)
        self._thread.start()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """Raise LeaseLost if the lease is no longer ours: stop writing at once."""
        if self._lost is not None:
            raise LeaseLost(f"lease {self.uri} lost: {self._lost}; stop writing, another holder may be at work")

    def renew(self) -> None:
        """Move the heartbeat and the expiry forward (the heartbeat thread does this every ttl/3)."""
        with self._lock:
            self.check()
            now = self._clock()
            record = self.record.model_copy(
                update={"heartbeat": now, "expires": now + timedelta(seconds=self.ttl_s)}
            )
            try:
                self._version = self._store.replace(self._key, record_bytes(record), self._version)
            except VersionConflict:
                self._lost = "it was taken over or deleted by another process"
                log.error("lease %s lost: it was taken over or deleted by another process", self.uri)
                raise LeaseLost(f"lease {self.uri} lost: taken over or deleted by another process") from None
            self.record = record

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                with retry_deadline(self.ttl_s / 3):  # a renewal waits on the store until the next one is due
                    self.renew()
            except LeaseLost:
                return
            except StoreError as error:  # the store is unreachable: keep trying until the lease expires
                if self._clock() >= self.record.expires:
                    self._lost = f"it expired while the store was unreachable ({error})"
                    log.error("lease %s lost: %s", self.uri, self._lost)
                    return
                log.warning("lease %s: renewal failed, will retry: %s", self.uri, error)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease (unless someone else holds it by now)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._lost is not None:
                return
            self._lost = "released"
            try:
                self._store.delete_version(self._key, self._version)
            except VersionConflict:
                log.warning("lease %s was taken over before it was released; left as it is", self.uri)


def acquire_lease(store: Store, key: str, owner: str, ttl_s: float | None = None, clock: Clock = _now) -> Lease:
    """Take the lease at `key` in `store`, or raise LeaseHeld naming its live holder.

    `owner` says in words who is asking (shown to anyone who is refused). A stale lease
    (expired, or its process on this host gone) is taken over. `clock` stamps and judges
    expiry (UTC wall time; the heartbeat's pace, ttl_s/3, is always real time). The default
    ttl outlasts the store's own retries, so an outage the store rides out never costs the
    lease (a crashed holder on another host blocks a successor that long; on this host its
    missing process frees the lease at once).
    """
    if ttl_s is None:
        ttl_s = max(DEFAULT_TTL_S, store.outage_tolerance_s + DEFAULT_TTL_S / 2)
    if ttl_s <= 0:
        raise ValueError(f"lease ttl must be positive, got {ttl_s}")
    check_key(key)
    uri = store.url(key)
    for _ in range(ACQUIRE_ATTEMPTS):
        now = clock()
        record = LeaseRecord(
            holder=secrets.token_hex(16),
            owner=owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=process_start(os.getpid()),
            started=now,
            heartbeat=now,
            expires=now + timedelta(seconds=ttl_s),
        )
        data = record_bytes(record)
        try:
            return Lease(store, key, record, store.create(key, data), ttl_s, clock)
        except VersionConflict:
            pass
        current = store.get_versioned(key)
        if current is None:  # released in between: try to create it again
            continue
        held, version = current
        try:
            holder = LeaseRecord.model_validate_json(held)
        except ValueError as error:
            raise StoreError(f"{uri}: not a lease record ({error}); delete it if nothing else writes there") from None
        if not is_stale(holder, clock):
            raise LeaseHeld(
                f"{uri} is held by {holder.describe()}; refusing to start a second writer. "
                "If that holder is dead, its lease is taken over once it expires (at once from the same host)."
            )
        try:
            version = store.replace(key, data, version)
        except VersionConflict:  # another acquirer changed it first: look again
            continue
        log.warning("took over the stale lease %s from %s", uri, holder.describe())
        return Lease(store, key, record, version, ttl_s, clock)
    raise LeaseHeld(f"{uri}: could not take the lease, other processes keep changing it")

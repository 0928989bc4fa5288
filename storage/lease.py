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

Every change is a compare-and-swap, so two racing writers never both win:
- S3: conditional writes. PUT with `If-None-Match: *` creates the lease only if it does not
  exist; renewal, takeover (PUT) and release (DELETE) carry `If-Match: <ETag>` of the version
  read. AWS S3, SeaweedFS (checked: 412 PreconditionFailed on a lost race) and MinIO honour
  them. A server that ignored the headers would reopen a race window of one round trip
  between reading a lease and writing it.
- local folder: read-compare-write under an exclusive flock(2) on the lease's folder, which
  serializes the processes of one machine (not NFS clients on several machines).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import TypeVar

from botocore.client import BaseClient
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict

from storage.manifest import record_bytes, sha256_bytes
from storage.processes import process_alive, process_start
from storage.retry import retry_deadline
from storage.s3 import S3Store
from storage.store import LocalStore, ObjectNotFound, Store, StoreError, check_key

log = logging.getLogger(__name__)
T = TypeVar("T")

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


# --- compare-and-swap on one object ----------------------------------------------------------------


class _Conflict(Exception):
    """The object changed (or appeared, or vanished) since the version we read."""


class _VersionedObject(ABC):
    """One object whose changes succeed only from the expected version (else _Conflict)."""

    uri: str

    @abstractmethod
    def read(self) -> tuple[bytes, str] | None:
        """(content, version), or None if the object does not exist."""

    @abstractmethod
    def create(self, data: bytes) -> str:
        """Write the object if it does not exist; returns its version."""

    @abstractmethod
    def replace(self, data: bytes, version: str) -> str:
        """Overwrite the object if it is still at `version`; returns the new version."""

    @abstractmethod
    def delete(self, version: str) -> None:
        """Delete the object if it is still at `version`."""


class _LocalObject(_VersionedObject):
    """A file in a LocalStore; the version is the content's sha256, changes are serialized by flock."""

    def __init__(self, store: LocalStore, key: str):
        self.store, self.key, self.uri = store, key, store.url(key)
        self.folder = (store.root / key).parent

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # also releases the lock

    def _version(self) -> str | None:
        current = self.read()
        return None if current is None else current[1]

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = self.store.get_bytes(self.key)
        except ObjectNotFound:
            return None
        return data, sha256_bytes(data)

    def create(self, data: bytes) -> str:
        with self._locked():
            if self.store.exists(self.key):
                raise _Conflict
            self.store.put_bytes(self.key, data)
        return sha256_bytes(data)

    def replace(self, data: bytes, version: str) -> str:
        with self._locked():
            if self._version() != version:
                raise _Conflict
            self.store.put_bytes(self.key, data)
        return sha256_bytes(data)

    def delete(self, version: str) -> None:
        with self._locked():
            if self._version() != version:
                raise _Conflict
            self.store.delete(self.key)


def _precondition_failed(error: ClientError) -> bool:
    # 412: the If-Match / If-None-Match condition did not hold; 409: AWS's answer to a
    # conditional write racing another one on the same key.
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = error.response.get("Error", {}).get("Code")
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


class _S3Object(_VersionedObject):
    """An object in an S3Store; the version is its ETag, changes are conditional requests."""

    def __init__(self, store: S3Store, key: str):
        self.store, self.key, self.uri = store, key, store.url(key)

    def _send(self, action: str, send: Callable[[BaseClient, dict[str, str]], T]) -> T:
        # The store's retries and error translation (names the URI, never the credentials),
        # with a failed precondition turned into a conflict first.
        def conditional(client: BaseClient, target: dict[str, str]) -> T:
            try:
                return send(client, target)
            except ClientError as error:
                if _precondition_failed(error):
                    raise _Conflict from None
                raise

        return self.store.request(action, self.key, conditional)

    def read(self) -> tuple[bytes, str] | None:
        def get(client: BaseClient, target: dict[str, str]) -> tuple[bytes, str]:
            response = client.get_object(**target)
            return response["Body"].read(), response["ETag"]

        try:
            return self._send("read", get)
        except ObjectNotFound:
            return None

    def create(self, data: bytes) -> str:
        return self._send("create", lambda client, target: client.put_object(**target, Body=data, IfNoneMatch="*")["ETag"])

    def replace(self, data: bytes, version: str) -> str:
        try:
            return self._send("write", lambda client, target: client.put_object(**target, Body=data, IfMatch=version)["ETag"])
        except ObjectNotFound:  # deleted meanwhile
            raise _Conflict from None

    def delete(self, version: str) -> None:
        try:
            self._send("delete", lambda client, target: client.delete_object(**target, IfMatch=version))
        except ObjectNotFound:  # deleted meanwhile
            raise _Conflict from None


def _versioned(store: Store, key: str) -> _VersionedObject:
    check_key(key)
    if isinstance(store, LocalStore):
        return _LocalObject(store, key)
    if isinstance(store, S3Store):
        return _S3Object(store, key)
    raise TypeError(f"leases need a local folder or an S3 store, not {type(store).__name__} ({store.uri})")


# --- the lease -------------------------------------------------------------------------------------


def read_lease(store: Store, key: str) -> LeaseRecord | None:
    """The lease at `key`, or None if nobody holds it."""
    current = _versioned(store, key).read()
    return None if current is None else LeaseRecord.model_validate_json(current[0])


class Lease:
    """A held lease; renewed by a daemon thread until release(). Use as a context manager."""

    def __init__(self, target: _VersionedObject, record: LeaseRecord, version: str, ttl_s: float, clock: Clock = _now):
        self.uri = target.uri
        self.record = record
        self.ttl_s = ttl_s
        self._clock = clock
        self._target = target
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
                self._version = self._target.replace(record_bytes(record), self._version)
            except _Conflict:
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
                self._target.delete(self._version)
            except _Conflict:
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
    target = _versioned(store, key)
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
            return Lease(target, record, target.create(data), ttl_s, clock)
        except _Conflict:
            pass
        current = target.read()
        if current is None:  # released in between: try to create it again
            continue
        held, version = current
        try:
            holder = LeaseRecord.model_validate_json(held)
        except ValueError as error:
            raise StoreError(f"{target.uri}: not a lease record ({error}); delete it if nothing else writes there") from None
        if not is_stale(holder, clock):
            raise LeaseHeld(
                f"{target.uri} is held by {holder.describe()}; refusing to start a second writer. "
                "If that holder is dead, its lease is taken over once it expires (at once from the same host)."
            )
        try:
            version = target.replace(data, version)
        except _Conflict:  # another acquirer changed it first: look again
            continue
        log.warning("took over the stale lease %s from %s", target.uri, holder.describe())
        return Lease(target, record, version, ttl_s, clock)
    raise LeaseHeld(f"{target.uri}: could not take the lease, other processes keep changing it")

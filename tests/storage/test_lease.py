"""One writer per folder: leases on a local folder and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from storage.lease import LeaseHeld, LeaseLost, LeaseRecord, acquire_lease
from tests.storage.leases import read_lease
from storage.manifest import canonical_json
from tests.model.runs import wait_until

KEY = "runs/r1/lease.json"


def planted(store, host: str, pid: int, expires_in_s: float) -> LeaseRecord:
    """Write a lease as some other holder left it."""
    now = datetime.now(timezone.utc)
    record = LeaseRecord(
        holder="f" * 32, owner="a planted holder", host=host, pid=pid, pid_started=None,
        started=now - timedelta(hours=1), heartbeat=now - timedelta(minutes=1),
        expires=now + timedelta(seconds=expires_in_s),
    )
    store.put_bytes(KEY, canonical_json(record.model_dump(mode="json")))
    return record


def test_acquire_refuse_release(store):
    with acquire_lease(store, KEY, owner="job one") as lease:
        held = read_lease(store, KEY)
        assert held == lease.record
        assert (held.owner, held.host, held.pid) == ("job one", socket.gethostname(), os.getpid())
        with pytest.raises(LeaseHeld) as refused:
            acquire_lease(store, KEY, owner="job two")
        message = str(refused.value)
        assert "job one" in message and f"pid {os.getpid()}" in message and store.url(KEY) in message
        lease.check()
    assert read_lease(store, KEY) is None
    acquire_lease(store, KEY, owner="job two").release()


class SteppedClock:
    """A clock that moves only when the test moves it."""

    def __init__(self):
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def test_heartbeat_keeps_a_live_lease_from_expiring(store):
    # Expiry is judged by a clock that stands still while the heartbeat (every 0.3 s of real
    # time) renews, so a renewal a busy machine delays cannot let the lease lapse; without the
    # heartbeat, the lease is expired as soon as the clock moves past its first expiry.
    clock = SteppedClock()
    with acquire_lease(store, KEY, owner="beating", ttl_s=0.9, clock=clock) as lease:
        first = lease.record
        clock.advance(1.5)
        wait_until(lambda: read_lease(store, KEY).heartbeat == clock.now, 60, "a renewal after the first expiry")
        held = read_lease(store, KEY)
        assert held.holder == first.holder and held.expires > clock.now > first.expires
        with pytest.raises(LeaseHeld, match="beating"):
            acquire_lease(store, KEY, owner="intruder", ttl_s=0.9, clock=clock)


def test_expired_lease_is_taken_over(store, caplog):
    planted(store, host="another-machine", pid=1, expires_in_s=-1)
    with acquire_lease(store, KEY, owner="successor") as lease:
        assert read_lease(store, KEY).holder == lease.record.holder
    assert "took over the stale lease" in caplog.text and "a planted holder" in caplog.text


def test_unexpired_lease_of_another_host_is_respected(store):
    planted(store, host="another-machine", pid=os.getpid(), expires_in_s=60)
    with pytest.raises(LeaseHeld, match="a planted holder .*host another-machine"):
        acquire_lease(store, KEY, owner="me")


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(store, store_uri):
    # A real second process takes the lease and is killed without releasing it.
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from storage.lease import acquire_lease
            from storage.store import open_store
            lease = acquire_lease(open_store({store_uri!r}), {KEY!r}, owner="doomed job", ttl_s=3600)
            print("held", flush=True)
            time.sleep(3600)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"doomed job .*pid {holder.pid}"):
            acquire_lease(store, KEY, owner="second job")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with acquire_lease(store, KEY, owner="second job") as lease:  # expiry is an hour away: the dead pid decides
        assert read_lease(store, KEY).owner == "second job" == lease.record.owner


def test_a_lease_taken_over_meanwhile_is_lost_and_not_deleted(store):
    lease = acquire_lease(store, KEY, owner="slow job", ttl_s=0.6)
    intruder = planted(store, host="another-machine", pid=1, expires_in_s=60)
    deadline = time.monotonic() + 5
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseLost, match="taken over"):
        lease.check()
    lease.release()
    assert read_lease(store, KEY) == intruder


def test_racing_acquirers_have_exactly_one_winner(store):
    start = threading.Barrier(8)
    winners, refused = [], []

    def contend(i: int) -> None:
        start.wait()
        try:
            winners.append(acquire_lease(store, KEY, owner=f"racer {i}"))
        except LeaseHeld:
            refused.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 7
    assert read_lease(store, KEY).holder == winners[0].record.holder
    winners[0].release()

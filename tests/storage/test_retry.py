"""The store's transient-fault policy on S3, through a fault-injecting proxy in front of SeaweedFS
(tests/fixtures/faulty_proxy.py): reads that break off resume at the byte they reached, 5xx,
SlowDown and refused connections are ridden out, listings and multipart transfers survive them,
access errors and missing objects fail at once, the deadline holds, and an outage is logged once."""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from boto3.s3.transfer import TransferConfig

import storage.s3
from storage.retry import RETRY_ENV
from storage.s3 import READ_PIECE_BYTES, S3Store
from storage.store import ObjectNotFound, StoreAccessError, StoreError, open_store

MiB = 1 << 20


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def s3(s3_bucket_uri, faulty_s3) -> S3Store:
    """A fresh prefix, reached through the proxy."""
    return open_store(f"{s3_bucket_uri}/retry-{uuid.uuid4().hex[:8]}")


def gets(proxy, store: S3Store, key: str) -> list:
    """The proxy's log of GETs of one object."""
    path = f"/{store.bucket}/{store.bucket_key(key)}"
    return [seen for seen in proxy.requests if seen.method == "GET" and seen.path == path]


def resumed_from(seen, end: int) -> int:
    """Where a resumed GET starts; it must run to `end` (exclusive)."""
    start, last = re.fullmatch(r"bytes=(\d+)-(\d+)", seen.range).groups()
    assert int(last) == end - 1
    return int(start)


def outage_logs(caplog) -> tuple[list[str], list[str]]:
    records = [r for r in caplog.records if r.name == "storage.retry"]
    return (
        [r.getMessage() for r in records if r.levelno == logging.WARNING],
        [r.getMessage() for r in records if r.levelno == logging.INFO],
    )


@pytest.mark.parametrize("kind", ["reset", "short"])
def test_a_read_that_breaks_off_resumes_at_the_byte_it_reached(s3, faulty_s3, kind, tmp_path):
    data = payload(20 * MiB + 123)
    s3.put_bytes("obj", data)
    cut = 12 * MiB

    faulty_s3.inject(kind, count=1, methods=("GET",), path=s3.bucket_key("obj"), at_byte=cut)
    assert s3.get_bytes("obj") == data
    first, resumed = gets(faulty_s3, s3, "obj")
    assert (first.fault, first.range) == (kind, None)
    # The rest is asked for from the byte reached: the cut itself, or the end of the last whole
    # piece read (8 MiB; a reset can lose the piece in flight).
    assert resumed.fault is None and resumed_from(resumed, len(data)) in (READ_PIECE_BYTES, cut)

    faulty_s3.requests.clear()
    faulty_s3.inject(kind, count=1, methods=("GET",), path=s3.bucket_key("obj"), at_byte=cut)
    assert s3.get_range("obj", 100, 16 * MiB) == data[100 : 100 + 16 * MiB]
    first, resumed = gets(faulty_s3, s3, "obj")
    assert first.range == f"bytes=100-{100 + 16 * MiB - 1}"
    assert resumed_from(resumed, 100 + 16 * MiB) in (100 + READ_PIECE_BYTES, 100 + cut)

    for read in (lambda: s3.open_read("obj").read(), lambda: s3.download("obj", tmp_path / "copy").read_bytes()):
        faulty_s3.requests.clear()
        faulty_s3.inject(kind, count=1, methods=("GET",), path=s3.bucket_key("obj"), at_byte=cut)
        assert read() == data
        first, resumed = gets(faulty_s3, s3, "obj")
        assert 0 < resumed_from(resumed, len(data)) <= cut
    assert faulty_s3.injected[kind] == 4


def test_a_stalled_body_times_out_and_the_read_resumes(s3, faulty_s3, monkeypatch):
    monkeypatch.setattr(storage.s3, "READ_TIMEOUT_S", 1)
    monkeypatch.setattr(storage.s3, "_connections", {})  # a client with that timeout
    data = payload(10 * MiB, seed=3)
    s3.put_bytes("obj", data)
    faulty_s3.inject("stall", count=1, methods=("GET",), path=s3.bucket_key("obj"), at_byte=9 * MiB, stall_s=5)
    assert s3.get_bytes("obj") == data
    first, resumed = gets(faulty_s3, s3, "obj")
    assert first.fault == "stall" and resumed_from(resumed, len(data)) == READ_PIECE_BYTES


def test_5xx_and_slowdown_bursts_are_ridden_out(s3, faulty_s3, caplog):
    caplog.set_level(logging.INFO, logger="storage.retry")
    data = payload(1000, seed=4)
    # More in a row than botocore's own 5 attempts: the store's policy must carry them.
    faulty_s3.inject("503", count=8)
    s3.put_bytes("a", data)
    faulty_s3.inject("500", count=8)
    assert s3.get_bytes("a") == data
    faulty_s3.inject("slowdown", count=7)
    assert list(s3.list()) == ["a"] and s3.size("a") == len(data)
    faulty_s3.inject("503", duration=3)
    s3.delete("a")
    assert not s3.exists("a")
    assert faulty_s3.injected["503"] >= 9 and faulty_s3.injected["500"] == 8 and faulty_s3.injected["slowdown"] == 7
    warnings, infos = outage_logs(caplog)
    assert len(warnings) == len(infos) == 4  # one of each per burst, not one per attempt
    assert all("retrying for up to 300 s" in w for w in warnings)


def test_refused_connections_for_seconds_are_ridden_out(s3, faulty_s3, caplog):
    caplog.set_level(logging.INFO, logger="storage.retry")
    data = payload(MiB, seed=5)
    s3.put_bytes("obj", data)
    faulty_s3.inject("refuse", duration=6)
    started = time.monotonic()
    assert s3.get_bytes("obj") == data
    s3.put_bytes("obj2", data)
    assert time.monotonic() - started >= 5  # it did wait the refusal out
    assert faulty_s3.injected["refuse"] == 1
    warnings, infos = outage_logs(caplog)
    assert len(warnings) == 1 and "Could not connect to the endpoint URL" in warnings[0]
    assert len(infos) == 1 and float(re.search(r"after ([\d.]+) s", infos[0])[1]) >= 5


def test_one_warning_per_outage_whatever_the_threads_and_attempts(s3, faulty_s3, caplog):
    caplog.set_level(logging.INFO, logger="storage.retry")
    objects = {f"o{i}": payload(10_000, seed=i) for i in range(8)}
    for key, data in objects.items():
        s3.put_bytes(key, data)
    faulty_s3.inject("503", duration=4)
    with ThreadPoolExecutor(8) as pool:
        read = dict(zip(objects, pool.map(s3.get_bytes, objects)))
    assert read == objects
    assert faulty_s3.injected["503"] > 8 * 5  # every thread retried past botocore's attempts
    warnings, infos = outage_logs(caplog)
    assert len(warnings) == 1 and len(infos) == 1, (warnings, infos)


def test_access_denied_and_missing_objects_fail_at_once(s3, faulty_s3, monkeypatch):
    s3.put_bytes("obj", b"data")
    faulty_s3.requests.clear()
    with pytest.raises(ObjectNotFound):
        s3.get_bytes("missing")
    with pytest.raises(ObjectNotFound):
        s3.size("missing")
    assert len(faulty_s3.requests) == 2

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + uuid.uuid4().hex)
    for operation in (lambda: s3.get_bytes("obj"), lambda: s3.put_bytes("obj", b"x"), lambda: list(s3.list())):
        faulty_s3.requests.clear()
        with pytest.raises(StoreAccessError):
            operation()
        assert len(faulty_s3.requests) == 1  # one request: a retry would be refused the same way


@pytest.mark.parametrize("setting", ["environment", "profile"])
@pytest.mark.parametrize("kind", ["refuse", "503"])
def test_a_permanent_outage_fails_after_the_deadline_naming_the_uri(s3, faulty_s3, monkeypatch, tmp_path, kind, setting):
    if setting == "environment":
        monkeypatch.setenv(RETRY_ENV, "3")
    else:  # the AWS profile's key, read with the rest of the AWS configuration
        config = tmp_path / "aws-config"
        config.write_text("[default]\ntinyllama_store_retry_s = 3\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    s3.put_bytes("obj", b"data")
    faulty_s3.inject(kind, duration=600)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        s3.get_bytes("obj")
    waited = time.monotonic() - started
    assert 3 <= waited < 20
    message = str(caught.value)
    assert re.match(rf"cannot read {s3.url('obj')}: S3 endpoint {faulty_s3.url} unreachable or failing for \d+ s, "
                    r"past the retry deadline \(TINYLLAMA_STORE_RETRY_S=3; check AWS_ENDPOINT_URL\): ", message), message
    assert "\n" not in message


def test_a_listing_resumes_from_its_continuation_token(s3, faulty_s3, s3_endpoint):
    keys = [f"k/{i:05d}" for i in range(1100)]  # two pages of up to 1,000 keys
    client = s3_endpoint.client()  # straight to the server: faster, and not what is tested
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3.bucket, Key=s3.bucket_key(k), Body=b""), keys))
    faulty_s3.inject("503", count=7, path="continuation-token=")
    assert list(s3.list("k/")) == keys
    pages = [seen for seen in faulty_s3.requests if "list-type=2" in seen.query]
    assert faulty_s3.injected["503"] == 7 and len(pages) == 1 + 7 + 1
    tokens = {re.search(r"continuation-token=([^&]+)", seen.query)[1] for seen in pages[1:]}
    assert len(tokens) == 1  # every retry asked for the second page with the first page's token


def test_multipart_transfers_are_redone_while_parts_fail(s3_bucket_uri, faulty_s3, tmp_path):
    transfer = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)
    store = S3Store(s3_bucket_uri.removeprefix("s3://"), f"retry-{uuid.uuid4().hex[:8]}", transfer=transfer)
    source = tmp_path / "big.bin"
    source.write_bytes(payload(12 * MiB, seed=6))
    faulty_s3.inject("503", count=12, methods=("PUT",))  # parts and all: past botocore's attempts
    store.put_file("big.bin", source)
    assert faulty_s3.injected["503"] == 12
    faulty_s3.inject("reset", count=12, methods=("GET",))  # past s3transfer's 5 attempts per part
    copy = store.download("big.bin", tmp_path / "copy.bin")
    assert faulty_s3.injected["reset"] == 12
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()


def test_an_object_replaced_mid_read_is_an_error_not_a_splice(s3, faulty_s3, s3_endpoint):
    s3.put_bytes("obj", payload(3 * MiB, seed=7))
    faulty_s3.inject("reset", count=1, methods=("GET",), path=s3.bucket_key("obj"), at_byte=3 * MiB // 2)
    reader = s3.open_read("obj")  # its first GET is answered (and cut) before the object changes
    s3_endpoint.client().put_object(Bucket=s3.bucket, Key=s3.bucket_key("obj"), Body=payload(3 * MiB, seed=8))
    with pytest.raises(StoreError, match=f"cannot read {re.escape(s3.url('obj'))}: the object changed while it was being read"):
        reader.read()

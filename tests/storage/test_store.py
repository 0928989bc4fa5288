"""Object stores against a local folder and a real S3 server (SeaweedFS): every operation,
atomic writes, key validation, and the errors a user sees for bad keys, missing objects,
wrong credentials and an unreachable endpoint. Transient faults are in test_retry.py."""

from __future__ import annotations

import os
import pickle
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from storage.s3 import S3Store, s3_client
from storage.store import (
    InvalidKey,
    ListedObject,
    LocalStore,
    ObjectChanged,
    ObjectNotFound,
    Store,
    StoreAccessError,
    StoreError,
    VersionConflict,
    open_object,
    open_store,
)
from tests.builds import RequestCounter
from tests.fixtures.ports import free_port

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[2]
BAD_KEYS = ["../x", "a/../../x", "/etc/passwd", "a\\b", "", "a//b", "./a", "a/.", "a/"]


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def full_error_text(err: BaseException | None) -> str:
    """The messages of the error and of every error chained to it, as a logged traceback shows them."""
    texts = []
    while err is not None:
        texts.append("".join(traceback.format_exception_only(err)))
        err = err.__cause__ or err.__context__
    return "\n".join(texts)


def test_round_trip_of_every_operation(store: Store, tmp_path):
    store.put_bytes("a/b/obj.bin", b"\x00\x01binary")
    store.put_text("a/note.txt", "héllo")
    source = tmp_path / "source.bin"
    source.write_bytes(payload(3 * MiB))
    store.put_file("files/big.bin", source)

    assert store.get_bytes("a/b/obj.bin") == b"\x00\x01binary"
    assert store.get_text("a/note.txt") == "héllo"
    assert store.get_bytes("files/big.bin") == source.read_bytes()
    assert store.size("files/big.bin") == 3 * MiB
    assert store.size("a/note.txt") == len("héllo".encode())
    assert store.exists("a/note.txt") and not store.exists("a/none.txt")
    assert not store.exists("a")  # a folder is not an object

    store.put_bytes("a/note.txt", b"replaced")
    assert store.get_bytes("a/note.txt") == b"replaced"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b"" and store.size("empty") == 0

    local = store.download("files/big.bin", tmp_path / "cache" / "deep" / "big.bin")
    assert local == tmp_path / "cache" / "deep" / "big.bin"
    assert local.read_bytes() == source.read_bytes()
    assert temp_files(tmp_path / "cache") == []

    store.delete("a/note.txt")
    store.delete("a/note.txt")  # deleting a missing key is fine
    assert not store.exists("a/note.txt")
    assert list(store.list()) == ["a/b/obj.bin", "empty", "files/big.bin"]


def test_conditional_writes_succeed_only_from_the_version_read(store: Store):
    first = store.create("lease.json", b"one")
    with pytest.raises(VersionConflict, match="lease.json"):
        store.create("lease.json", b"two")
    assert store.get_versioned("lease.json") == (b"one", first)
    second = store.replace("lease.json", b"two", first)
    assert second != first and store.get_versioned("lease.json") == (b"two", second)
    with pytest.raises(VersionConflict, match="lease.json"):
        store.replace("lease.json", b"three", first)  # a stale version
    with pytest.raises(VersionConflict, match="lease.json"):
        store.delete_version("lease.json", first)
    assert store.get_bytes("lease.json") == b"two"
    store.delete_version("lease.json", second)
    assert store.get_versioned("lease.json") is None
    with pytest.raises(VersionConflict, match="lease.json"):
        store.replace("lease.json", b"again", second)  # deleted meanwhile


def test_a_local_path_only_for_a_local_folder(store: Store):
    store.put_bytes("a/b.txt", b"x")
    local = store.local_path("a/b.txt")
    if store.uri.startswith("file://"):
        assert local.read_bytes() == b"x" and store.local_path() == local.parents[1]
    else:
        assert local is None and store.local_path() is None


def test_list_by_prefix_is_sorted(store: Store):
    keys = ["x/1.json", "x/2.json", "x/y/3.json", "xa.json", "z.json", "d/a-b", "d/a/b", "d/a.b", "d/Z", "d/é"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert list(store.list()) == sorted(keys)
    assert list(store.list("x/")) == ["x/1.json", "x/2.json", "x/y/3.json"]
    assert list(store.list("x")) == ["x/1.json", "x/2.json", "x/y/3.json", "xa.json"]
    assert list(store.list("x/y")) == ["x/y/3.json"]
    assert list(store.list("d/a")) == ["d/a-b", "d/a.b", "d/a/b"]
    assert list(store.list("nothing/")) == []
    for bad in ["../", "/x", "a//", "a/../b/"]:
        with pytest.raises(InvalidKey):
            store.list(bad)


def test_a_folder_listing_names_only_the_folders_directly_under_the_prefix(store: Store):
    for key in ["x/1.json", "x/y/2.json", "x/y/z/3.json", "x/w/4.json", "xb/5.json", "top.json", "d/e/6.json"]:
        store.put_bytes(key, b"-")
    assert list(store.list_folders()) == ["d", "x", "xb"]
    assert list(store.list_folders("x")) == list(store.list_folders("x/")) == ["w", "y"]  # not xb's, not y/z
    assert list(store.list_folders("x/y")) == ["z"]
    assert list(store.list_folders("x/y/z")) == list(store.list_folders("nothing")) == []
    assert list(store.child("x").list_folders()) == ["w", "y"]  # relative to a child store's root
    assert list(store.child("d").list_folders("e")) == []
    for bad in ["../", "/x", "a//", "a/../b/"]:
        with pytest.raises(InvalidKey):
            store.list_folders(bad)


def test_an_s3_folder_listing_takes_a_page_per_1000_folders(s3_bucket_uri):
    from concurrent.futures import ThreadPoolExecutor

    from tests.builds import RequestCounter

    store = open_store(f"{s3_bucket_uri}/{uuid.uuid4().hex[:8]}/run")
    names = [f"step-{i:07d}" for i in range(1005)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: store.put_bytes(f"checkpoints/{name}/COMMIT", b"{}"), names))
    store.put_bytes("checkpoints/step-0000001/__0_0.distcp", b"")  # a folder's files are not listed
    counter = RequestCounter()
    assert list(store.list_folders("checkpoints")) == names
    assert counter.take() == {"ListObjectsV2": 2}


def test_ranged_reads(store: Store):
    data = payload(1000)
    store.put_bytes("r.bin", data)
    assert store.get_range("r.bin", 0, 10) == data[:10]
    assert store.get_range("r.bin", 500, 123) == data[500:623]
    assert store.get_range("r.bin", 990, 10) == data[990:]
    assert store.get_range("r.bin", 995, 10) == data[995:]  # short only at the end
    assert store.get_range("r.bin", 1000, 5) == b""
    assert store.get_range("r.bin", 5000, 5) == b""
    assert store.get_range("r.bin", 5, 0) == b""
    store.put_bytes("empty", b"")
    assert store.get_range("empty", 0, 10) == b""
    with pytest.raises(StoreError, match="invalid range"):
        store.get_range("r.bin", -1, 5)
    with pytest.raises(ObjectNotFound):
        store.get_range("missing.bin", 0, 10)
    with pytest.raises(ObjectNotFound):
        store.get_range("missing.bin", 0, 0)


def test_streaming_read(store: Store):
    data = payload(3 * MiB + 17)
    store.put_bytes("s.bin", data)
    chunks = []
    with store.open_read("s.bin") as reader:
        assert reader.read(5) == data[:5]  # a full read(n), like a file
        while chunk := reader.read(64 * 1024):
            chunks.append(chunk)
    assert reader.closed
    assert data[:5] + b"".join(chunks) == data
    with store.open_read("s.bin") as reader:
        assert reader.read() == data


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_that_escape_the_root_are_rejected(store: Store, key, tmp_path):
    operations = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, __file__),
        lambda: store.get_bytes(key),
        lambda: store.get_range(key, 0, 1),
        lambda: store.open_read(key),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.delete(key),
        lambda: store.download(key, tmp_path / "out"),
        lambda: store.url(key),
    ]
    for operation in operations:
        with pytest.raises(InvalidKey):
            operation()
    assert list(store.list()) == []
    assert not (tmp_path / "out").exists()


def test_local_symlink_out_of_the_root_is_rejected(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "file-link").symlink_to(outside / "secret.txt")
    (root / "inside.txt").write_text("ok")
    store = LocalStore(root)

    for key in ["link/secret.txt", "file-link", "link/new.txt"]:
        with pytest.raises(InvalidKey, match="outside the store root"):
            store.get_bytes(key)
        with pytest.raises(InvalidKey):
            store.put_bytes(key, b"x")
    with pytest.raises(InvalidKey):
        store.list("link/")
    assert list(store.list()) == ["inside.txt"]
    assert list(store.list_folders()) == []  # the linked folder is outside the root
    with pytest.raises(InvalidKey):
        store.list_folders("link")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_a_child_store_through_a_symlink_out_of_the_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    (root / "datasets").mkdir(parents=True)
    (root / "datasets" / "sample").symlink_to(outside, target_is_directory=True)
    (root / "datasets" / "inner").mkdir()
    (root / "datasets" / "alias").symlink_to(root / "datasets" / "inner", target_is_directory=True)
    store = LocalStore(root)

    for prefix in ["datasets/sample", "datasets/sample/build/", "datasets/sample/a/b"]:
        with pytest.raises(InvalidKey, match="outside the store root"):
            store.child(prefix)
    with pytest.raises(InvalidKey):
        store.child("..")
    store.child("datasets/alias").put_bytes("x.txt", b"ok")  # a symlink that stays inside is fine
    assert (root / "datasets" / "inner" / "x.txt").read_bytes() == b"ok"
    assert list(outside.iterdir()) == []


def test_a_listing_gives_each_objects_size_and_version(store: Store):
    store.put_bytes("a/one.bin", b"1")
    store.put_bytes("a/two.bin", b"22")
    listed = list(store.list_info("a/"))
    assert [(i.key, i.size) for i in listed] == [("a/one.bin", 1), ("a/two.bin", 2)]
    assert listed == [store.info("a/one.bin"), store.info("a/two.bin")]
    before = store.info("a/two.bin").version
    assert before and all(before.values())
    store.put_bytes("a/two.bin", b"33")  # same size, new content: a new version
    assert store.info("a/two.bin").version != before
    with pytest.raises(ObjectNotFound):
        store.info("a/none.bin")


def test_a_write_returns_what_a_listing_then_shows_without_asking(store: Store, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(payload(3 * MiB))
    counter = RequestCounter()
    written = [store.put_bytes("w/a.bin", b"12345"), store.put_text("w/b.txt", "héllo"), store.put_file("w/c.bin", source)]
    sent = counter.take()
    assert written == list(store.list_info("w/"))  # key, size and version, as a rerun's listing compares them
    assert [w.size for w in written] == [5, len("héllo".encode()), 3 * MiB]
    if store.local_path() is None:
        assert sent == {"PutObject": 3}, sent  # the PUT's answer carries the ETag: no HEAD after it
    again = store.put_bytes("w/a.bin", b"54321")  # same size, new content
    assert again.version != written[0].version and again == store.info("w/a.bin")


def test_a_read_that_expects_a_version_refuses_another_on_its_own_answer(store: Store, tmp_path):
    store.put_bytes("in/a.bin", b"first")
    pinned = store.info("in/a.bin")
    counter = RequestCounter()
    with store.open_read("in/a.bin", expect=pinned) as reader:
        assert reader.read() == b"first"
    assert store.download("in/a.bin", tmp_path / "a.bin", expect=pinned).read_bytes() == b"first"
    if store.local_path() is None:
        assert counter.take() == {"GetObject": 2}  # the check rides on each read's answer

    store.put_bytes("in/a.bin", b"second!")
    version = next(iter(pinned.version))  # "etag", or a local file's "mtime_ns"
    changed = rf"{re.escape(store.url('in/a.bin'))} changed \(size 5 -> 7, .*{version} "
    with pytest.raises(ObjectChanged, match=changed):
        store.open_read("in/a.bin", expect=pinned)
    with pytest.raises(ObjectChanged, match=changed):
        store.download("in/a.bin", tmp_path / "b.bin", expect=pinned)
    assert not (tmp_path / "b.bin").exists() and temp_files(tmp_path) == []
    size_only = ListedObject("in/a.bin", 7, {"sha256": "not a store's version"})  # only what both know is compared
    with store.open_read("in/a.bin", expect=size_only) as reader:
        assert reader.read() == b"second!"


def test_s3_multipart_objects_cost_one_head_to_write_and_none_to_download(s3_bucket_uri, tmp_path):
    transfer = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    store = S3Store(s3_bucket_uri.removeprefix("s3://"), f"multipart-{uuid.uuid4().hex[:8]}", transfer=transfer)
    source = tmp_path / "big.bin"
    source.write_bytes(payload(12 * MiB, seed=3))
    counter = RequestCounter()
    written = store.put_file("big.bin", source)
    assert counter.take()["HeadObject"] == 1  # s3transfer keeps the multipart upload's ETag to itself
    assert written == store.info("big.bin") and written.version["etag"].endswith("-3")
    counter.take()
    copy = store.download("big.bin", tmp_path / "copy.bin", expect=written)
    assert copy.read_bytes() == source.read_bytes()
    requests = counter.take()
    assert "HeadObject" not in requests and requests["GetObject"] == 1 + 3, requests  # the first answer, then 3 parts
    store.put_bytes("big.bin", payload(12 * MiB, seed=4))
    with pytest.raises(ObjectChanged, match="etag"):
        store.download("big.bin", tmp_path / "stale.bin", expect=written)


def test_missing_key_names_the_uri(store: Store, tmp_path):
    url = store.url("no/such.bin")
    for operation in [
        lambda: store.get_bytes("no/such.bin"),
        lambda: store.size("no/such.bin"),
        lambda: store.open_read("no/such.bin"),
        lambda: store.download("no/such.bin", tmp_path / "dl" / "such.bin"),
    ]:
        with pytest.raises(ObjectNotFound) as caught:
            operation()
        assert str(caught.value) == f"no such object: {url}"
        assert isinstance(caught.value, FileNotFoundError)
    assert not store.exists("no/such.bin")
    assert not (tmp_path / "dl").exists() or list((tmp_path / "dl").iterdir()) == []


def _limit_file_size() -> None:
    """In the child: files may not grow past 1 MiB; a write beyond fails with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_local_failed_write_leaves_no_partial_object(tmp_path):
    """A real mid-write failure (the file-size limit, in a child process) keeps the old object
    and leaves no temp file."""
    store = LocalStore(tmp_path / "store")
    store.put_bytes("obj.bin", b"old")
    writer = (
        "import errno, sys\n"
        "from storage.store import LocalStore\n"
        "store = LocalStore(sys.argv[1])\n"
        "for key in ('obj.bin', 'new.bin'):\n"
        "    try:\n"
        "        store.put_bytes(key, bytes(4 << 20))\n"
        "    except OSError as err:\n"
        "        print(key, errno.errorcode[err.errno])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", writer, str(store.root)],
        cwd=REPO_ROOT,
        preexec_fn=_limit_file_size,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.split("\n")[:2] == ["obj.bin EFBIG", "new.bin EFBIG"], result.stderr
    assert store.get_bytes("obj.bin") == b"old"
    assert not store.exists("new.bin")
    assert temp_files(tmp_path) == []
    assert list(store.list()) == ["obj.bin"]


def test_s3_multipart_upload_is_whole_or_absent(s3_bucket_uri, tmp_path):
    """put_file above the multipart threshold: readers polling meanwhile never see part of it."""
    bucket = s3_bucket_uri.removeprefix("s3://")
    transfer = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    store = S3Store(bucket, f"multipart-{uuid.uuid4().hex[:8]}", transfer=transfer)
    source = tmp_path / "big.bin"
    source.write_bytes(payload(20 * MiB, seed=1))

    seen_sizes: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                seen_sizes.append(store.size("big.bin"))
            except ObjectNotFound:
                seen_sizes.append(-1)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        store.put_file("big.bin", source)
    finally:
        done.set()
        reader.join()
    assert set(seen_sizes) <= {-1, 20 * MiB}
    head = s3_client().head_object(Bucket=bucket, Key=f"{store.prefix}/big.bin")
    assert head["ETag"].strip('"').endswith("-4")  # four 5 MiB parts: it was a multipart upload
    assert store.get_bytes("big.bin") == source.read_bytes()
    assert store.download("big.bin", tmp_path / "copy.bin").read_bytes() == source.read_bytes()
    assert s3_client().list_multipart_uploads(Bucket=bucket, Prefix=store.prefix).get("Uploads", []) == []

    store.put_bytes("big-bytes.bin", payload(12 * MiB, seed=2))  # put_bytes goes multipart too
    assert store.get_bytes("big-bytes.bin") == payload(12 * MiB, seed=2)
    head = s3_client().head_object(Bucket=bucket, Key=f"{store.prefix}/big-bytes.bin")
    assert head["ETag"].strip('"').endswith("-3")


@pytest.mark.parametrize(
    "variable, wrong_value",
    [("AWS_SECRET_ACCESS_KEY", "wrong-secret-" + uuid.uuid4().hex), ("AWS_ACCESS_KEY_ID", "nobody")],
    ids=["wrong-secret", "wrong-key-id"],  # fixed ids: each pytest-xdist worker draws its own secret
)
def test_wrong_credentials_give_a_clear_error_without_the_secret(s3_bucket_uri, monkeypatch, variable, wrong_value):
    good = S3Store(s3_bucket_uri.removeprefix("s3://"), "creds")
    good.put_bytes("obj", b"data")
    real_secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv(variable, wrong_value)
    store = open_store(f"{s3_bucket_uri}/creds")
    for operation in [lambda: store.get_bytes("obj"), lambda: store.put_bytes("obj", b"x"), lambda: store.size("obj")]:
        with pytest.raises(StoreAccessError) as caught:  # not retried: a retry would fail the same way
            operation()
        message = str(caught.value)
        assert message.startswith("access denied: cannot ")
        assert store.url("obj") in message
        text = full_error_text(caught.value)
        assert real_secret not in text and os.environ["AWS_SECRET_ACCESS_KEY"] not in text
    monkeypatch.undo()
    assert good.get_bytes("obj") == b"data"  # the right credentials still work


def test_missing_credentials_and_bucket(s3_bucket_uri, monkeypatch, tmp_path):
    store = open_store("s3://no-such-bucket-tinyllama/p")
    with pytest.raises(StoreAccessError, match="the bucket 'no-such-bucket-tinyllama' does not exist") as caught:
        store.get_bytes("k")
    assert "s3://no-such-bucket-tinyllama/p/k" in str(caught.value)

    for variable in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreAccessError, match="no usable AWS credentials") as caught:
        open_store(s3_bucket_uri).get_bytes("k")
    assert f"{s3_bucket_uri}/k" in str(caught.value)


def test_unreachable_endpoint_fails_after_the_retry_deadline_naming_endpoint_and_uri(s3_bucket_uri, monkeypatch):
    closed_port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("TINYLLAMA_STORE_RETRY_S", "2")
    store = open_store(f"{s3_bucket_uri}/offline")
    for operation in [lambda: store.get_bytes("k"), lambda: store.put_bytes("k", b"x"), lambda: list(store.list())]:
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            operation()
        assert time.monotonic() - started < 30
        message = str(caught.value)
        assert f"127.0.0.1:{closed_port}" in message and "AWS_ENDPOINT_URL" in message
        assert f"{s3_bucket_uri}/offline" in message and "TINYLLAMA_STORE_RETRY_S=2" in message
        assert "\n" not in message


def test_open_store_uris(tmp_path, s3_bucket_uri):
    local = open_store(f"file://{tmp_path}/a b")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "a b"
    assert open_store(local.uri).root == local.root  # URIs round-trip, spaces included
    assert open_store(tmp_path / "plain").root == tmp_path / "plain"
    assert open_store("relative/dir").root == Path.cwd() / "relative" / "dir"

    bucket = s3_bucket_uri.removeprefix("s3://")
    s3 = open_store(f"s3://{bucket}/pre/fix/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == (bucket, "pre/fix")
    assert s3.uri == f"s3://{bucket}/pre/fix"
    assert s3.url("k.json") == f"s3://{bucket}/pre/fix/k.json"
    assert open_store(f"s3://{bucket}").uri == f"s3://{bucket}"
    child = s3.child("runs/r1/")
    assert child.uri == f"s3://{bucket}/pre/fix/runs/r1"
    child.put_bytes("x", b"1")
    assert s3.get_bytes("runs/r1/x") == b"1"

    with pytest.raises(StoreError, match="unsupported store URI scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="absolute path"):
        open_store("file://relative")
    with pytest.raises(StoreError, match="invalid S3 bucket name"):
        open_store("s3://")
    with pytest.raises(InvalidKey):
        open_store(f"s3://{bucket}/a/../b")
    with pytest.raises(StoreError, match="must not hold credentials") as caught:
        open_store("s3://AKIAKEY:topsecret@bucket/x")
    assert "topsecret" not in full_error_text(caught.value)


def test_open_object_splits_store_and_key(tmp_path, s3_bucket_uri):
    bucket = s3_bucket_uri.removeprefix("s3://")
    store, key = open_object(f"s3://{bucket}/datasets/d/manifest.json")
    assert (store.uri, key) == (f"s3://{bucket}/datasets/d", "manifest.json")
    store, key = open_object(f"s3://{bucket}/m.json")
    assert (store.uri, key) == (f"s3://{bucket}", "m.json")
    store, key = open_object(f"file://{tmp_path}/m.json")
    assert (store.uri, key) == (f"file://{tmp_path}", "m.json")
    store, key = open_object(tmp_path / "sub" / "m.json")
    assert (store.root, key) == (tmp_path / "sub", "m.json")
    store, key = open_object("m.json")
    assert (store.root, key) == (Path.cwd(), "m.json")
    for bad in [f"s3://{bucket}", f"s3://{bucket}/", f"{tmp_path}/", "s3:///m.json", f"{tmp_path}/.."]:
        with pytest.raises(InvalidKey):
            open_object(bad)


def test_store_pickles_without_a_client(store: Store, tmp_path):
    store.put_bytes("p.txt", b"pickled")
    data = pickle.dumps(store)
    assert len(data) < 2048
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "not set").encode() not in data
    clone = pickle.loads(data)
    assert clone.uri == store.uri
    assert clone.get_bytes("p.txt") == b"pickled"
    source = tmp_path / "upload.bin"  # the transfer settings survive too (Ray ships stores to workers)
    source.write_bytes(b"uploaded")
    clone.put_file("u.bin", source)
    assert store.get_bytes("u.bin") == b"uploaded"


def test_s3_client_settings_come_from_the_environment(s3_bucket_uri, monkeypatch):
    client = s3_client()
    assert client is s3_client()  # one cached client per process and configuration
    assert client.meta.endpoint_url == os.environ["AWS_ENDPOINT_URL"]
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}
    assert client.meta.config.connect_timeout <= 5 and client.meta.config.read_timeout <= 30
    assert client.meta.config.s3["addressing_style"] == "path"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert s3_client().meta.config.retries["total_max_attempts"] == 2
    monkeypatch.setenv("TINYLLAMA_STORE_RETRY_S", "soon")
    with pytest.raises(StoreError, match="TINYLLAMA_STORE_RETRY_S must be a number of seconds") as caught:
        open_store(s3_bucket_uri).exists("k")
    assert s3_bucket_uri in str(caught.value)
    monkeypatch.delenv("TINYLLAMA_STORE_RETRY_S")
    monkeypatch.setenv("TINYLLAMA_S3_ADDRESSING_STYLE", "sideways")
    with pytest.raises(StoreError, match="must be path, virtual or auto") as caught:
        open_store(s3_bucket_uri).exists("k")
    assert s3_bucket_uri in str(caught.value)

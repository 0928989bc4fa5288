"""An S3 (or S3-compatible) bucket prefix as a Store, through boto3.

Endpoint, region and credentials come from the standard AWS environment and config files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE,
~/.aws/config). Addressing is path-style when a custom endpoint is configured (what
SeaweedFS, MinIO and most S3-compatible servers need); TINYLLAMA_S3_ADDRESSING_STYLE
(path | virtual | auto) or `s3 = addressing_style = ...` in the profile overrides that.

Retries, in two layers: botocore's "standard" mode (MAX_ATTEMPTS attempts unless
AWS_RETRY_MODE / AWS_MAX_ATTEMPTS or the profile's retry_mode / max_attempts say otherwise)
absorbs a blip of a second in each request; storage/retry.py's policy carries every call of
the store through an outage of minutes (TINYLLAMA_STORE_RETRY_S), including what botocore
does not retry: a response body that breaks off (a GET resumes from the byte it reached, with a
Range request that must match the first answer's ETag), a listing (it resumes from its last
continuation token) and whole multipart transfers. Access errors and missing objects fail at
once.

Each process builds one client per AWS configuration, on first use, and shares it between
threads (boto3 clients are thread-safe). The store object holds no client, so it pickles
cheaply and Ray can ship it to workers, which build their own.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotocoreConnectionError
from s3transfer.exceptions import RetriesExceededError
from s3transfer.futures import TransferFuture
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber

from storage.retry import (
    RETRY_ENV,
    RETRY_PROFILE_KEY,
    OutageTooLong,
    RetryPolicy,
    ShortBody,
    deadline_setting,
    one_line,
)
from storage.store_base import (
    CREDENTIALS_IN_URI,
    ListedObject,
    ObjectChanged,
    ObjectNotFound,
    Store,
    StoreAccessError,
    StoreError,
    VersionConflict,
    atomic_output,
    check_expected,
    check_key,
    check_prefix,
    check_range,
    join_key,
)

T = TypeVar("T")

ADDRESSING_STYLE_ENV = "TINYLLAMA_S3_ADDRESSING_STYLE"
RETRY_MODE = "standard"
MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 5
# Longest wait for the next bytes of a response; a stalled server fails rather than hangs.
READ_TIMEOUT_S = 30
# At least the transfer concurrency, so parallel parts never queue for a connection.
MAX_POOL_CONNECTIONS = 32
DELETE_BATCH = 1000  # keys of one DeleteObjects request (S3's limit)
MiB = 1 << 20
# Objects from 64 MiB up go as a multipart upload (and download as parallel ranged GETs)
# in 16 MiB parts, 10 at a time; below that a single PUT / GET. 16 MiB parts keep a
# 100 GB object under S3's 10 000-part limit.
DEFAULT_TRANSFER = TransferConfig(
    multipart_threshold=64 * MiB,
    multipart_chunksize=16 * MiB,
    max_concurrency=10,
    io_chunksize=1 * MiB,
)
READ_BUFFER_BYTES = 1 * MiB
# A whole read (get_bytes, download) takes the body in pieces of this size: a read that breaks
# off loses one piece at most, and an object up to one piece is read without a copy.
READ_PIECE_BYTES = 8 * MiB
_TRANSFER_SETTINGS = (
    "multipart_threshold", "multipart_chunksize", "max_concurrency", "io_chunksize",
    "num_download_attempts", "max_io_queue", "use_threads", "max_bandwidth",
)

# What S3 accepts, plus the upper case and '_' of legacy us-east-1 buckets.
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")
_ACCESS_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "403",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}

# Everything in the environment that changes which client we need; the profile files are
# read when a client is built.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
    ADDRESSING_STYLE_ENV,
    RETRY_ENV,
)


@dataclass(frozen=True)
class _Connection:
    """A client and the policy its calls are retried under, for one AWS configuration."""

    client: BaseClient
    endpoint: str  # without credentials, for messages
    policy: RetryPolicy


_connections: dict[tuple[str | int | None, ...], _Connection] = {}
_connections_lock = threading.Lock()


def s3_client() -> BaseClient:
    """This process's S3 client for the current AWS environment, built on first use."""
    return _connection().client


def _connection() -> _Connection:
    # The pid is part of the key: a forked child must not reuse its parent's connections.
    settings = (os.getpid(), *(os.environ.get(name) for name in _CLIENT_ENV))
    connection = _connections.get(settings)
    if connection is None:
        with _connections_lock:
            connection = _connections.get(settings)
            if connection is None:
                connection = _connections[settings] = _new_connection()
    return connection


def _new_connection() -> _Connection:
    core = botocore.session.get_session()
    # Nothing here reads a timestamp (versions are ETags): keep them as text. Parsing each listed
    # object's LastModified is most of a listing's CPU (~0.3 s a 1,000-key page against ~0.02 s).
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    profile = core.get_scoped_config()
    s3_profile = profile.get("s3") if isinstance(profile.get("s3"), dict) else {}
    custom_endpoint = any(
        (
            os.environ.get("AWS_ENDPOINT_URL_S3"),
            os.environ.get("AWS_ENDPOINT_URL"),
            profile.get("endpoint_url"),
            s3_profile.get("endpoint_url"),
        )
    )
    style = os.environ.get(ADDRESSING_STYLE_ENV) or s3_profile.get("addressing_style")
    if style is None and custom_endpoint:
        style = "path"
    if style not in (None, "path", "virtual", "auto"):
        raise StoreError(f"{ADDRESSING_STYLE_ENV} must be path, virtual or auto, got {style!r}")
    attempts = os.environ.get("AWS_MAX_ATTEMPTS") or profile.get("max_attempts") or MAX_ATTEMPTS
    if not str(attempts).isdigit():
        raise StoreError(f"AWS_MAX_ATTEMPTS (or the profile's max_attempts) must be a whole number, got {attempts!r}")
    retries = {
        "mode": os.environ.get("AWS_RETRY_MODE") or profile.get("retry_mode") or RETRY_MODE,
        "total_max_attempts": int(attempts),  # "max_attempts" would count retries only
    }
    source = RETRY_ENV if os.environ.get(RETRY_ENV) else f"the AWS profile's {RETRY_PROFILE_KEY}"
    try:
        deadline_s = deadline_setting(os.environ.get(RETRY_ENV) or profile.get(RETRY_PROFILE_KEY), source)
    except ValueError as error:
        raise StoreError(str(error)) from None
    config = Config(
        retries=retries,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=MAX_POOL_CONNECTIONS,
        tcp_keepalive=True,
        s3={"addressing_style": style} if style else None,
    )
    client = boto3.session.Session(botocore_session=core).client("s3", config=config)
    return _Connection(client, _public_endpoint(client), RetryPolicy(deadline_s))


def _public_endpoint(client: BaseClient) -> str:
    """The client's endpoint without any user:password part, for messages."""
    parts = urlsplit(client.meta.endpoint_url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class S3Store(Store):
    """Objects under `s3://bucket/prefix`; writes are single PUTs or completed multipart uploads.

    Every call goes through `call`: the transient-fault policy of storage/retry.py, then the
    translation of what is left into StoreErrors that name the object."""

    def __init__(self, bucket: str, prefix: str = "", transfer: TransferConfig = DEFAULT_TRANSFER):
        if "@" in bucket or ":" in bucket:
            raise StoreError(CREDENTIALS_IN_URI)  # never echo it: this looks like key:secret@bucket
        if not _BUCKET_NAME.fullmatch(bucket):
            raise StoreError(f"invalid S3 bucket name {bucket!r} in s3://{bucket}/{prefix}")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = check_key(prefix) if prefix else ""
        self.transfer = transfer
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    def __reduce__(self):
        # TransferConfig does not survive pickling (its preferred_transfer_client comes back
        # as a bare object), and Ray ships stores to its workers: rebuild it from its settings.
        settings = {name: getattr(self.transfer, name) for name in _TRANSFER_SETTINGS}
        return _unpickle_s3store, (self.bucket, self.prefix, settings)

    def bucket_key(self, key: str) -> str:
        """The object's key in the bucket: the store's prefix and `key`."""
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    def call(
        self,
        action: str,
        uri: str,
        operation: Callable[[BaseClient], T],
        on_retry: Callable[[], None] | None = None,
    ) -> T:
        """operation(client) under the transient-fault policy, with what is left of its boto3 errors
        turned into StoreErrors that name `uri`; `on_retry` runs before each retry."""
        with self._errors(action, uri) as connection:
            return connection.policy.call(lambda: operation(connection.client), connection.endpoint, f"{action} {uri}", on_retry)

    @contextlib.contextmanager
    def _errors(self, action: str, uri: str) -> Iterator[_Connection]:
        """The S3 connection, for a block whose boto3 errors become StoreErrors that name `uri`."""
        try:
            connection = _connection()
        except (StoreError, BotoCoreError) as err:  # a bad setting or profile in the AWS environment
            raise StoreError(f"cannot {action} {uri}: {err}") from err
        try:
            yield connection
        except OutageTooLong as err:
            raise StoreError(
                f"cannot {action} {uri}: S3 endpoint {connection.endpoint} unreachable or failing for "
                f"{err.waited_s:.0f} s, past the retry deadline ({RETRY_ENV}={err.deadline_s:g}; check "
                f"AWS_ENDPOINT_URL): {self._describe(err.error)}"
            ) from err
        except ClientError as err:
            error = err.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                raise StoreAccessError(f"cannot {action} {uri}: the bucket {self.bucket!r} does not exist") from err
            if code in _NOT_FOUND_CODES or status == 404:
                raise ObjectNotFound(f"no such object: {uri}") from err
            if code in _ACCESS_DENIED_CODES or status == 403:
                raise StoreAccessError(
                    f"access denied: cannot {action} {uri} ({code or status}); check the AWS credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's permissions"
                ) from err
            if code == "PreconditionFailed" and action == "read":  # a resumed GET's If-Match
                raise StoreError(f"cannot {action} {uri}: the object changed while it was being read") from err
            raise StoreError(f"cannot {action} {uri}: {self._describe(err)}") from err
        except (NoCredentialsError, PartialCredentialsError) as err:
            raise StoreAccessError(
                f"cannot {action} {uri}: no usable AWS credentials ({err}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            ) from err
        except (BotocoreConnectionError, HTTPClientError, RetriesExceededError) as err:
            raise StoreError(
                f"cannot {action} {uri}: S3 endpoint {connection.endpoint} unreachable or failing "
                f"(check AWS_ENDPOINT_URL): {err}"
            ) from err
        except BotoCoreError as err:
            raise StoreError(f"cannot {action} {uri}: {err}") from err

    @staticmethod
    def _describe(error: BaseException) -> str:
        if isinstance(error, ClientError):
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = error.response.get("Error", {}).get("Code", "")
            message = error.response.get("Error", {}).get("Message", "")
            return one_line(f"{code} (HTTP {status}) {message}")
        return one_line(error)

    def _transfer(self, action: str, key: str, run: Callable[[TransferManager], TransferFuture]) -> None:
        """A transfer manager's upload or download, redone whole while the store is failing
        (its parts are retried by botocore and s3transfer first)."""

        def attempt(client: BaseClient) -> None:
            with create_transfer_manager(client, self.transfer) as manager:
                run(manager).result()

        self.call(action, self.url(key), attempt)

    # A single PUT's answer carries the object's ETag, and its size is the bytes sent (botocore
    # sends a checksum of them that the server verifies). s3transfer does not hand back the ETag of
    # a multipart upload: an object of multipart_threshold bytes or more costs a HEAD, so a write
    # asks at most one request per 64 MiB written for its version.
    def put_bytes(self, key: str, data: bytes) -> ListedObject:
        if len(data) < self.transfer.multipart_threshold:
            return self._put(key, len(data), data)
        self._transfer("write", key, lambda manager: manager.upload(io.BytesIO(data), self.bucket, self.bucket_key(key)))
        return self.info(key)

    def put_file(self, key: str, path: str | os.PathLike) -> ListedObject:
        size = os.stat(path).st_size  # a missing source fails here naming the file; inside s3transfer it is not named
        if size < self.transfer.multipart_threshold:
            with open(path, "rb") as body:
                return self._put(key, size, body)
        self._transfer("write", key, lambda manager: manager.upload(os.fspath(path), self.bucket, self.bucket_key(key)))
        return self.info(key)

    def _put(self, key: str, size: int, body: bytes | BinaryIO) -> ListedObject:
        """One PutObject of `size` bytes; what a listing will show of the object."""

        def attempt(client: BaseClient) -> dict:
            if not isinstance(body, bytes):
                body.seek(0)  # an attempt after a failed one sends the file from its start again
            return client.put_object(Bucket=self.bucket, Key=self.bucket_key(key), Body=body)

        answer = self.call("write", self.url(key), attempt)
        return ListedObject(key, size, {"etag": answer["ETag"].strip('"')})

    def get_bytes(self, key: str) -> bytes:
        with _ObjectReader(self, key) as reader:
            return reader.readall()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        check_range(start, length, self.url(key))
        if length == 0:
            self.size(key)  # still raise ObjectNotFound for a missing key
            return b""
        with _ObjectReader(self, key, start, start + length) as reader:
            return reader.readall()

    def open_read(self, key: str, expect: ListedObject | None = None) -> BinaryIO:
        return io.BufferedReader(_ObjectReader(self, key, expect=expect), buffer_size=READ_BUFFER_BYTES)

    def list(self, prefix: str = "") -> Iterator[str]:
        return (info.key for info in self.list_info(prefix))

    def list_info(self, prefix: str = "") -> Iterator[ListedObject]:
        check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        found = [
            ListedObject(item["Key"][len(root) :], int(item["Size"]), {"etag": item["ETag"].strip('"')})
            for page in self._pages(prefix, Prefix=root + prefix)
            for item in page.get("Contents", ())
        ]
        # Folder markers ("a/") are not objects; servers differ in listing order, so sort here.
        return iter(sorted((info for info in found if not info.key.endswith("/")), key=lambda info: info.key))

    def list_folders(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        folder = join_key(self.prefix, prefix)
        folder = f"{folder}/" if folder else ""  # "": the bucket's root
        names = {
            common["Prefix"][len(folder) :].removesuffix("/")
            for page in self._pages(prefix, Prefix=folder, Delimiter="/")
            for common in page.get("CommonPrefixes", ())
        }
        return iter(sorted(names))

    def _pages(self, prefix: str, **request) -> Iterator[dict]:
        """The pages of a ListObjectsV2 request (1,000 entries each). A failed page is asked for
        again with the same continuation token: the listing resumes there."""
        uri, token = f"{self.uri}/{prefix}", None
        while True:
            more = {"ContinuationToken": token} if token else {}
            page = self.call("list", uri, lambda client: client.list_objects_v2(Bucket=self.bucket, **request, **more))
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def info(self, key: str) -> ListedObject:
        head = self._head(key)
        return ListedObject(key, int(head["ContentLength"]), {"etag": head["ETag"].strip('"')})

    def _head(self, key: str) -> dict:
        return self.call("read", self.url(key), lambda client: client.head_object(Bucket=self.bucket, Key=self.bucket_key(key)))

    def exists(self, key: str) -> bool:
        # A HEAD answer has no body, so a missing bucket also reads as a missing key here.
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def delete(self, key: str) -> None:
        self.call("delete", self.url(key), lambda client: client.delete_object(Bucket=self.bucket, Key=self.bucket_key(key)))

    def delete_many(self, keys: Iterable[str]) -> None:
        """DeleteObjects, DELETE_BATCH keys a request, in order."""
        self._delete_objects([self.bucket_key(key) for key in keys])

    def remove_folders(self, prefixes: Iterable[str]) -> None:
        # S3 has no folders, but SeaweedFS keeps an emptied one (and lists it) until its "folder/"
        # key is deleted; elsewhere there is no such key, or only a console's folder marker.
        self._delete_objects([self.bucket_key(prefix.removesuffix("/")) + "/" for prefix in prefixes])

    def _delete_objects(self, bucket_keys: list[str]) -> None:
        for start in range(0, len(bucket_keys), DELETE_BATCH):
            batch = bucket_keys[start : start + DELETE_BATCH]
            objects = {"Objects": [{"Key": key} for key in batch], "Quiet": True}
            what = f"s3://{self.bucket}/{batch[0]}" + (f" and {len(batch) - 1} more" if len(batch) > 1 else "")
            answer = self.call("delete", what, lambda client: client.delete_objects(Bucket=self.bucket, Delete=objects))
            if failed := answer.get("Errors"):
                raise StoreError(f"cannot delete s3://{self.bucket}/{failed[0]['Key']}: "
                                 f"{failed[0].get('Code')} ({len(failed)} of {len(batch)} keys failed)")

    def download(self, key: str, path: str | os.PathLike, expect: ListedObject | None = None) -> Path:
        """One GET, resumed if it breaks off; from multipart_threshold bytes, parallel ranged GETs of
        the version that GET's answer named instead (its size and ETag given to s3transfer, which
        would otherwise ask them with a HEAD), the GET itself dropped."""
        dest = Path(path)
        with atomic_output(dest) as tmp:
            with _ObjectReader(self, key, expect=expect) as reader:
                found = reader.found
                if found.size < self.transfer.multipart_threshold:
                    with open(tmp, "wb") as out:
                        for piece in iter(reader.read_piece, b""):
                            out.write(piece)
                    return dest
            known = _KnownObject(found.size, reader.etag)
            self._transfer(
                "download", key, lambda manager: manager.download(self.bucket, self.bucket_key(key), os.fspath(tmp), subscribers=[known])
            )
        return dest

    @property
    def outage_tolerance_s(self) -> float:
        return _connection().policy.deadline_s

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, self.bucket_key(prefix.removesuffix("/")), self.transfer)

    # Conditional requests: PUT If-None-Match: * creates only a missing object; If-Match: <ETag>
    # replaces or deletes only the version read. AWS S3, SeaweedFS (checked: 412 on a lost race)
    # and MinIO honour them; a server that ignored them would reopen a race of one round trip.
    def _conditional(self, action: str, key: str, send: Callable[[BaseClient, dict[str, str]], T]) -> T:
        """send(client, {"Bucket", "Key"}) under the store's retries and error translation, with a
        failed precondition (or the object deleted meanwhile) turned into VersionConflict."""
        target = {"Bucket": self.bucket, "Key": self.bucket_key(key)}

        def attempt(client: BaseClient) -> T:
            try:
                return send(client, target)
            except ClientError as error:
                if _precondition_failed(error):
                    raise VersionConflict(f"{self.url(key)} changed since it was read") from None
                raise

        try:
            return self.call(action, self.url(key), attempt)
        except ObjectNotFound:
            if action == "read":
                raise
            raise VersionConflict(f"{self.url(key)} was deleted since it was read") from None

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        def get(client: BaseClient, target: dict[str, str]) -> tuple[bytes, str]:
            response = client.get_object(**target)
            return response["Body"].read(), response["ETag"]

        try:
            return self._conditional("read", key, get)
        except ObjectNotFound:
            return None

    def create(self, key: str, data: bytes) -> str:
        return self._conditional("create", key, lambda client, target: client.put_object(**target, Body=data, IfNoneMatch="*")["ETag"])

    def replace(self, key: str, data: bytes, version: str) -> str:
        return self._conditional("write", key, lambda client, target: client.put_object(**target, Body=data, IfMatch=version)["ETag"])

    def delete_version(self, key: str, version: str) -> None:
        self._conditional("delete", key, lambda client, target: client.delete_object(**target, IfMatch=version))


def _precondition_failed(error: ClientError) -> bool:
    # 412: the If-Match / If-None-Match condition did not hold; 409: AWS's answer to a
    # conditional write racing another one on the same key.
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = error.response.get("Error", {}).get("Code")
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


class _ObjectReader(io.RawIOBase):
    """Bytes [start, end) of an object (to its end if `end` is None) as a raw stream that resumes
    where it broke off.

    The first GET is made at once (so a missing object fails here, and one not at the size and
    ETag `expect` gives raises ObjectChanged, its body unread). A read that fails partway (a
    reset, a short body, a timeout) is retried under the store's policy with a GET of the rest
    (Range from the offset reached, If-Match the first answer's ETag, so a changed object is an
    error, never a splice), and the stream ends only at the length the first answer announced.
    """

    def __init__(self, store: S3Store, key: str, start: int = 0, end: int | None = None, expect: ListedObject | None = None):
        self._store, self._key, self._uri = store, key, store.url(key)
        self._request = {"Bucket": store.bucket, "Key": store.bucket_key(key)}
        self._offset, self._end = start, end
        self.etag: str | None = None  # as the first answer gave it (quoted), for If-Match
        self._size = 0  # the object's, from the first answer
        self._body = None
        store.call("read", self._uri, self._get, on_retry=self._drop)
        try:
            check_expected(self._uri, self.found, expect)
        except ObjectChanged:
            self.close()
            raise

    @property
    def found(self) -> ListedObject:
        """The object's size and version, as the first answer gave them."""
        return ListedObject(self._key, self._size, {"etag": (self.etag or "").strip('"')})

    def _get(self, client: BaseClient) -> None:
        """A GET of the bytes from the offset reached, unless one is open."""
        if self._body is not None:
            return
        request = dict(self._request)
        if self._offset or self._end is not None:
            request["Range"] = f"bytes={self._offset}-{'' if self._end is None else self._end - 1}"
        if self.etag is not None:
            request["IfMatch"] = self.etag
        try:
            response = client.get_object(**request)
        except ClientError as err:
            # 416: the range starts at or past the end; like a file read there, that is no bytes.
            if self.etag is None and err.response.get("Error", {}).get("Code") == "InvalidRange":
                self._end = self._offset
                return
            raise
        if self.etag is None:
            content_range = response.get("ContentRange")  # "bytes 0-99/1234": the object's size last
            self._size = int(content_range.rsplit("/", 1)[1]) if content_range else self._offset + int(response["ContentLength"])
            self._end = self._size if self._end is None else min(self._end, self._size)
            self.etag = response["ETag"]
        self._body = response["Body"]

    def _drop(self) -> None:
        if self._body is not None:
            body, self._body = self._body, None
            with contextlib.suppress(OSError):  # a broken connection is dropped either way
                body.close()

    def _read(self, client: BaseClient, size: int) -> bytes:
        self._get(client)
        piece = self._body.read(size)
        if not piece:  # botocore checks Content-Length; this checks the length the first answer gave
            raise ShortBody(f"the response ended at byte {self._offset} of {self._end}")
        return piece

    def read_piece(self, size: int = READ_PIECE_BYTES) -> bytes:
        """Up to `size` bytes (b"" at the end): a failure costs one piece at most."""
        size = min(size, self._end - self._offset)
        if size <= 0:
            return b""
        piece = self._store.call("read", self._uri, lambda client: self._read(client, size), on_retry=self._drop)
        self._offset += len(piece)
        return piece

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        piece = self.read_piece(len(buffer))
        memoryview(buffer).cast("B")[: len(piece)] = piece
        return len(piece)

    def readall(self) -> bytes:
        return b"".join(iter(self.read_piece, b""))

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()


class _KnownObject(BaseSubscriber):
    """Gives a download the size and ETag of the object already read from a GET's answer."""

    def __init__(self, size: int, etag: str):
        self.size, self.etag = size, etag

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self.size)
        future.meta.provide_object_etag(self.etag)


def _unpickle_s3store(bucket: str, prefix: str, transfer: dict) -> S3Store:
    return S3Store(bucket, prefix, TransferConfig(**transfer))

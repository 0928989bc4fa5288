"""An S3 (or S3-compatible) bucket prefix as a Store, through boto3.

Endpoint, region and credentials come from the standard AWS environment and config files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE,
~/.aws/config). Addressing is path-style when a custom endpoint is configured (what
SeaweedFS, MinIO and most S3-compatible servers need); TINYLLAMA_S3_ADDRESSING_STYLE
(path | virtual | auto) or `s3 = addressing_style = ...` in the profile overrides that.

Retries: botocore's "standard" mode (exponential backoff with jitter on throttling, 5xx and
connection errors), MAX_ATTEMPTS attempts unless AWS_RETRY_MODE / AWS_MAX_ATTEMPTS (or the
profile's retry_mode / max_attempts) say otherwise. With CONNECT_TIMEOUT_S per attempt an
unreachable endpoint fails in under 30 s.

Each process builds one client per AWS configuration, on first use, and shares it between
threads (boto3 clients are thread-safe). The store object holds no client, so it pickles
cheaply and Ray can ship it to workers, which build their own.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
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
from botocore.response import StreamingBody
from s3transfer.exceptions import RetriesExceededError

from storage.store import (
    CREDENTIALS_IN_URI,
    ListedObject,
    ObjectNotFound,
    Store,
    StoreAccessError,
    StoreError,
    atomic_output,
    check_key,
    check_prefix,
    check_range,
)

ADDRESSING_STYLE_ENV = "TINYLLAMA_S3_ADDRESSING_STYLE"
RETRY_MODE = "standard"
MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 5
# Longest wait for the next bytes of a response; a stalled server fails rather than hangs.
READ_TIMEOUT_S = 30
# At least the transfer concurrency, so parallel parts never queue for a connection.
MAX_POOL_CONNECTIONS = 32
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
)
_clients: dict[tuple[str | int | None, ...], BaseClient] = {}
_clients_lock = threading.Lock()


def s3_client() -> BaseClient:
    """This process's S3 client for the current AWS environment, built on first use."""
    # The pid is part of the key: a forked child must not reuse its parent's connections.
    settings = (os.getpid(), *(os.environ.get(name) for name in _CLIENT_ENV))
    client = _clients.get(settings)
    if client is None:
        with _clients_lock:
            client = _clients.get(settings)
            if client is None:
                client = _clients[settings] = _new_client()
    return client


def _new_client() -> BaseClient:
    core = botocore.session.get_session()
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
    config = Config(
        retries=retries,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=MAX_POOL_CONNECTIONS,
        tcp_keepalive=True,
        s3={"addressing_style": style} if style else None,
    )
    return boto3.session.Session(botocore_session=core).client("s3", config=config)


def _public_endpoint(client: BaseClient) -> str:
    """The client's endpoint without any user:password part, for messages."""
    parts = urlsplit(client.meta.endpoint_url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class S3Store(Store):
    """Objects under `s3://bucket/prefix`; writes are single PUTs or completed multipart uploads."""

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

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    @contextmanager
    def _errors(self, action: str, uri: str) -> Iterator[BaseClient]:
        """The S3 client, for a block whose boto3 errors become StoreErrors that name `uri`."""
        try:
            client = s3_client()
        except (StoreError, BotoCoreError) as err:  # a bad setting or profile in the AWS environment
            raise StoreError(f"cannot {action} {uri}: {err}") from err
        try:
            yield client
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
            message = error.get("Message", "")
            raise StoreError(f"cannot {action} {uri}: {code} (HTTP {status}) {message}".rstrip()) from err
        except (NoCredentialsError, PartialCredentialsError) as err:
            raise StoreAccessError(
                f"cannot {action} {uri}: no usable AWS credentials ({err}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            ) from err
        except (BotocoreConnectionError, HTTPClientError, RetriesExceededError) as err:
            raise StoreError(
                f"cannot {action} {uri}: S3 endpoint {_public_endpoint(client)} unreachable or failing "
                f"(check AWS_ENDPOINT_URL): {err}"
            ) from err
        except BotoCoreError as err:
            raise StoreError(f"cannot {action} {uri}: {err}") from err

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors("write", self.url(key)) as client:
            if len(data) < self.transfer.multipart_threshold:
                client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
            else:
                with create_transfer_manager(client, self.transfer) as manager:
                    manager.upload(io.BytesIO(data), self.bucket, self._key(key)).result()

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        os.stat(path)  # a missing source fails here naming the file; inside s3transfer it is not named
        with self._errors("write", self.url(key)) as client:
            with create_transfer_manager(client, self.transfer) as manager:
                manager.upload(os.fspath(path), self.bucket, self._key(key)).result()

    def get_bytes(self, key: str) -> bytes:
        with self._errors("read", self.url(key)) as client:
            return client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        uri = self.url(key)
        check_range(start, length, uri)
        if length == 0:
            self.size(key)  # still raise ObjectNotFound for a missing key
            return b""
        with self._errors("read", uri) as client:
            try:
                response = client.get_object(
                    Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
                )
            except ClientError as err:
                # 416: the range starts at or past the end; like a file read there, that is no bytes.
                if err.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""
                raise
            return response["Body"].read()

    def open_read(self, key: str) -> BinaryIO:
        uri = self.url(key)
        with self._errors("read", uri) as client:
            body = client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        return io.BufferedReader(_BodyReader(body, uri, self), buffer_size=READ_BUFFER_BYTES)

    def list(self, prefix: str = "") -> Iterator[str]:
        return (info.key for info in self.list_info(prefix))

    def list_info(self, prefix: str = "") -> Iterator[ListedObject]:
        check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        found: list[ListedObject] = []
        with self._errors("list", f"{self.uri}/{prefix}") as client:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix)
            for page in pages:
                found.extend(
                    ListedObject(item["Key"][len(root) :], int(item["Size"]), {"etag": item["ETag"].strip('"')})
                    for item in page.get("Contents", ())
                )
        # Folder markers ("a/") are not objects; servers differ in listing order, so sort here.
        return iter(sorted((info for info in found if not info.key.endswith("/")), key=lambda info: info.key))

    def info(self, key: str) -> ListedObject:
        head = self._head(key)
        return ListedObject(key, int(head["ContentLength"]), {"etag": head["ETag"].strip('"')})

    def _head(self, key: str) -> dict:
        with self._errors("read", self.url(key)) as client:
            return client.head_object(Bucket=self.bucket, Key=self._key(key))

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
        with self._errors("delete", self.url(key)) as client:
            client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def download(self, key: str, path: str | os.PathLike) -> Path:
        dest = Path(path)
        with self._errors("download", self.url(key)) as client, atomic_output(dest) as tmp:
            with create_transfer_manager(client, self.transfer) as manager:
                manager.download(self.bucket, self._key(key), os.fspath(tmp)).result()
        return dest

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, self._key(prefix.removesuffix("/")), self.transfer)


class _BodyReader(io.RawIOBase):
    """A GET response body as a raw stream whose errors name the object."""

    def __init__(self, body: StreamingBody, uri: str, store: S3Store):
        self._body, self._uri, self._store = body, uri, store

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with self._store._errors("read", self._uri):
            data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _unpickle_s3store(bucket: str, prefix: str, transfer: dict) -> S3Store:
    return S3Store(bucket, prefix, TransferConfig(**transfer))

"""What every object store is: the Store interface, its errors, and the key checks.

storage/store.py (a local folder, and open_store) and storage/s3.py (an S3 bucket prefix) both
build on this module, so neither imports the other's internals.
"""

from __future__ import annotations

import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


class StoreError(Exception):
    """A store operation failed; the message names the object's URI."""


class StoreAccessError(StoreError):
    """The store refused in a way a retry does not change: access denied, no usable credentials,
    no such bucket. The message says what to fix."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """The key does not exist in the store."""


class InvalidKey(StoreError, ValueError):
    """The key is absolute, contains '..', or otherwise escapes the store root."""


class VersionConflict(StoreError):
    """A conditional write lost: the object changed (or appeared, or vanished) since the version read."""


class ObjectChanged(StoreError):
    """A read found the object at another size or version than the one the caller expected."""

    def __init__(self, uri: str, changes: list[str]):
        super().__init__(f"{uri} changed ({', '.join(changes)})")
        self.changes = changes  # what differs, expected first: "size 10 -> 12", "etag a -> b"


def check_key(key: str) -> str:
    """Return the key, or raise InvalidKey if it could escape the root or names a folder."""
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"empty or non-string key: {key!r}")
    if "\\" in key or "\x00" in key:
        raise InvalidKey(f"key contains a backslash or NUL: {key!r}")
    if key.startswith("/"):
        raise InvalidKey(f"key must be relative to the store root, got absolute {key!r}")
    if key.endswith("/"):
        raise InvalidKey(f"key must name an object, not a folder: {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"key must not contain '.', '..' or empty segments: {key!r}")
    return key


def check_name(name: str) -> str:
    """Return a name that becomes one key segment (a build, run or source folder), or raise InvalidKey."""
    if "/" in name:
        raise InvalidKey(f"name {name!r} must not contain '/' (it becomes one folder name)")
    return check_key(name)


# Query parameters that carry credentials: presigned URLs (SigV4, SigV2) and the obvious names
# (lowercase; matched in either case).
_CREDENTIAL_PARAMETER_RE = r"[?&](x-amz-[a-z-]+|awsaccesskeyid|signature|[a-z_-]*(secret|token|password|credential)[a-z_-]*)="
_CREDENTIAL_PARAMETER = re.compile(_CREDENTIAL_PARAMETER_RE, re.I)


def _either_case(pattern: str) -> str:
    """A lowercase regex made to match either case without flags: JSON Schema patterns have none."""
    parts = re.split(r"(\[[^]]*\])", pattern)  # character classes, and the text between them
    return "".join(
        part.replace("a-z", "a-zA-Z") if part.startswith("[") else re.sub("[a-z]", lambda m: f"[{m[0]}{m[0].upper()}]", part)
        for part in parts
    )


# check_uri_has_no_credentials as a JSON Schema pattern (Python and ECMA alike) for the URI fields
# of flow parameters: the Prefect server refuses a deployment run whose parameters fail it before
# it stores them, where pydantic runs only once the flow starts.
NO_CREDENTIALS_PATTERN = rf"^(?![\s\S]*?://[^/]*@)(?![\s\S]*?://[\s\S]*{_either_case(_CREDENTIAL_PARAMETER_RE)})"
CREDENTIALS_IN_URI = (
    "store URIs must not hold credentials (user:password@ or a signed query string); use the AWS "
    "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or a profile (AWS_PROFILE)"
)


def check_uri_has_no_credentials(uri: str) -> str:
    """Return the URI, or raise ValueError (never echoing it) if it holds credentials."""
    scheme, sep, rest = uri.partition("://")
    if sep and ("@" in rest.partition("/")[0] or _CREDENTIAL_PARAMETER.search(rest)):
        raise ValueError(CREDENTIALS_IN_URI)
    return uri


def check_prefix(prefix: str) -> str:
    """Return a listing prefix ("" or a key prefix, a trailing '/' allowed), or raise InvalidKey."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


def check_range(start: int, length: int, uri: str) -> None:
    if start < 0 or length < 0:
        raise StoreError(f"invalid range start={start} length={length} for {uri}")


def join_key(*parts: str) -> str:
    """Join key segments with '/', ignoring empty ones."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A fresh temp file beside `path`, renamed onto it if the block succeeds, removed if not.

    The temp name is hidden and ends in ".tmp", so LocalStore.list never shows it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # os.open rather than mkstemp: the result gets the usual umask permissions, not 0600.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ListedObject:
    """What a listing, or the write that made the object, tells about it at no extra request: its
    size and a version stamp."""

    key: str
    size: int
    version: dict[str, str]  # S3: {"etag"}; a local file: {"mtime_ns", "inode"}

    def changes_from(self, expected: ListedObject) -> list[str]:
        """What differs from `expected` ("size 10 -> 12", "etag a -> b"); a version field only
        one of them has (a pinned sha256, say) is not compared."""
        return differences({"size": str(expected.size), **expected.version}, {"size": str(self.size), **self.version})


def differences(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    """The fields both hold that differ, as "name expected -> found"."""
    return [f"{name} {value} -> {found[name]}" for name, value in expected.items() if name in found and found[name] != value]


def check_expected(uri: str, found: ListedObject, expected: ListedObject | None) -> None:
    """Raise ObjectChanged unless what a read found is at `expected`'s size and version (None: anything)."""
    if expected is not None and (changes := found.changes_from(expected)):
        raise ObjectChanged(uri, changes)


class Store(ABC):
    """The operations every object store offers. Keys are '/'-separated, relative to the root."""

    uri: str  # the root, e.g. "file:///data" or "s3://bucket/prefix"; never holds credentials

    def url(self, key: str) -> str:
        """The full URI of a key, for messages and manifests."""
        return f"{self.uri.removesuffix('/')}/{check_key(key)}"

    # A write returns what a listing would then show of the object: its size and version, from the
    # write's own answer, so that a receipt records versions without a HEAD (but after an S3
    # multipart upload, whose ETag s3transfer keeps: storage/s3.py).
    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ListedObject: ...

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> ListedObject: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from offset `start` (fewer only at the end of the object)."""

    @abstractmethod
    def open_read(self, key: str, expect: ListedObject | None = None) -> BinaryIO:
        """A streaming, file-like reader (not necessarily seekable); the caller closes it. With
        `expect`, ObjectChanged unless the object is at its size and version, checked on the
        read's own answer (the GET's length and ETag; the opened file's stat), not a request more."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix` (a key prefix, not only a folder), in sorted order."""

    @abstractmethod
    def list_info(self, prefix: str = "") -> Iterator[ListedObject]:
        """Like `list`, with each object's size and version, from the listing itself (by the page on S3)."""

    @abstractmethod
    def list_folders(self, prefix: str = "") -> Iterator[str]:
        """The names of the folders directly under the folder `prefix` ("" for the root), sorted:
        one delimiter listing (a page per 1,000 folders on S3), however many objects they hold."""

    @abstractmethod
    def info(self, key: str) -> ListedObject:
        """One object's size and version (ObjectNotFound if it is missing)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key; removing a missing key is not an error."""

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove keys, in order (missing ones are not an error); a store that can batches them."""
        for key in keys:
            self.delete(key)

    @abstractmethod
    def remove_folders(self, prefixes: Iterable[str]) -> None:
        """Remove the folders `prefixes`, whose objects the caller has deleted, so that
        `list_folders` no longer names them: a local folder goes with whatever is left in it (temp
        files of interrupted writes); on S3, the folder entries of a server that keeps them
        (SeaweedFS) go, a request per 1,000, and a folder that still holds objects stays."""

    @abstractmethod
    def download(self, key: str, path: str | os.PathLike, expect: ListedObject | None = None) -> Path:
        """Copy an object to a local file atomically and return its path; `expect` as in open_read."""

    def local_path(self, key: str = "") -> Path | None:
        """The file or folder of `key` (the root by default) when the store is a local folder, to
        read in place; None for a remote store."""
        return None

    # Compare-and-swap on one object, for one writer at a time (storage/lease.py). A version is
    # an opaque string; each call raises VersionConflict if the object is not as expected.
    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        """(content, version) of the object, or None if it does not exist."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> str:
        """Write the object only if it does not exist; returns its version."""

    @abstractmethod
    def replace(self, key: str, data: bytes, version: str) -> str:
        """Overwrite the object only if it is still at `version`; returns the new version."""

    @abstractmethod
    def delete_version(self, key: str, version: str) -> None:
        """Delete the object only if it is still at `version`."""

    @property
    def outage_tolerance_s(self) -> float:
        """How long a call keeps retrying an unreachable store before it fails (storage/retry.py)."""
        return 0.0

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """A store rooted at `prefix` inside this one (InvalidKey if `prefix` would leave this root)."""

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_text(self, key: str, text: str) -> ListedObject:
        return self.put_bytes(key, text.encode("utf-8"))

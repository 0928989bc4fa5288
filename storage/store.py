"""Object stores opened from a URI: a local folder or an S3 bucket prefix.

Every store speaks in keys relative to its root ("datasets/x/manifest.json"). Keys are
validated so that nothing a user writes in a config can reach outside the root. Writes are
atomic: a reader sees the whole object or none of it. An S3 store rides out transient faults
(resets, short bodies, 5xx, SlowDown, timeouts) for minutes by itself (storage/retry.py), so no
caller retries; a local folder needs none.

    store = open_store("s3://bucket/prefix")     # or "file:///data", or "./data"
    store.put_text("runs/a/config.json", "{}")
    store, key = open_object("s3://bucket/prefix/runs/a/config.json")
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

COPY_BUFFER_BYTES = 8 << 20


class StoreError(Exception):
    """A store operation failed; the message names the object's URI."""


class StoreAccessError(StoreError):
    """The store refused in a way a retry does not change: access denied, no usable credentials,
    no such bucket. The message says what to fix."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """The key does not exist in the store."""


class InvalidKey(StoreError, ValueError):
    """The key is absolute, contains '..', or otherwise escapes the store root."""


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
    """What a listing tells about an object at no extra request: its size and a version stamp."""

    key: str
    size: int
    version: dict[str, str]  # S3: {"etag"}; a local file: {"mtime_ns", "inode"}


class Store(ABC):
    """The operations every object store offers. Keys are '/'-separated, relative to the root."""

    uri: str  # the root, e.g. "file:///data" or "s3://bucket/prefix"; never holds credentials

    def url(self, key: str) -> str:
        """The full URI of a key, for messages and manifests."""
        return f"{self.uri.removesuffix('/')}/{check_key(key)}"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from offset `start` (fewer only at the end of the object)."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming, file-like reader (not necessarily seekable); the caller closes it."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix` (a key prefix, not only a folder), in sorted order."""

    @abstractmethod
    def list_info(self, prefix: str = "") -> Iterator[ListedObject]:
        """Like `list`, with each object's size and version, from the listing itself (by the page on S3)."""

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
    def download(self, key: str, path: str | os.PathLike) -> Path:
        """Copy an object to a local file atomically and return its path."""

    def local_path(self, key: str) -> Path | None:
        """The object's file when the store is a local folder (to read in place), else None."""
        return None

    @property
    def outage_tolerance_s(self) -> float:
        """How long a call keeps retrying an unreachable store before it fails (storage/retry.py)."""
        return 0.0

    def child(self, prefix: str) -> Store:
        """A store rooted at `prefix` inside this one (InvalidKey if `prefix` would leave this root)."""
        return open_store(self.url(prefix.removesuffix("/")))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))


class LocalStore(Store):
    """A folder on the local file system; atomic writes by temp file + rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        # Not Path.as_uri(): its percent-encoding would not survive a trip through open_store.
        self.uri = f"file://{self.root.as_posix()}"

    def _inside(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not self._inside(path):  # e.g. through a symlink
            raise InvalidKey(f"key {key!r} resolves outside the store root {self.uri}")
        return path

    def child(self, prefix: str) -> LocalStore:
        """The folder `prefix` as a store; one that resolves outside this root (a symlink) is refused."""
        return LocalStore(self._path(prefix.removesuffix("/")))

    def _missing(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"no such object: {self.url(key)}")

    def _atomic_write(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        with atomic_output(self._path(key)) as tmp, open(tmp, "wb") as f:
            write(f)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as src:
            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, COPY_BUFFER_BYTES))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        check_range(start, length, self.url(key))
        with self.open_read(key) as f:
            f.seek(start)
            return f.read(length)

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        folder = (self.root / prefix.rpartition("/")[0]).resolve()
        if not self._inside(folder):
            raise InvalidKey(f"prefix {prefix!r} resolves outside the store root {self.uri}")
        if not folder.is_dir():
            return iter(())
        keys = (
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file()
            and not (p.name.startswith(".") and p.name.endswith(".tmp"))
            and not (p.is_symlink() and not self._inside(p.resolve()))
        )
        base = prefix.rpartition("/")[0]
        return iter(sorted(k for k in (join_key(base, k) for k in keys) if k.startswith(prefix)))

    def list_info(self, prefix: str = "") -> Iterator[ListedObject]:
        for key in self.list(prefix):
            try:
                yield self._info(key, self._path(key).stat())
            except FileNotFoundError:  # removed since the listing
                continue

    def info(self, key: str) -> ListedObject:
        path = self._path(key)
        if not path.is_file():
            raise self._missing(key)
        return self._info(key, path.stat())

    @staticmethod
    def _info(key: str, stat: os.stat_result) -> ListedObject:
        return ListedObject(key, stat.st_size, {"mtime_ns": str(stat.st_mtime_ns), "inode": str(stat.st_ino)})

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise self._missing(key)
        return path.stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    def download(self, key: str, path: str | os.PathLike) -> Path:
        dest = Path(path)
        with self.open_read(key) as src, atomic_output(dest) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, COPY_BUFFER_BYTES)
        return dest


def open_store(uri: str | os.PathLike) -> Store:
    """Open a store from a plain path, `file:///path`, or `s3://bucket/prefix`."""
    uri = os.fspath(uri)
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return LocalStore(uri)
    if scheme == "s3":
        from storage.s3 import S3Store

        bucket, _, prefix = rest.partition("/")
        return S3Store(bucket, prefix)
    if scheme == "file":
        if not rest.startswith("/"):
            raise StoreError(f"a file URI needs an absolute path (file:///path), got {uri!r}")
        return LocalStore(rest)
    # Only the scheme is echoed: the rest of an unknown URI might hold credentials.
    raise StoreError(f"unsupported store URI scheme {scheme!r}: use a path, file:///path or s3://bucket/prefix")


def open_object(uri: str | os.PathLike) -> tuple[Store, str]:
    """Split an object URI into the store of its folder and its key: s3://b/a/m.json -> (s3://b/a, m.json)."""
    uri = os.fspath(uri)
    scheme, sep, rest = uri.partition("://")
    if sep:
        root, slash, name = rest.rpartition("/")
        if not slash or not name or (scheme == "s3" and not root):
            raise InvalidKey(f"not an object URI (no key after the bucket or folder): {uri!r}")
        folder = f"{scheme}://{root or '/'}"
    else:
        folder, name = os.path.split(uri)
        folder = folder or "."
    if not name:
        raise InvalidKey(f"not an object URI (it ends in '/'): {uri!r}")
    return open_store(folder), check_key(name)

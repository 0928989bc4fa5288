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

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

# The interface and its errors live in storage/store_base.py (which storage/s3.py builds on
# too); callers import them from here, with the stores.
from storage.store_base import (
    CREDENTIALS_IN_URI,
    NO_CREDENTIALS_PATTERN,
    InvalidKey,
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
    check_name,
    check_prefix,
    check_range,
    check_uri_has_no_credentials,
    differences,
    join_key,
)

__all__ = [
    "CREDENTIALS_IN_URI", "NO_CREDENTIALS_PATTERN", "COPY_BUFFER_BYTES", "InvalidKey", "ListedObject",
    "LocalStore", "ObjectChanged", "ObjectNotFound", "Store", "StoreAccessError", "StoreError", "VersionConflict",
    "atomic_output", "check_expected", "check_key", "check_name", "check_prefix", "check_range",
    "check_uri_has_no_credentials", "differences", "join_key", "open_object", "open_store",
]

COPY_BUFFER_BYTES = 8 << 20


class LocalStore(Store):
    """A folder on the local file system; atomic writes by temp file + rename.

    Conditional writes are read-compare-write under an exclusive flock(2) on the object's folder,
    which serializes the processes of one machine (not NFS clients on several machines); a
    version is the content's sha256."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        # Not Path.as_uri(): its percent-encoding would not survive a trip through open_store.
        self.uri = f"file://{self.root.as_posix()}"

    def _inside(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def local_path(self, key: str = "") -> Path:
        return self._path(key) if key else self.root

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

    def _atomic_write(self, key: str, write: Callable[[BinaryIO], object]) -> ListedObject:
        with atomic_output(self._path(key)) as tmp:
            with open(tmp, "wb") as f:
                write(f)
            return self._info(key, tmp.stat())  # the rename keeps the file's mtime and inode

    def put_bytes(self, key: str, data: bytes) -> ListedObject:
        return self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | os.PathLike) -> ListedObject:
        with open(path, "rb") as src:
            return self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, COPY_BUFFER_BYTES))

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

    def open_read(self, key: str, expect: ListedObject | None = None) -> BinaryIO:
        try:
            f = open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None
        try:
            check_expected(self.url(key), self._info(key, os.fstat(f.fileno())), expect)
        except BaseException:
            f.close()
            raise
        return f

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

    def list_folders(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        folder = self._path(prefix.removesuffix("/")) if prefix else self.root
        if not folder.is_dir():
            return iter(())
        with os.scandir(folder) as entries:  # a folder linked from outside the root is not listed
            names = [entry.name for entry in entries if entry.is_dir() and self._inside(Path(entry.path).resolve())]
        return iter(sorted(names))

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

    def remove_folders(self, prefixes: Iterable[str]) -> None:
        for prefix in prefixes:
            shutil.rmtree(self._path(prefix.removesuffix("/")), ignore_errors=True)

    def download(self, key: str, path: str | os.PathLike, expect: ListedObject | None = None) -> Path:
        dest = Path(path)
        with self.open_read(key, expect) as src, atomic_output(dest) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, COPY_BUFFER_BYTES)
        return dest

    @contextlib.contextmanager
    def _folder_locked(self, key: str) -> Iterator[None]:
        folder = self._path(key).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # also releases the lock

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.get_bytes(key)
        except ObjectNotFound:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _version(self, key: str) -> str | None:
        current = self.get_versioned(key)
        return None if current is None else current[1]

    def _conflict(self, key: str) -> VersionConflict:
        return VersionConflict(f"{self.url(key)} changed since it was read")

    def create(self, key: str, data: bytes) -> str:
        with self._folder_locked(key):
            if self.exists(key):
                raise VersionConflict(f"{self.url(key)} exists already")
            self.put_bytes(key, data)
        return hashlib.sha256(data).hexdigest()

    def replace(self, key: str, data: bytes, version: str) -> str:
        with self._folder_locked(key):
            if self._version(key) != version:
                raise self._conflict(key)
            self.put_bytes(key, data)
        return hashlib.sha256(data).hexdigest()

    def delete_version(self, key: str, version: str) -> None:
        with self._folder_locked(key):
            if self._version(key) != version:
                raise self._conflict(key)
            self.delete(key)


def open_store(uri: str | os.PathLike) -> Store:
    """Open a store from a plain path, `file:///path`, or `s3://bucket/prefix`."""
    uri = os.fspath(uri)
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return LocalStore(uri)
    if scheme == "s3":
        from storage.s3 import S3Store  # boto3 is imported only when a bucket is opened

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

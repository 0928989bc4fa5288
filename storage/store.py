"""Object stores opened from a URI: a local folder or an S3 bucket prefix.

Every store speaks in keys relative to its root ("datasets/x/manifest.json"). Keys are
validated so that nothing a user writes in a config can reach outside the root. Writes are
atomic: a reader sees the whole object or none of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlparse


class StoreError(Exception):
    """A store operation failed; the message names the object's URI."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """The key does not exist in the store."""


class InvalidKey(StoreError, ValueError):
    """The key is absolute, contains '..', or otherwise escapes the store root."""


def check_key(key: str) -> str:
    """Return the normalised key, or raise InvalidKey if it could escape the root."""
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"empty or non-string key: {key!r}")
    if "\\" in key or "\x00" in key:
        raise InvalidKey(f"key contains a backslash or NUL: {key!r}")
    if key.startswith("/"):
        raise InvalidKey(f"key must be relative to the store root, got absolute {key!r}")
    parts = PurePosixPath(key).parts
    if any(part in ("..", ".") for part in parts) or "//" in key:
        raise InvalidKey(f"key must not contain '.', '..' or empty segments: {key!r}")
    return key


def join_key(*parts: str) -> str:
    """Join key segments with '/', ignoring empty ones."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Store(ABC):
    """The operations every object store offers. Keys are '/'-separated, relative to the root."""

    uri: str  # the root, e.g. "file:///data" or "s3://bucket/prefix"; never holds credentials

    def url(self, key: str) -> str:
        """The full URI of a key, for messages and manifests."""
        return f"{self.uri.rstrip('/')}/{check_key(key)}"

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
        """A streaming, file-like reader; the caller closes it."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix` (a key prefix, not only a folder), in sorted order."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key; removing a missing key is not an error."""

    @abstractmethod
    def download(self, key: str, path: str | os.PathLike) -> Path:
        """Copy an object to a local file atomically and return its path."""

    def child(self, prefix: str) -> Store:
        """A store rooted at `prefix` inside this one."""
        return open_store(self.url(prefix))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))


class LocalStore(Store):
    """A folder on the local file system; atomic writes by temp file + rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if path != self.root and self.root not in path.parents:  # e.g. through a symlink
            raise InvalidKey(f"key {key!r} resolves outside the store root {self.uri}")
        return path

    def _missing(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"no such object: {self.url(key)}")

    def _atomic_write(self, key: str, write) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as src:
            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, 8 << 20))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise self._missing(key) from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise StoreError(f"invalid range start={start} length={length} for {self.url(key)}")
        with self.open_read(key) as f:
            f.seek(start)
            return f.read(length)

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise self._missing(key) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        if prefix:
            check_key(prefix.rstrip("/") or "x")
        folder = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not folder.is_dir():
            return iter(())
        keys = (
            p.relative_to(self.root).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp"))
        )
        return iter(sorted(k for k in keys if k.startswith(prefix)))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise self._missing(key) from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def download(self, key: str, path: str | os.PathLike) -> Path:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with self.open_read(key) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest


def open_store(uri: str | os.PathLike) -> Store:
    """Open a store from a plain path, `file:///path`, or `s3://bucket/prefix`."""
    uri = os.fspath(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from storage.s3 import S3Store

        return S3Store(bucket=parsed.netloc, prefix=parsed.path.strip("/"))
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme in ("",) or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStore(uri)
    raise StoreError(f"unsupported store URI scheme {parsed.scheme!r} in {uri!r}")


def open_object(uri: str | os.PathLike) -> tuple[Store, str]:
    """Split an object URI into the store of its folder and its key: s3://b/a/m.json -> (s3://b/a, m.json)."""
    uri = os.fspath(uri).rstrip("/")
    head, _, name = uri.rpartition("/")
    if "://" not in uri and not head:
        head = "."
    if not name or head.endswith(":/") or head.endswith(":"):
        raise InvalidKey(f"not an object URI: {uri!r}")
    return open_store(head), name

"""A node's local cache of token shards: verified, bounded in bytes, shared by the node's ranks.

The training loader asks it for shards (`get`, or `prefetch` ahead of need) by `ShardLocation`:
where a shard lives on the store and what its files must hash to. A local-folder store is read
in place; any other store's shards are downloaded into `cache_dir`, named by content, verified
by sha256 against the manifest, and evicted least recently used first when over `cache_bytes`.

A manifest comes to a node the same way, once: its header (`node_fetch`) and shard table
(`node_copy`) are downloaded by the first of the node's ranks to take their lock; the others
read that local file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from storage.manifest import ObjectInfo, sha256_file
from storage.shards import IndexedShard, ShardError
from storage.store import Store

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 4
# Memory maps held open at once (the kernel's default limit is 65530 maps per process).
MAX_OPEN_SHARDS = 1024
# A staging folder untouched this long belongs to a process that died mid-download.
ABANDONED_FETCH_S = 3600


@dataclass(frozen=True)
class ShardLocation:
    """One token shard as the loader needs it: where it lives and what its files must hash to."""

    store: Store
    prefix: str  # key of the shard without extension, relative to the store
    bin: ObjectInfo
    idx: ObjectInfo
    tokens: int

    @property
    def uri(self) -> str:
        return self.store.url(self.bin.key)

    @property
    def cache_name(self) -> str:
        """Content-addressed: equal files share a cache entry, and a stale name cannot match."""
        return f"{self.bin.sha256}-{self.idx.sha256[:16]}"

    @property
    def local_prefix(self) -> Path | None:
        """The shard's own files when the store is a local folder (read in place), else None."""
        return self.store.local_path(self.prefix)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _intact(path: Path, info: ObjectInfo) -> bool:
    try:
        return path.stat().st_size == info.size and sha256_file(path) == info.sha256
    except FileNotFoundError:
        return False


def node_copy(store: Store, info: ObjectInfo, folder: Path) -> Path:
    """A verified local copy of a small object (a manifest's shard table) shared by the processes
    of a node: named by its sha256, downloaded by exactly one of them (under a file lock, moved in
    by an atomic rename); the rest read the file. ShardError naming the key if the store's object
    is not the one described."""
    path = folder / f"{info.sha256}{Path(info.key).suffix}"
    if _intact(path, info):  # no lock: a copy is only ever replaced whole, so the node's ranks check it at once
        return path
    (folder / ".locks").mkdir(parents=True, exist_ok=True)
    with _file_lock(folder / ".locks" / path.name):
        if _intact(path, info):  # fetched by another process while this one waited
            return path
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
            staged = store.download(info.key, Path(tmp) / path.name)
            if not _intact(staged, info):
                raise ShardError(
                    f"{store.url(info.key)}: downloaded {staged.stat().st_size} bytes with sha256 "
                    f"{sha256_file(staged)[:12]}, not the {info.size} bytes and sha256 {info.sha256[:12]} expected"
                )
            os.replace(staged, path)
    return path


def node_fetch(store: Store, key: str, folder: Path) -> bytes:
    """A small object (a manifest's header) fetched once by the processes of a node started
    together: the first to take its lock GETs it and leaves a copy, which the others read if it
    was written after they started. A later start fetches it again, so a rewritten object is
    never missed (process start times are exact to about a second)."""
    path = folder / f"{hashlib.sha256(store.url(key).encode()).hexdigest()[:32]}{Path(key).suffix}"
    started = psutil.Process().create_time()
    (folder / ".locks").mkdir(parents=True, exist_ok=True)
    with _file_lock(folder / ".locks" / path.name):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime >= started:
                return path.read_bytes()
        data = store.get_bytes(key)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fetch-", delete=False) as staged:
            staged.write(data)
        os.replace(staged.name, path)
    return data


def _with_ext(prefix: Path, ext: str) -> Path:
    return prefix.with_name(prefix.name + ext)  # not with_suffix: a shard name may contain dots


class ShardCache:
    """Shards ready to read: opened in place (local store) or from a bounded local cache.

    Files are named by content and verified against the manifest's sha256 before first use in
    this process, whether just downloaded or found in the cache (a mismatch there is deleted
    and fetched again). Several processes (e.g. the ranks of a node) may share one folder:
    downloads are atomic and a per-shard file lock lets only one of them fetch a shard.
    """

    def __init__(self, cache_dir: Path, cache_bytes: int):
        self.dir = cache_dir
        self.cache_bytes = cache_bytes
        (self.dir / ".locks").mkdir(parents=True, exist_ok=True)
        self._remove_abandoned_fetches()
        self._pool = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="shard-fetch")
        self._lock = threading.Lock()
        self._open: OrderedDict[str, Future[IndexedShard]] = OrderedDict()
        self._wanted: set[str] = set()  # never evicted while wanted
        self._reserved = 0  # bytes of downloads in flight
        self._warned_small = False

    def _remove_abandoned_fetches(self) -> None:
        """Staging folders left by killed processes (live ones are younger than this)."""
        cutoff = time.time() - ABANDONED_FETCH_S
        for entry in os.scandir(self.dir):
            if entry.name.startswith(".fetch-") and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)

    def set_wanted(self, shards: Sequence[ShardLocation]) -> None:
        with self._lock:
            self._wanted = {s.cache_name for s in shards}

    def prefetch(self, shards: Sequence[ShardLocation]) -> None:
        for shard in shards:
            self._future(shard)

    def get(self, shard: ShardLocation) -> IndexedShard:
        future = self._future(shard)
        try:
            return future.result()
        except BaseException:
            with self._lock:  # let the next call try again instead of repeating the error forever
                if self._open.get(shard.cache_name) is future:
                    del self._open[shard.cache_name]
            raise

    def _future(self, shard: ShardLocation) -> Future[IndexedShard]:
        name = shard.cache_name
        with self._lock:
            future = self._open.get(name)
            if future is None:
                future = self._open[name] = self._pool.submit(self._ready, shard)
                self._close_extra_maps()
            else:
                self._open.move_to_end(name)
            return future

    def _close_extra_maps(self) -> None:
        while len(self._open) > MAX_OPEN_SHARDS:
            name = next((n for n, f in self._open.items() if f.done() and n not in self._wanted), None)
            if name is None:
                return
            del self._open[name]

    def _ready(self, shard: ShardLocation) -> IndexedShard:
        local = shard.local_prefix
        if local is not None:
            return self._open_verified(shard, local, refetchable=False)
        prefix = self.dir / shard.cache_name
        with _file_lock(self.dir / ".locks" / shard.cache_name):
            if _with_ext(prefix, ".bin").exists() and _with_ext(prefix, ".idx").exists():
                try:
                    opened = self._open_verified(shard, prefix, refetchable=True)
                    os.utime(_with_ext(prefix, ".bin"))  # last use, for the LRU order
                    return opened
                except _StaleCacheFile as stale:
                    log.warning("%s; fetching it again", stale)
            return self._download(shard, prefix)

    def _open_verified(self, shard: ShardLocation, prefix: Path, refetchable: bool) -> IndexedShard:
        for info, ext in ((shard.idx, ".idx"), (shard.bin, ".bin")):
            path = _with_ext(prefix, ext)
            if not _intact(path, info):
                copy = f" (cached copy of {shard.store.url(info.key)})" if refetchable else ""
                message = (
                    f"{path}{copy} is missing or does not match the manifest's size {info.size} "
                    f"and sha256 {info.sha256}"
                )
                if refetchable:
                    _with_ext(prefix, ".bin").unlink(missing_ok=True)
                    _with_ext(prefix, ".idx").unlink(missing_ok=True)
                    raise _StaleCacheFile(message)
                raise ShardError(message)
        return self._open_shard(shard, prefix)

    def _open_shard(self, shard: ShardLocation, prefix: Path) -> IndexedShard:
        try:
            opened = IndexedShard(prefix)
        except ShardError as e:
            raise ShardError(f"{shard.uri}: {e}") from None
        if opened.num_tokens != shard.tokens:
            raise ShardError(f"{shard.uri}: holds {opened.num_tokens} tokens, the manifest says {shard.tokens}")
        return opened

    def _download(self, shard: ShardLocation, prefix: Path) -> IndexedShard:
        size = shard.bin.size + shard.idx.size
        self._make_room(size)
        try:
            with tempfile.TemporaryDirectory(dir=self.dir, prefix=".fetch-") as tmp:
                staged = Path(tmp) / "shard"
                for info, ext in ((shard.idx, ".idx"), (shard.bin, ".bin")):
                    path = shard.store.download(info.key, _with_ext(staged, ext))
                    actual = sha256_file(path)
                    if actual != info.sha256:
                        raise ShardError(
                            f"{shard.store.url(info.key)}: downloaded sha256 {actual} differs from "
                            f"the manifest's {info.sha256} (the object changed after the build?)"
                        )
                # Map before moving: the mapping follows the file, so a concurrent eviction
                # cannot pull it out from under us.
                opened = self._open_shard(shard, staged)
                os.replace(_with_ext(staged, ".idx"), _with_ext(prefix, ".idx"))
                os.replace(_with_ext(staged, ".bin"), _with_ext(prefix, ".bin"))
                return opened
        finally:
            with self._lock:
                self._reserved -= size

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used shards not wanted now until `incoming` more bytes fit."""
        with self._lock:
            self._reserved += incoming
            entries = sorted(self._entries(), key=lambda e: e[1])  # oldest use first
            used = sum(size for _, _, size in entries)
            for name, _, size in entries:
                if used + self._reserved <= self.cache_bytes:
                    break
                if name in self._wanted:
                    continue
                for ext in (".bin", ".idx"):
                    _with_ext(self.dir / name, ext).unlink(missing_ok=True)
                (self.dir / ".locks" / name).unlink(missing_ok=True)
                self._open.pop(name, None)
                used -= size
            if used + self._reserved > self.cache_bytes and not self._warned_small:
                self._warned_small = True
                log.warning(
                    "shard cache %s: the shards needed now (%d bytes) exceed cache_bytes=%d; "
                    "raise cache_bytes or lower prefetch",
                    self.dir, used + self._reserved, self.cache_bytes,
                )

    def _entries(self) -> Iterator[tuple[str, float, int]]:
        """(name, last use, bytes) of each complete cached shard."""
        for entry in os.scandir(self.dir):
            if entry.name.endswith(".bin") and not entry.name.startswith("."):
                name = entry.name.removesuffix(".bin")
                try:
                    stat = entry.stat()
                    idx_size = _with_ext(self.dir / name, ".idx").stat().st_size
                except FileNotFoundError:  # evicted meanwhile by another process
                    continue
                yield name, stat.st_mtime, stat.st_size + idx_size

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._open.clear()


class _StaleCacheFile(Exception):
    pass

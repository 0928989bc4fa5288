"""The training data loader: fixed blocks from token shards, mixed by weight, resumable exactly.

Each data source (a dataset manifest, or one source inside it) is one long token stream: its
shards concatenated in manifest order, cut into blocks of seq_len + 1 tokens (a block may
cross a shard boundary; only the final partial block is unused). A seeded global sequence
of blocks mixes the sources; global position p is a pure function of (seed, p) and the data:

- mixture: positions come in chunks of about MIXTURE_CHUNK_BLOCKS. After chunk k, source j has
  had exactly floor(k * MIXTURE_CHUNK_BLOCKS * w_j) blocks (w normalized, exact fractions),
  so the weights hold exactly in the long run; inside a chunk the sources are interleaved in a
  seeded random order.
- order within a source: the n-th block drawn from a source is block n mod B of that source's
  epoch n // B, in a seeded permutation that is new every epoch. The permutation is two-level
  for cache locality (as MosaicML Streaming's "py1s"): shuffle the shards, then shuffle the
  blocks within windows of SHUFFLE_WINDOW_TOKENS of that shard order. It is still a
  permutation of all blocks: each is visited exactly once per epoch.

The state is the global position (with the seed and seq_len, checked on load). On every
call of next_batch(n), made by all ranks in lockstep, the next n * world_size positions are
consumed and offset i of them goes to rank i mod world_size: no two ranks overlap, none is
skipped (TinyLlama's issue 67), and a resume with another world size (or micro-batch)
continues the same global sequence.

Shards come from the store into a local cache bounded in bytes (least recently opened shards
are evicted first; downloads atomic and sha256-verified), fetched in the background by a
thread pool ahead of the blocks that need them, and read through memory maps. A local-folder store is read in place without copying.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
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
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.manifest import DatasetManifest, ObjectInfo, TokenizerInfo, read_record, sha256_file
from storage.shards import IndexedShard, ShardError
from storage.store import Store, StoreError, open_object

log = logging.getLogger(__name__)

# Global positions per mixture chunk: the per-source counts are exact at every chunk end.
MIXTURE_CHUNK_BLOCKS = 4096
# Tokens per shuffle window: the blocks of this much consecutive (shard-shuffled) data are
# permuted together, so the shards in use at once are about this many tokens (0.5 GB as uint16).
SHUFFLE_WINDOW_TOKENS = 1 << 28
# How often (in global positions) the prefetcher replans; it looks two mixture chunks ahead.
PLAN_EVERY_BLOCKS = 256
DOWNLOAD_THREADS = 4
# Memory maps held open at once (the kernel's default limit is 65530 maps per process).
MAX_OPEN_SHARDS = 1024
# A staging folder untouched this long belongs to a process that died mid-download.
ABANDONED_FETCH_S = 3600

# Tags that keep the random streams of the different decisions independent.
_MIXTURE_STREAM, _SHARD_ORDER_STREAM, _WINDOW_STREAM = 0, 1, 2


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tinyllama" / "shards"


class DataError(ValueError):
    """The training data cannot be used as configured; the message names the manifest or shard."""


class DataSource(BaseModel):
    """One entry of the run config's data mixture."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: str = Field(min_length=1, description="URI of a manifest.json: a path, file:// or s3://")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="Mixture weight, normalized over sources")
    source: str | None = Field(None, description="Only the shards of this source within the manifest")


def read_manifest(uri: str) -> tuple[Store, DatasetManifest]:
    """The manifest at `uri` and the store of its folder (shard keys are relative to it)."""
    try:
        store, key = open_object(uri)
        return store, read_record(store, key, DatasetManifest)
    except ValidationError as e:
        raise DataError(f"{uri}: not a valid dataset manifest:\n{e}") from None
    except StoreError as e:
        raise DataError(f"cannot read dataset manifest {uri}: {e}") from None


def shared_tokenizer(manifests: Sequence[tuple[str, DatasetManifest]]) -> TokenizerInfo:
    """The tokenizer all manifests (given with their URIs) share; DataError naming two that differ
    in tokenizer or in document convention (a BOS at each document's start or not)."""
    if not manifests:
        raise DataError("no data sources given")
    first_uri, first = manifests[0]
    for uri, manifest in manifests[1:]:
        if manifest.tokenizer.sha256 != first.tokenizer.sha256:
            raise DataError(
                "data sources use different tokenizers, so their token ids do not mean the same "
                f"thing: {first_uri} has tokenizer {first.tokenizer.sha256} "
                f"(vocab {first.tokenizer.vocab_size}) but {uri} has {manifest.tokenizer.sha256} "
                f"(vocab {manifest.tokenizer.vocab_size})"
            )
        if manifest.documents != first.documents:
            raise DataError(
                "data sources frame documents differently, so one run would mix two conventions: "
                f"{first_uri} has {first.documents.model_dump()} but {uri} has {manifest.documents.model_dump()}; "
                "rebuild one of them with the other's `bos` setting"
            )
    return first.tokenizer


def load_manifests(sources: Sequence[DataSource]) -> tuple[list[DatasetManifest], TokenizerInfo]:
    """Read and check every source's manifest; returns them (in order) and their shared tokenizer."""
    read = [(s.manifest, read_manifest(s.manifest)[1]) for s in sources]
    return [m for _, m in read], shared_tokenizer(read)


@dataclass(frozen=True)
class _Shard:
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


def _with_ext(prefix: Path, ext: str) -> Path:
    return prefix.with_name(prefix.name + ext)  # not with_suffix: a shard name may contain dots


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class _SourceStream:
    """One data source's blocks and its per-epoch two-level permutation."""

    def __init__(self, index: int, shards: list[_Shard], block_len: int, seed: int, name: str):
        self.index, self.name, self.seed = index, name, seed
        self.shards = shards
        self.block_len = block_len
        # Token offset where each shard starts in the source stream, plus the total at the end.
        self.starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s.tokens for s in shards], out=self.starts[1:])
        self.num_blocks = int(self.starts[-1]) // block_len
        if self.num_blocks == 0:
            raise DataError(
                f"{name}: {self.starts[-1]} tokens in {len(shards)} shards, fewer than one block "
                f"of seq_len + 1 = {block_len} tokens"
            )
        # Block b belongs to the shard holding its first token: shard s owns [first[s], first[s+1]).
        self.first_block = np.minimum(-(-self.starts // block_len), self.num_blocks)
        self.window_blocks = max(1, SHUFFLE_WINDOW_TOKENS // block_len)
        self._epoch_order = functools.lru_cache(maxsize=2)(self._compute_epoch_order)
        self._window_order = functools.lru_cache(maxsize=4)(self._compute_window_order)

    def _compute_epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The shards in this epoch's order and where each one's blocks begin in that order."""
        order = _rng(self.seed, _SHARD_ORDER_STREAM, self.index, epoch).permutation(len(self.shards))
        owned = np.diff(self.first_block)[order]
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(owned, out=offsets[1:])
        return order, offsets

    def _compute_window_order(self, epoch: int, window: int) -> np.ndarray:
        size = min(self.window_blocks, self.num_blocks - window * self.window_blocks)
        return _rng(self.seed, _WINDOW_STREAM, self.index, epoch, window).permutation(size)

    def blocks(self, draws: np.ndarray) -> np.ndarray:
        """Block ids of this source's draws number `draws` (0, 1, ... over the whole run)."""
        epoch, rest = np.divmod(draws, self.num_blocks)
        window, offset = np.divmod(rest, self.window_blocks)
        group = epoch * (self.num_blocks // self.window_blocks + 1) + window
        out = np.empty_like(draws)
        for key in np.unique(group):
            sel = group == key
            e, w = int(epoch[sel][0]), int(window[sel][0])
            order, offsets = self._epoch_order(e)
            rank = w * self.window_blocks + self._window_order(e, w)[offset[sel]]
            owner = np.searchsorted(offsets, rank, side="right") - 1
            out[sel] = self.first_block[order[owner]] + (rank - offsets[owner])
        return out

    def shard_span(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first and last shard (indices into self.shards) that each block's tokens touch."""
        start = blocks * self.block_len
        first = np.searchsorted(self.starts, start, side="right") - 1
        last = np.searchsorted(self.starts, start + self.block_len - 1, side="right") - 1
        return first, last


class _Mixture:
    """Which source, and which of its draws, sits at each global position."""

    def __init__(self, weights: Sequence[float], seed: int):
        total = sum(Fraction(w) for w in weights)
        self.fractions = [Fraction(w) / total for w in weights]
        self.seed = seed

    def _drawn_before(self, positions: int) -> np.ndarray:
        """Per source, blocks drawn before a chunk boundary at `positions` (a multiple of the chunk)."""
        return np.array([positions * f.numerator // f.denominator for f in self.fractions], np.int64)

    def chunk_start(self, chunk: int) -> int:
        return int(self._drawn_before(chunk * MIXTURE_CHUNK_BLOCKS).sum())

    def chunk_of(self, position: int) -> int:
        # Chunk k starts within len(sources) - 1 positions before k * MIXTURE_CHUNK_BLOCKS.
        chunk = position // MIXTURE_CHUNK_BLOCKS
        return chunk + 1 if position >= self.chunk_start(chunk + 1) else chunk

    def chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """For each position of the chunk: its source, and that source's draw number."""
        before = self._drawn_before(chunk * MIXTURE_CHUNK_BLOCKS)
        counts = self._drawn_before((chunk + 1) * MIXTURE_CHUNK_BLOCKS) - before
        sources = np.repeat(np.arange(len(counts)), counts)
        _rng(self.seed, _MIXTURE_STREAM, chunk).shuffle(sources)
        draws = np.empty(len(sources), dtype=np.int64)
        for j, count in enumerate(counts):
            draws[sources == j] = before[j] + np.arange(count)
        return sources, draws


class _ShardCache:
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

    def set_wanted(self, shards: Sequence[_Shard]) -> None:
        with self._lock:
            self._wanted = {s.cache_name for s in shards}

    def prefetch(self, shards: Sequence[_Shard]) -> None:
        for shard in shards:
            self._future(shard)

    def get(self, shard: _Shard) -> IndexedShard:
        future = self._future(shard)
        try:
            return future.result()
        except BaseException:
            with self._lock:  # let the next call try again instead of repeating the error forever
                if self._open.get(shard.cache_name) is future:
                    del self._open[shard.cache_name]
            raise

    def _future(self, shard: _Shard) -> Future[IndexedShard]:
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

    def _ready(self, shard: _Shard) -> IndexedShard:
        local = shard.local_prefix
        if local is not None:
            return self._open_verified(shard, local, refetchable=False)
        prefix = self.dir / shard.cache_name
        with self._file_lock(shard.cache_name):
            if _with_ext(prefix, ".bin").exists() and _with_ext(prefix, ".idx").exists():
                try:
                    opened = self._open_verified(shard, prefix, refetchable=True)
                    os.utime(_with_ext(prefix, ".bin"))  # last use, for the LRU order
                    return opened
                except _StaleCacheFile as stale:
                    log.warning("%s; fetching it again", stale)
            return self._download(shard, prefix)

    def _open_verified(self, shard: _Shard, prefix: Path, refetchable: bool) -> IndexedShard:
        for info, ext in ((shard.idx, ".idx"), (shard.bin, ".bin")):
            path = _with_ext(prefix, ext)
            try:
                intact = path.stat().st_size == info.size and sha256_file(path) == info.sha256
            except FileNotFoundError:
                intact = False
            if not intact:
                copy = f" (cached copy of {shard.store.url(info.key)})" if refetchable else ""
                message = (
                    f"{path}{copy} is missing or does not match the manifest's size {info.size} "
                    f"and sha256 {info.sha256}"
                )
                if refetchable:
                    _with_ext(prefix, ".bin").unlink(missing_ok=True)
                    _with_ext(prefix, ".idx").unlink(missing_ok=True)
                    raise _StaleCacheFile(message)
                raise DataError(message)
        return self._open_shard(shard, prefix)

    def _open_shard(self, shard: _Shard, prefix: Path) -> IndexedShard:
        try:
            opened = IndexedShard(prefix)
        except ShardError as e:
            raise DataError(f"{shard.uri}: {e}") from None
        if opened.num_tokens != shard.tokens:
            raise DataError(f"{shard.uri}: holds {opened.num_tokens} tokens, the manifest says {shard.tokens}")
        return opened

    def _download(self, shard: _Shard, prefix: Path) -> IndexedShard:
        size = shard.bin.size + shard.idx.size
        self._make_room(size)
        try:
            with tempfile.TemporaryDirectory(dir=self.dir, prefix=".fetch-") as tmp:
                staged = Path(tmp) / "shard"
                for info, ext in ((shard.idx, ".idx"), (shard.bin, ".bin")):
                    path = shard.store.download(info.key, _with_ext(staged, ext))
                    actual = sha256_file(path)
                    if actual != info.sha256:
                        raise DataError(
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

    @contextlib.contextmanager
    def _file_lock(self, name: str) -> Iterator[None]:
        with open(self.dir / ".locks" / name, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._open.clear()


class _StaleCacheFile(Exception):
    pass


class BlockLoader:
    """This rank's micro-batches of [blocks, seq_len + 1] token ids from a weighted data mixture.

    All ranks construct it with the same sources, seq_len and seed, and call next_batch with
    the same `blocks` in lockstep. state_dict() is {"position": blocks consumed by all ranks,
    "seed", "seq_len"}. `prefetch` is how many upcoming shards (in order of first need) are
    fetched and verified in the background; `cache_bytes` bounds the cache folder, which the
    ranks of a node may share. A local-folder store is read in place and uses no cache.
    """

    def __init__(
        self,
        sources: Sequence[DataSource],
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int = 16 << 30,
        prefetch: int = 16,
    ):
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if cache_bytes <= 0 or prefetch < 0:
            raise DataError(f"cache_bytes must be positive and prefetch non-negative, got {cache_bytes}, {prefetch}")
        sources = [DataSource.model_validate(s) for s in sources]
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.block_len = seq_len + 1
        self.prefetch = prefetch

        read = [read_manifest(s.manifest) for s in sources]
        self.tokenizer = shared_tokenizer([(s.manifest, m) for s, (_, m) in zip(sources, read)])
        self.vocab_size = self.tokenizer.vocab_size
        self.sources = [
            _SourceStream(j, self._shards(source, store, manifest), self.block_len, seed, self._label(source))
            for j, (source, (store, manifest)) in enumerate(zip(sources, read))
        ]
        self._mixture = _Mixture([s.weight for s in sources], seed)
        # Global shard ids: source j's shard s is self._all_shards[self._shard_base[j] + s].
        self._all_shards = [shard for source in self.sources for shard in source.shards]
        self._shard_base = np.cumsum([0] + [len(s.shards) for s in self.sources])
        self._chunk = functools.lru_cache(maxsize=4)(self._compute_chunk)
        self._cache = _ShardCache(Path(cache_dir) if cache_dir is not None else default_cache_dir(), cache_bytes)
        self.position = 0
        self._planned_at: int | None = None

    @staticmethod
    def _label(source: DataSource) -> str:
        return source.manifest + (f" (source {source.source!r})" if source.source else "")

    def _shards(self, source: DataSource, store: Store, manifest: DatasetManifest) -> list[_Shard]:
        shards = [s for s in manifest.shards if source.source is None or s.source == source.source]
        if source.source is not None and not shards:
            present = sorted({s.source for s in manifest.shards})
            raise DataError(f"{source.manifest}: no shards of source {source.source!r}; it has {present}")
        return [_Shard(store, s.prefix, s.bin, s.idx, s.tokens) for s in shards]

    def _compute_chunk(self, chunk: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Chunk start, then per position: source, block, first and last global shard id."""
        sources, draws = self._mixture.chunk(chunk)
        blocks = np.empty_like(draws)
        first = np.empty_like(draws)
        last = np.empty_like(draws)
        for j, stream in enumerate(self.sources):
            sel = sources == j
            blocks[sel] = stream.blocks(draws[sel])
            lo, hi = stream.shard_span(blocks[sel])
            first[sel], last[sel] = lo + self._shard_base[j], hi + self._shard_base[j]
        return self._mixture.chunk_start(chunk), sources, blocks, first, last

    def _layout(self, start: int, stop: int) -> tuple[np.ndarray, ...]:
        """(source, block, first shard, last shard) of global positions [start, stop)."""
        parts = []
        chunk = self._mixture.chunk_of(start)
        while start < stop:
            begin, *columns = self._chunk(chunk)
            end = begin + len(columns[0])
            parts.append([c[start - begin : min(stop, end) - begin] for c in columns])
            start, chunk = end, chunk + 1
        return tuple(np.concatenate(c) for c in zip(*parts))

    def _plan(self) -> None:
        """Fetch, in order of first need, the next `prefetch` shards of the global sequence."""
        _, _, first, last = self._layout(self.position, self.position + 2 * MIXTURE_CHUNK_BLOCKS)
        needed = np.stack([first, last], axis=1).ravel()
        ids, first_seen = np.unique(needed, return_index=True)
        upcoming = [self._all_shards[i] for i in ids[np.argsort(first_seen)][: max(self.prefetch, 1)]]
        self._cache.set_wanted(upcoming)
        if self.prefetch:
            self._cache.prefetch(upcoming)
        self._planned_at = self.position

    def next_batch(self, blocks: int) -> torch.Tensor:
        """This rank's next `blocks` blocks: int64 [blocks, seq_len + 1]; inputs are [:, :-1], targets [:, 1:]."""
        if blocks < 1:
            raise DataError(f"blocks must be positive, got {blocks}")
        if self._planned_at is None or self.position - self._planned_at >= PLAN_EVERY_BLOCKS:
            self._plan()
        span = blocks * self.world_size
        sources, block_ids, first, last = self._layout(self.position, self.position + span)
        mine = slice(self.rank, span, self.world_size)
        out = np.empty((blocks, self.block_len), dtype=np.int64)
        for row, (j, block, lo, hi) in enumerate(zip(sources[mine], block_ids[mine], first[mine], last[mine])):
            self._read_block(out[row], self.sources[j], int(block), int(lo), int(hi))
        if out.max() >= self.vocab_size:  # caught here, not as a device-side assert in the embedding
            row = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            stream = self.sources[sources[mine][row]]
            raise DataError(
                f"{stream.name}: block {block_ids[mine][row]} holds token id {out[row].max()}, "
                f"outside the tokenizer's vocabulary of {self.vocab_size}"
            )
        self.position += span
        return torch.from_numpy(out)

    def _read_block(self, out: np.ndarray, stream: _SourceStream, block: int, first: int, last: int) -> None:
        token = block * self.block_len
        filled = 0
        for shard_id in range(first, last + 1):
            local = shard_id - self._shard_base[stream.index]
            offset = token + filled - int(stream.starts[local])
            shard = self._cache.get(self._all_shards[shard_id])
            take = min(self.block_len - filled, shard.num_tokens - offset)
            out[filled : filled + take] = shard.tokens(offset, take)
            filled += take

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "seq_len"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"loader state was saved with {key}={state[key]} but this loader has "
                    f"{key}={getattr(self, key)}: its position would index a different sequence"
                )
        if state["position"] < 0:
            raise DataError(f"loader state has a negative position {state['position']}")
        self.position = int(state["position"])
        self._planned_at = None

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> BlockLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
- nodes: with `nodes` N > 1 (the run's node count when it started, kept in the state) global
  position p belongs to node p mod N, and each node has its own mixture and draw counters
  over its own share of every shuffle window: window w's blocks (N x SHUFFLE_WINDOW_TOKENS), in
  shard order, are cut into N contiguous pieces and node c draws only from piece c (shuffled
  within it), as MosaicML Streaming assigns shards to nodes. The epoch then shuffles runs of
  SHUFFLE_RUN_TOKENS of consecutive shards rather than single shards, since a block crossing
  into the next shard needs that one too. So a node fetches ~1/N of the shards per epoch (plus
  one per run and the shards straddling two pieces), the weights hold on every node, and each
  epoch of a node visits its pieces once: together the nodes visit every block once per epoch.

The state is the global position (with the seed, seq_len and nodes; the first two are checked
on load, the third adopted). On every call of next_batch(n), made by all ranks in lockstep, the
next n * world_size positions are consumed and each rank takes every world_size-th of them, at
an offset that puts the ranks of one node (world_size / N consecutive ranks) on that node's
positions: no two ranks overlap, none is skipped (TinyLlama's issue 67), and a resume with
another world size (or micro-batch) continues the same global sequence (it stays node-local
when the new world size is a multiple of N).

Each manifest (its header, and its shard table: a row per shard, as columns) reaches a node once:
the first of its ranks downloads it into the cache folder, the others read that copy
(storage/shard_cache.py).
Shards come from the store into a local cache bounded in bytes (least recently opened shards
are evicted first; downloads atomic and sha256-verified), fetched in the background by a
thread pool ahead of the blocks that need them, and read through memory maps. A local-folder store is read in place without copying.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from pydantic import ValidationError

from model.train_config import DataSource
from storage import manifest as manifests
from storage.manifest import DatasetManifest, ManifestError, ShardTable, TokenizerInfo
from storage.shard_cache import ShardCache, ShardLocation, node_copy, node_fetch
from storage.shards import ShardError
from storage.store import InvalidKey, ObjectNotFound, Store, StoreAccessError, check_key, open_object

# Global positions per mixture chunk: the per-source counts are exact at every chunk end.
MIXTURE_CHUNK_BLOCKS = 4096
# Tokens per shuffle window: the blocks of this much consecutive (shard-shuffled) data are
# permuted together, so the shards in use at once are about this many tokens (0.5 GB as uint16).
SHUFFLE_WINDOW_TOKENS = 1 << 28
# With several nodes, consecutive shards of about this many tokens stay together (see set_nodes).
SHUFFLE_RUN_TOKENS = 1 << 25
# How often (in global positions) the prefetcher replans; it looks two mixture chunks ahead.
PLAN_EVERY_BLOCKS = 256

# The keys storage.store.check_key refuses (empty, absolute, a folder, a '.', '..' or empty segment,
# a backslash or NUL), as one regex over a shard table's column: a call per shard costs seconds.
UNSAFE_KEY = r"[\\\x00]|(^|/)\.{0,2}(/|$)"

# The cache folder's subfolder of shard tables (outside the shards' byte budget: they are small).
MANIFESTS_DIR = "manifests"

# Tags that keep the random streams of the different decisions independent.
_MIXTURE_STREAM, _SHARD_ORDER_STREAM, _WINDOW_STREAM = 0, 1, 2


class DataError(ValueError):
    """The training data cannot be used as configured; the message names the manifest or shard."""


def read_manifest(uri: str, cache_dir: Path | None = None) -> tuple[Store, DatasetManifest]:
    """The manifest's header at `uri` and the store of its folder (keys are relative to it; one
    that would leave that folder is refused here, naming the manifest, before anything is read).
    With `cache_dir`, a folder the node's ranks share, the header is fetched once per node."""
    try:
        store, key = open_object(uri)
        fetched = None if cache_dir is None or store.local_path(key) else node_fetch(store, key, cache_dir / MANIFESTS_DIR)
        manifest = manifests.read_manifest(store, key, fetched)
    except ValidationError as e:
        raise DataError(f"{uri}: not a valid dataset manifest:\n{e}") from None
    except (ObjectNotFound, StoreAccessError, InvalidKey) as e:  # an outage past the store's retries is retried
        raise DataError(f"cannot read dataset manifest {uri}: {e}") from None
    except ManifestError as e:
        raise DataError(str(e)) from None
    for what, shard_key in (("tokenizer", manifest.tokenizer.key), ("shard table", manifest.shard_table.key)):
        try:
            check_key(shard_key)
        except InvalidKey as e:
            raise DataError(f"{uri}: {what}: {e}") from None
    return store, manifest


def read_shards(uri: str, store: Store, manifest: DatasetManifest, cache_dir: Path) -> ShardTable:
    """The manifest's shard table, verified; fetched once per node into `cache_dir`, which the
    node's ranks share (a local-folder store's is read in place). Its shard keys are checked."""
    info = manifest.shard_table
    try:
        local = store.local_path(info.key) or node_copy(store, info, cache_dir / MANIFESTS_DIR)
        table = manifests.read_shard_table(store, open_object(uri)[1], manifest, local.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{uri}: its shard table {store.url(info.key)} is missing") from None
    except (ShardError, ObjectNotFound, StoreAccessError, InvalidKey) as e:
        raise DataError(f"{uri}: shard table: {e}") from None
    except ManifestError as e:
        raise DataError(str(e)) from None
    prefixes = table.table["prefix"]
    unsafe = prefixes.filter(pc.or_kleene(pc.is_null(prefixes), pc.match_substring_regex(prefixes, UNSAFE_KEY)))
    if len(unsafe):
        prefix = unsafe[0].as_py()
        try:
            check_key(prefix)  # raises, with the store's own words
        except InvalidKey as e:
            raise DataError(f"{uri}: shard {prefix!r}: {e}") from None
    return table


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


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _piece(size: int, node: int, nodes: int) -> tuple[int, int]:
    """Start and length of `node`'s contiguous share of `size` blocks cut into `nodes` pieces."""
    start = node * size // nodes
    return start, (node + 1) * size // nodes - start


class _SourceStream:
    """One data source's blocks and its per-epoch two-level permutation."""

    def __init__(self, index: int, store: Store, shards: ShardTable, block_len: int, seed: int, name: str):
        self.index, self.name, self.seed = index, name, seed
        self.store, self.shards = store, shards
        self.block_len = block_len
        # Token offset where each shard starts in the source stream, plus the total at the end.
        self.starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum(shards.tokens, out=self.starts[1:])
        self.num_blocks = int(self.starts[-1]) // block_len
        if self.num_blocks == 0:
            raise DataError(
                f"{name}: {self.starts[-1]} tokens in {len(shards)} shards, fewer than one block "
                f"of seq_len + 1 = {block_len} tokens"
            )
        # Block b belongs to the shard holding its first token: shard s owns [first[s], first[s+1]).
        self.first_block = np.minimum(-(-self.starts // block_len), self.num_blocks)
        self.location = functools.lru_cache(maxsize=4096)(self._location)
        self.set_nodes(1)

    def _location(self, shard: int) -> ShardLocation:
        """Shard `shard` of this source, as the cache fetches it (made when needed, not per shard up front)."""
        row = self.shards.shard(shard)
        return ShardLocation(self.store, row.prefix, row.bin, row.idx, row.tokens)

    def set_nodes(self, nodes: int) -> None:
        """Share the blocks among `nodes`: each one's shuffle windows hold SHUFFLE_WINDOW_TOKENS."""
        self.nodes = nodes
        self.window_blocks = max(1, SHUFFLE_WINDOW_TOKENS * nodes // self.block_len)
        # Several nodes: the epoch shuffles runs of consecutive shards, so that a block crossing
        # into the next shard mostly finds it on its own node (one extra shard per run, not per shard).
        mean_shard_tokens = self.starts[-1] / len(self.shards)
        self.run_shards = 1 if nodes == 1 else max(1, round(SHUFFLE_RUN_TOKENS / mean_shard_tokens))
        self._epoch_order = functools.lru_cache(maxsize=2)(self._compute_epoch_order)
        self._piece_order = functools.lru_cache(maxsize=8)(self._compute_piece_order)

    def _compute_epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The shards in this epoch's order and where each one's blocks begin in that order."""
        if self.nodes == 1:
            order = _rng(self.seed, _SHARD_ORDER_STREAM, self.index, epoch).permutation(len(self.shards))
        else:
            runs = -(-len(self.shards) // self.run_shards)
            shuffled = _rng(self.seed, _SHARD_ORDER_STREAM, self.index, epoch, self.nodes).permutation(runs)
            order = np.concatenate([np.arange(r * self.run_shards, min((r + 1) * self.run_shards, len(self.shards)))
                                    for r in shuffled])
        owned = np.diff(self.first_block)[order]
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(owned, out=offsets[1:])
        return order, offsets

    def _window_size(self, window: int) -> int:
        return min(self.window_blocks, self.num_blocks - window * self.window_blocks)

    def _compute_piece_order(self, epoch: int, window: int, node: int) -> np.ndarray:
        size = _piece(self._window_size(window), node, self.nodes)[1]
        extra = (self.nodes, node) if self.nodes > 1 else ()  # one node: the whole window, as before nodes existed
        return _rng(self.seed, _WINDOW_STREAM, self.index, epoch, window, *extra).permutation(size)

    def node_blocks(self, node: int) -> int:
        """Blocks of one epoch that fall to `node` (its pieces of every window)."""
        full_windows = self.num_blocks // self.window_blocks
        last = self.num_blocks - full_windows * self.window_blocks
        return full_windows * _piece(self.window_blocks, node, self.nodes)[1] + _piece(last, node, self.nodes)[1]

    def blocks(self, draws: np.ndarray, node: int = 0) -> np.ndarray:
        """Block ids of `node`'s draws number `draws` (0, 1, ... over the whole run) from this source."""
        epoch, rest = np.divmod(draws, self.node_blocks(node))
        full_windows = self.num_blocks // self.window_blocks
        full_piece = _piece(self.window_blocks, node, self.nodes)[1]
        in_full = rest < full_windows * full_piece
        window = np.where(in_full, rest // max(full_piece, 1), full_windows)
        offset = rest - window * full_piece
        group = epoch * (full_windows + 1) + window
        out = np.empty_like(draws)
        for key in np.unique(group):
            sel = group == key
            e, w = int(epoch[sel][0]), int(window[sel][0])
            order, offsets = self._epoch_order(e)
            lo = _piece(self._window_size(w), node, self.nodes)[0]
            rank = w * self.window_blocks + lo + self._piece_order(e, w, node)[offset[sel]]
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

    def chunk(self, chunk: int, node: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """For each position of a node's chunk: its source, and that source's draw number."""
        before = self._drawn_before(chunk * MIXTURE_CHUNK_BLOCKS)
        counts = self._drawn_before((chunk + 1) * MIXTURE_CHUNK_BLOCKS) - before
        sources = np.repeat(np.arange(len(counts)), counts)
        _rng(self.seed, _MIXTURE_STREAM, chunk, *((node,) if node else ())).shuffle(sources)
        draws = np.empty(len(sources), dtype=np.int64)
        for j, count in enumerate(counts):
            draws[sources == j] = before[j] + np.arange(count)
        return sources, draws


class BlockLoader:
    """This rank's micro-batches of [blocks, seq_len + 1] token ids from a weighted data mixture.

    All ranks construct it with the same sources, seq_len, seed and nodes, and call next_batch
    with the same `blocks` in lockstep. `nodes` is how many nodes the ranks run on (ranks
    numbered node by node, as torchrun and Ray Train number them): each node then fetches ~1/nodes
    of the data. state_dict() is {"position": blocks consumed by all ranks, "seed", "seq_len",
    "nodes"}; a loaded state's `nodes` replaces the constructor's, so a resume on another
    cluster continues the same sequence. `prefetch` is how many upcoming shards (in order of
    first need) are fetched and verified in the background; `cache_bytes` bounds the cache
    folder, which the ranks of a node share. A local-folder store is read in place, uncached.
    """

    def __init__(
        self,
        sources: Sequence[DataSource],
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        cache_dir: str | os.PathLike,
        nodes: int = 1,
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

        read = [read_manifest(s.manifest, Path(cache_dir)) for s in sources]
        self.tokenizer = shared_tokenizer([(s.manifest, m) for s, (_, m) in zip(sources, read)])
        self.vocab_size = self.tokenizer.vocab_size
        self._cache = ShardCache(Path(cache_dir), cache_bytes)
        self.sources = [
            _SourceStream(j, store, self._shards(source, store, manifest), self.block_len, seed, self._label(source))
            for j, (source, (store, manifest)) in enumerate(zip(sources, read))
        ]
        self._mixture = _Mixture([s.weight for s in sources], seed)
        # Global shard ids: source j's shard s has id self._shard_base[j] + s.
        self._shard_base = np.cumsum([0] + [len(s.shards) for s in self.sources])
        self.position = 0
        self._set_nodes(nodes)

    def _set_nodes(self, nodes: int) -> None:
        if nodes < 1:
            raise DataError(f"nodes must be positive, got {nodes}")
        for stream in self.sources:
            stream.set_nodes(nodes)
            short = [c for c in range(nodes) if stream.node_blocks(c) == 0]
            if short:
                raise DataError(
                    f"{stream.name}: {stream.num_blocks} blocks cannot be shared by {nodes} nodes "
                    f"(node {short[0]} would get none)"
                )
        self.nodes = nodes
        # This rank's positions are position + offset + k * world_size: the ranks of node c take the
        # positions p with p mod nodes = c. Without a whole number of ranks per node, offset = rank.
        per_node, whole = divmod(self.world_size, nodes)
        self.offset = (self.rank % per_node) * nodes + self.rank // per_node if per_node and not whole else self.rank
        self._chunk = functools.lru_cache(maxsize=2 * nodes + 4)(self._compute_chunk)
        self._planned_at: int | None = None

    @staticmethod
    def _label(source: DataSource) -> str:
        return source.manifest + (f" (source {source.source!r})" if source.source else "")

    def _shards(self, source: DataSource, store: Store, manifest: DatasetManifest) -> ShardTable:
        shards = read_shards(source.manifest, store, manifest, self._cache.dir)
        if source.source is None:
            return shards
        selected = shards.of_source(source.source)
        if not len(selected):
            raise DataError(f"{source.manifest}: no shards of source {source.source!r}; it has {sorted(shards.source_names())}")
        return selected

    def _location(self, shard: int) -> ShardLocation:
        """The shard of a global shard id."""
        j = int(np.searchsorted(self._shard_base, shard, side="right")) - 1
        return self.sources[j].location(shard - int(self._shard_base[j]))

    def _compute_chunk(self, node: int, chunk: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A node's chunk: its start, then per position: source, block, first and last global shard id."""
        sources, draws = self._mixture.chunk(chunk, node)
        blocks = np.empty_like(draws)
        first = np.empty_like(draws)
        last = np.empty_like(draws)
        for j, stream in enumerate(self.sources):
            sel = sources == j
            blocks[sel] = stream.blocks(draws[sel], node)
            lo, hi = stream.shard_span(blocks[sel])
            first[sel], last[sel] = lo + self._shard_base[j], hi + self._shard_base[j]
        return self._mixture.chunk_start(chunk), sources, blocks, first, last

    def _node_layout(self, node: int, start: int, stop: int) -> tuple[np.ndarray, ...]:
        """(source, block, first shard, last shard) of a node's positions [start, stop)."""
        parts = []
        chunk = self._mixture.chunk_of(start)
        while start < stop:
            begin, *columns = self._chunk(node, chunk)
            end = begin + len(columns[0])
            parts.append([c[start - begin : min(stop, end) - begin] for c in columns])
            start, chunk = end, chunk + 1
        return tuple(np.concatenate(c) for c in zip(*parts))

    def _layout(self, positions: np.ndarray) -> tuple[np.ndarray, ...]:
        """(source, block, first shard, last shard) of each global position."""
        node, local = np.divmod(positions, self.nodes)[::-1]
        out = [np.empty_like(positions) for _ in range(4)]
        for c in np.unique(node):
            sel = node == c
            lo, hi = int(local[sel].min()), int(local[sel].max()) + 1
            for column, values in zip(out, self._node_layout(int(c), lo, hi)):
                column[sel] = values[local[sel] - lo]
        return tuple(out)

    def _plan(self) -> None:
        """Fetch, in order of first need, the next `prefetch` shards of this rank's node."""
        per_node, whole = divmod(self.world_size, self.nodes)
        nodes = [self.offset % self.nodes] if per_node and not whole else range(self.nodes)
        horizon = 2 * MIXTURE_CHUNK_BLOCKS
        needed, when = [], []
        for c in nodes:
            start = (self.position - c + self.nodes - 1) // self.nodes  # the node's next position
            _, _, first, last = self._node_layout(c, start, start + horizon)
            order = (start + np.arange(horizon)) * self.nodes + c  # global positions
            needed += [first, last]
            when += [order, order]
        needed, when = np.concatenate(needed), np.concatenate(when)
        by_need = np.argsort(when, kind="stable")
        ids, first_seen = np.unique(needed[by_need], return_index=True)
        upcoming = [self._location(int(i)) for i in ids[np.argsort(first_seen)][: max(self.prefetch, 1)]]
        self._cache.set_wanted(upcoming)
        if self.prefetch:
            self._cache.prefetch(upcoming)
        self._planned_at = self.position

    def next_batch(self, blocks: int) -> torch.Tensor:
        """This rank's next `blocks` blocks: int64 [blocks, seq_len + 1]; inputs are [:, :-1], targets [:, 1:]."""
        if blocks < 1:
            raise DataError(f"blocks must be positive, got {blocks}")
        if self._planned_at is None or self.position - self._planned_at >= PLAN_EVERY_BLOCKS * self.nodes:
            self._plan()
        positions = self.position + self.offset + self.world_size * np.arange(blocks)
        sources, block_ids, first, last = self._layout(positions)
        out = np.empty((blocks, self.block_len), dtype=np.int64)
        for row, (j, block, lo, hi) in enumerate(zip(sources, block_ids, first, last)):
            self._read_block(out[row], self.sources[j], int(block), int(lo), int(hi))
        if out.max() >= self.vocab_size:  # caught here, not as a device-side assert in the embedding
            row = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            raise DataError(
                f"{self.sources[sources[row]].name}: block {block_ids[row]} holds token id {out[row].max()}, "
                f"outside the tokenizer's vocabulary of {self.vocab_size}"
            )
        self.position += blocks * self.world_size
        return torch.from_numpy(out)

    def _read_block(self, out: np.ndarray, stream: _SourceStream, block: int, first: int, last: int) -> None:
        token = block * self.block_len
        filled = 0
        for shard_id in range(first, last + 1):
            local = shard_id - self._shard_base[stream.index]
            offset = token + filled - int(stream.starts[local])
            try:
                shard = self._cache.get(stream.location(local))
            except ShardError as e:  # corrupt or changed since the build: the same every time
                raise DataError(str(e)) from None
            except InvalidKey as e:  # e.g. a symlink out of a local store
                raise DataError(f"{stream.name}: {e}") from None
            take = min(self.block_len - filled, shard.num_tokens - offset)
            out[filled : filled + take] = shard.tokens(offset, take)
            filled += take

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "nodes": self.nodes}

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
        self._set_nodes(int(state.get("nodes", 1)))  # states from before node-aware loading: one node

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> BlockLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

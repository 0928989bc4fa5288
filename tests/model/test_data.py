"""The block loader: exact coverage, rank split, resume, mixture, tokenizer checks, the shard cache.

Blocks are identified by their tokens (synthetic documents are random), compared with the
blocks cut straight from the shards, so every check goes through the loader's real reads.
The mixture chunk and shuffle window are shrunk so that small data crosses their boundaries.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import model.data
from model.data import BlockLoader, DataError, DataSource, load_manifests
from storage.build_layout import MANIFEST, SHARD_TABLE
from storage.manifest import ShardTable, new_manifest, put_manifest, read_manifest, read_shard_table, write_record
from storage.store import InvalidKey, check_key, open_object
from tests.model.synthetic import source_blocks, write_synthetic_build
from tests.model.test_checkpoint_reads import GetCounter

SEQ_LEN = 15  # blocks of 16 tokens


@pytest.fixture(autouse=True)
def small_windows(monkeypatch):
    monkeypatch.setattr(model.data, "MIXTURE_CHUNK_BLOCKS", 64)
    monkeypatch.setattr(model.data, "SHUFFLE_WINDOW_TOKENS", 40 * (SEQ_LEN + 1))


def build(store_uri: str, name: str = "toy", tokenizer: str = "synthetic", **sources: list[int]) -> str:
    sources = sources or {"web": [37, 50, 12, 90, 41, 7, 66] * 6}
    return write_synthetic_build(store_uri, name, sources, vocab_size=1000, seed=len(name), shard_tokens=300, tokenizer=tokenizer)


def global_sequence(
    sources, world_size: int, calls: int, blocks: int, cache_dir, seed: int = 7, state=None, nodes: int = 1
) -> np.ndarray:
    """The global sequence as all ranks together receive it: rows in global position order."""
    loaders = [
        BlockLoader(sources, SEQ_LEN, seed, rank=r, world_size=world_size, cache_dir=cache_dir, nodes=nodes)
        for r in range(world_size)
    ]
    rows = []
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    for _ in range(calls):
        batches = [loader.next_batch(blocks).numpy() for loader in loaders]
        assert all(b.shape == (blocks, SEQ_LEN + 1) and b.dtype == np.int64 for b in batches)
        # Offset i of the call went to the rank whose offset is i mod world_size.
        by_offset = [batches[r] for r in np.argsort([loader.offset for loader in loaders])]
        rows.append(np.stack(by_offset, axis=1).reshape(blocks * world_size, SEQ_LEN + 1))
    states = {tuple(sorted(loader.state_dict().items())) for loader in loaders}
    assert len(states) == 1  # every rank holds the same state
    for loader in loaders:
        loader.close()
    return np.concatenate(rows)


def block_ids(rows: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Index into `blocks` of each row (every row must be one of them)."""
    lookup = {row.tobytes(): i for i, row in enumerate(blocks)}
    assert len(lookup) == len(blocks)  # random data: no two blocks alike
    return np.array([lookup[row.tobytes()] for row in rows])


def test_each_epoch_covers_every_block_once_on_any_world_size(store_uri, tmp_path):
    uri = build(store_uri)
    expected = source_blocks(uri, SEQ_LEN)
    count = len(expected)  # 124 blocks over 7 shards, several crossing shard boundaries
    sources = [DataSource(manifest=uri)]
    # 3 calls of 4 blocks on 4 ranks = 48 positions per 3 calls; run past two epochs.
    sequences = {
        world: global_sequence(sources, world, calls=2 * count // (4 * world) + 1, blocks=4, cache_dir=tmp_path / "c")
        for world in (1, 2, 4)
    }
    reference = sequences[1]
    for world, sequence in sequences.items():
        assert np.array_equal(sequence[: len(reference)], reference[: len(sequence)]), world
    ids = block_ids(reference[: 2 * count], expected)
    first, second = ids[:count], ids[count:]
    assert sorted(first) == list(range(count))
    assert sorted(second) == list(range(count))
    assert not np.array_equal(first, second)  # a new permutation each epoch
    assert not np.array_equal(first, np.arange(count))  # shuffled at all


def test_resume_continues_the_same_sequence_on_another_world_size(tmp_path):
    uri = build(str(tmp_path / "store"))
    sources = [DataSource(manifest=uri)]
    cache = tmp_path / "cache"
    straight = global_sequence(sources, world_size=2, calls=30, blocks=4, cache_dir=cache)

    first_half = BlockLoader(sources, SEQ_LEN, 7, rank=0, world_size=2, cache_dir=cache)
    for _ in range(11):
        first_half.next_batch(4)
    state = first_half.state_dict()
    first_half.close()
    assert state["position"] == 11 * 8
    # Same global batch (8 blocks), now as 4 ranks x 2 and as 1 rank x 8.
    resumed4 = global_sequence(sources, world_size=4, calls=19, blocks=2, cache_dir=cache, state=state)
    resumed1 = global_sequence(sources, world_size=1, calls=19, blocks=8, cache_dir=cache, state=state)
    assert np.array_equal(resumed4, straight[88:])
    assert np.array_equal(resumed1, straight[88:])


def test_state_from_another_seed_is_refused(tmp_path):
    uri = build(str(tmp_path / "store"))
    loader = BlockLoader([DataSource(manifest=uri)], SEQ_LEN, seed=1, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="seed=2"):
        loader.load_state_dict({"position": 8, "seed": 2, "seq_len": SEQ_LEN})
    loader.close()


def mixed_sequence(tmp_path, world_size: int, positions: int, nodes: int = 1):
    """TinyLlama's weights over two sources of one manifest: the rows, the web blocks, and each row's source (0: web)."""
    uri = build(str(tmp_path / "store"), web=[40] * 30, code=[25] * 30)
    web, code = source_blocks(uri, SEQ_LEN, "web"), source_blocks(uri, SEQ_LEN, "code")
    sources = [
        DataSource(manifest=uri, source="web", weight=0.693584),
        DataSource(manifest=uri, source="code", weight=0.306416),
    ]
    calls = positions // (16 * world_size)
    rows = global_sequence(sources, world_size, calls=calls, blocks=16, cache_dir=tmp_path / "c", nodes=nodes)
    lookup = {row.tobytes(): 0 for row in web} | {row.tobytes(): 1 for row in code}
    return rows, web, np.array([lookup[row.tobytes()] for row in rows])


def test_mixture_weights_hold_over_many_blocks(tmp_path):
    positions = 64 * 150  # a whole number of (shrunk) mixture chunks
    rows, web, origin = mixed_sequence(tmp_path, world_size=2, positions=positions)
    # Exact at chunk boundaries: the chunk after 150 * 64 draws starts at the sum of the floors.
    web_draws, code_draws = int(positions * 0.693584), int(positions * 0.306416)
    assert (origin[: web_draws + code_draws] == 0).sum() == web_draws
    # And within statistical tolerance on any window of 1000 positions.
    for start in range(0, positions - 1000, 1000):
        share = (origin[start : start + 1000] == 0).mean()
        assert abs(share - 0.693584) < 0.06, (start, share)
    # Each source is still visited a whole epoch at a time.
    web_ids = block_ids(rows[origin == 0][: len(web)], web)
    assert sorted(web_ids) == list(range(len(web)))


def test_manifests_with_different_tokenizers_are_refused(tmp_path):
    store = str(tmp_path / "store")
    a = build(store, "a", tokenizer="llama2")
    b = build(store, "b", tokenizer="other")
    with pytest.raises(DataError) as refused:
        BlockLoader([DataSource(manifest=a), DataSource(manifest=b)], SEQ_LEN, 0, cache_dir=tmp_path / "c")
    fingerprints = [load_manifests([DataSource(manifest=u)])[1].sha256 for u in (a, b)]
    for text in (a, b, *fingerprints):
        assert text in str(refused.value)
    manifests, tokenizer = load_manifests([DataSource(manifest=a), DataSource(manifest=a, weight=2)])
    assert len(manifests) == 2 and tokenizer.sha256 == fingerprints[0] and tokenizer.vocab_size == 1000


def test_bad_sources_are_refused_clearly(tmp_path):
    uri = build(str(tmp_path / "store"), web=[40] * 3, tiny=[5, 5])
    cache = tmp_path / "c"
    with pytest.raises(ValueError, match="greater than 0"):
        DataSource(manifest=uri, weight=0)
    with pytest.raises(DataError, match=r"no shards of source 'nope'.*\['tiny', 'web'\]"):
        BlockLoader([DataSource(manifest=uri, source="nope")], SEQ_LEN, 0, cache_dir=cache)
    with pytest.raises(DataError, match="10 tokens .* fewer than one block"):
        BlockLoader([DataSource(manifest=uri, source="tiny")], SEQ_LEN, 0, cache_dir=cache)
    with pytest.raises(DataError, match="cannot read dataset manifest .*missing.json"):
        BlockLoader([DataSource(manifest=str(tmp_path / "missing.json"))], SEQ_LEN, 0, cache_dir=cache)


def rewrite_shards(uri: str, edit) -> None:
    """Replace a build's shard table by `edit(table)` (a pyarrow table) and record it in the header,
    as a build with those shards would have written it."""
    store, key = open_object(uri)
    manifest = read_manifest(store, key)
    shards = ShardTable(edit(read_shard_table(store, key, manifest).table))
    header = manifest.model_dump(exclude={"shard_table", "total_documents", "total_tokens"})
    put_manifest(store, key, *new_manifest(shards, manifest.shard_table.key, **header))


@pytest.mark.parametrize("field", ["prefix", "tokenizer"])
def test_a_manifest_key_outside_its_build_is_refused_naming_the_manifest_and_the_key(tmp_path, field):
    uri = build(str(tmp_path / "store"), web=[40] * 3)
    escape = "../../../../outside"
    if field == "tokenizer":
        store, key = open_object(uri)
        manifest = json.loads(store.get_text(key))
        manifest["tokenizer"]["key"] = escape
        store.put_text(key, json.dumps(manifest))
    else:
        prefixes = lambda table: table["prefix"].to_pylist()
        rewrite_shards(uri, lambda t: t.set_column(0, "prefix", pa.array([escape] + prefixes(t)[1:])))
    with pytest.raises(DataError) as refused:  # before any shard is read: before the first step
        BlockLoader([DataSource(manifest=uri)], SEQ_LEN, 0, cache_dir=tmp_path / "c")
    message = str(refused.value)
    assert message.startswith(f"{uri}: ") and repr(escape) in message
    assert "\n" not in message and "must not contain '.', '..'" in message


def cache_files(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in cache.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_cache_stays_within_its_budget(s3_bucket_uri, tmp_path):
    uri = build(f"{s3_bucket_uri}/{tmp_path.name}", web=[50] * 60)  # 10 shards of ~600 bytes
    expected = source_blocks(uri, SEQ_LEN)
    store, _ = open_object(uri)
    shard_bytes = max(store.size(key) for key in store.list("tokens/web/") if key.endswith(".bin")) + 200
    budget = 4 * shard_bytes
    cache = tmp_path / "cache"
    loader = BlockLoader([DataSource(manifest=uri)], SEQ_LEN, 3, cache_dir=cache, cache_bytes=budget, prefetch=2)
    rows, peak, evicted = [], 0, False
    seen: set[str] = set()
    for _ in range(2 * len(expected) // 5):
        rows.append(loader.next_batch(5).numpy())
        files = cache_files(cache)
        peak = max(peak, sum(files.values()))
        evicted |= bool(seen - files.keys())
        seen |= files.keys()
    loader.close()
    assert peak <= budget
    assert evicted and len(seen) == 2 * 10  # every shard's .bin and .idx came through the cache
    ids = block_ids(np.concatenate(rows)[: len(expected)], expected)
    assert sorted(ids) == list(range(len(expected)))


def test_corrupt_cached_shard_is_fetched_again(s3_bucket_uri, tmp_path):
    uri = build(f"{s3_bucket_uri}/{tmp_path.name}")
    expected = source_blocks(uri, SEQ_LEN)
    cache = tmp_path / "cache"
    sources = [DataSource(manifest=uri)]
    with BlockLoader(sources, SEQ_LEN, 5, cache_dir=cache) as loader:
        before = loader.next_batch(len(expected)).numpy()
    victim = next(cache.glob("*.bin"))
    intact = victim.read_bytes()
    victim.write_bytes(bytes(b ^ 0xFF for b in intact))  # same size, different content
    with BlockLoader(sources, SEQ_LEN, 5, cache_dir=cache) as loader:
        after = loader.next_batch(len(expected)).numpy()
    assert np.array_equal(before, after)
    assert victim.read_bytes() == intact


def test_corrupt_shard_in_a_local_store_is_an_error(tmp_path):
    uri = build(str(tmp_path / "store"))
    store, _ = open_object(uri)
    shard = Path(store.root) / "tokens/web/web-0000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    loader = BlockLoader([DataSource(manifest=uri)], SEQ_LEN, 0, cache_dir=tmp_path / "c", prefetch=0)
    with pytest.raises(DataError, match=f"{shard}.*sha256"):
        for _ in range(40):
            loader.next_batch(4)
    loader.close()
    assert not any(Path(tmp_path / "c").glob("*.bin"))  # read in place, never copied


def test_token_outside_the_vocabulary_is_an_error(tmp_path):
    uri = build(str(tmp_path / "store"))
    store, key = open_object(uri)
    manifest = read_manifest(store, key)
    # Token ids reach 999; claim a smaller vocabulary (and so another tokenizer).
    small = manifest.tokenizer.model_copy(update={"vocab_size": 500})
    write_record(store, key, manifest.model_copy(update={"tokenizer": small}))
    loader = BlockLoader([DataSource(manifest=uri)], SEQ_LEN, 0, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"toy/synthetic-3/manifest.json: block \d+ holds token id \d+, outside .* 500"):
        loader.next_batch(4)
    assert loader.state_dict()["position"] == 0
    loader.close()


def test_each_node_fetches_about_its_share_of_the_shards(s3_bucket_uri, tmp_path, monkeypatch):
    """2 nodes x 2 ranks, each node with its own cache: one epoch fetches ~half the shards per node,
    and the two nodes together still visit every block exactly once per epoch."""
    monkeypatch.setattr(model.data, "SHUFFLE_WINDOW_TOKENS", 160 * (SEQ_LEN + 1))  # ~8 shards per node's window
    monkeypatch.setattr(model.data, "SHUFFLE_RUN_TOKENS", 1200)  # runs of 4 shards
    uri = build(f"{s3_bucket_uri}/{tmp_path.name}", web=[50] * 120)
    expected = source_blocks(uri, SEQ_LEN)
    count = len(expected)
    store, _ = open_object(uri)
    shards = len([key for key in store.list("tokens/web/") if key.endswith(".bin")])
    sources = [DataSource(manifest=uri)]
    fetched, rows = {}, {}
    for nodes in (1, 2):
        loaders = [
            BlockLoader(sources, SEQ_LEN, 7, rank=r, world_size=4, nodes=nodes, prefetch=0,
                        cache_dir=tmp_path / f"cache-{nodes}-node-{r // 2}")  # ranks 0, 1 on node 0
            for r in range(4)
        ]
        batches = [[loader.next_batch(1).numpy()[0] for _ in range(count // 4)] for loader in loaders]
        rows[nodes] = np.concatenate(batches)
        fetched[nodes] = [len(list((tmp_path / f"cache-{nodes}-node-{n}").glob("*.bin"))) for n in (0, 1)]
        for loader in loaders:
            loader.close()
    assert fetched[1] == [shards, shards]  # today: every node fetches everything
    assert all(n <= 0.7 * shards for n in fetched[2]), (fetched, shards)
    for nodes in (1, 2):  # count // 4 * 4 of the epoch's blocks, each at most once
        ids = block_ids(rows[nodes], expected)
        assert len(set(ids)) == len(ids) >= count - 4


def test_node_aware_sequence_resumes_exactly_on_another_world_size(tmp_path):
    uri = build(str(tmp_path / "store"))
    expected = source_blocks(uri, SEQ_LEN)
    sources = [DataSource(manifest=uri)]
    cache = tmp_path / "cache"
    straight = global_sequence(sources, world_size=4, calls=16, blocks=4, cache_dir=cache, nodes=2)
    # Node c holds the positions p with p mod 2 = c; its epoch is its half of every window, so the
    # nodes' epochs differ by at most a block per window: their halves are disjoint, nearly all blocks.
    half = len(expected) // 2 - 1
    node0, node1 = (set(block_ids(straight[c::2][:half], expected)) for c in (0, 1))
    assert len(node0) == len(node1) == half and not node0 & node1

    first_half = BlockLoader(sources, SEQ_LEN, 7, rank=1, world_size=4, cache_dir=cache, nodes=2)
    for _ in range(6):
        first_half.next_batch(4)
    state = first_half.state_dict()
    first_half.close()
    assert state == {"position": 6 * 16, "seed": 7, "seq_len": SEQ_LEN, "nodes": 2}
    # A cluster of another shape adopts the saved node count and continues the same sequence.
    resumed8 = global_sequence(sources, world_size=8, calls=5, blocks=2, cache_dir=cache, state=state, nodes=4)
    resumed1 = global_sequence(sources, world_size=1, calls=10, blocks=16, cache_dir=cache, state=state)
    assert np.array_equal(resumed8, straight[96:176])
    assert np.array_equal(resumed1, straight[96:])


def test_mixture_weights_hold_on_every_node(tmp_path):
    per_node = 64 * 40  # whole (shrunk) mixture chunks of each node
    _, _, origin = mixed_sequence(tmp_path, world_size=4, positions=2 * per_node, nodes=2)
    web_draws, code_draws = int(per_node * 0.693584), int(per_node * 0.306416)
    for node in (0, 1):  # node c holds the global positions p with p mod 2 = c
        node_origin = origin[node::2]
        assert (node_origin[: web_draws + code_draws] == 0).sum() == web_draws


def start_rank(uri: str, cache: Path, barrier) -> tuple[int, int, int]:
    """One rank's loader start on a node (a forked process): its shards, and its GETs of the
    manifest's header and of its shard table."""
    counter = GetCounter()
    barrier.wait()  # the node's ranks start together, as torchrun starts them
    with BlockLoader([DataSource(manifest=uri)], SEQ_LEN, 0, cache_dir=cache, prefetch=0) as loader:
        shards = len(loader.sources[0].shards)
    counter.close()
    return shards, *(sum(key.endswith(name) for key, _ in counter.gets) for name in (MANIFEST, SHARD_TABLE))


def test_the_ranks_of_a_node_fetch_the_manifest_once(s3_bucket_uri, tmp_path):
    """Ranks sharing a cache folder: exactly one of them GETs the header and one the table; the
    rest read their copies. A later start GETs the header again (it may have been rewritten) and
    finds the table it names already there."""
    uri = build(f"{s3_bucket_uri}/{tmp_path.name}", web=[50] * 60)
    ranks, cache = 4, tmp_path / "node-cache"
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager, ProcessPoolExecutor(ranks, mp_context=context) as pool:
        started = list(pool.map(start_rank, [uri] * ranks, [cache] * ranks, [manager.Barrier(ranks)] * ranks))
    assert [shards for shards, _, _ in started] == [10] * ranks
    assert sum(header for _, header, _ in started) == 1 and sum(table for _, _, table in started) == 1, started
    # A process's start time is known to about a second (the kernel gives the boot time in whole
    # seconds), so a start is "later" than a copy once a second has passed.
    time.sleep(1.1)
    with context.Manager() as manager, ProcessPoolExecutor(1, mp_context=context) as pool:
        assert pool.submit(start_rank, uri, cache, manager.Barrier(1)).result() == (10, 1, 0)


def test_the_shard_key_screen_refuses_what_check_key_refuses():
    """read_shards screens a table's prefixes with one regex instead of a check_key call per shard."""
    keys = ["tokens/web/a-0000", "a.b/c..d", "..a/b.", "", "/a", "a/", "a//b", "./a", "a/..", "a/../b", "a\\b", "a\x00b"]
    screened = pc.match_substring_regex(pa.array(keys), model.data.UNSAFE_KEY).to_pylist()
    refused = []
    for key in keys:
        try:
            check_key(key)
            refused.append(False)
        except InvalidKey:
            refused.append(True)
    assert screened == refused and any(refused) and not all(refused)

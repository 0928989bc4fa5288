"""A rerun of a finished stage at the full object counts: its outputs (~480,000 token files for
tokenize) are listed by sub-prefixes of at most LIST_KEYS outputs each, several at once, never as
one serial listing held whole in the driver; its requests stay a page per 1,000 keys and a
listing per sub-prefix; and every output it checks is still checked (size and version)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from storage import build_layout as layout
from storage.manifest import ObjectInfo, ShardResult
from storage.store import open_store
from tasks import fanout
from tasks.fanout import run_stage
from tasks.stage import Stage

SHARDS, OUTPUTS, LIST_KEYS = 300, 4, 400  # 1,200 outputs: three sub-prefixes of 100 shards


class Listings:
    """The driver's ListObjectsV2 requests: pages by prefix, and the keys each prefix's pages held."""

    def __init__(self):
        from storage.s3 import s3_client

        self.pages: Counter[str] = Counter()
        self.keys: Counter[str] = Counter()
        s3_client().meta.events.register("after-call.s3.ListObjectsV2", self)

    def __call__(self, parsed, **_):
        self.pages[parsed["Prefix"]] += 1
        self.keys[parsed["Prefix"]] += parsed.get("KeyCount", 0)

    def take(self) -> tuple[Counter[str], Counter[str]]:
        taken = self.pages, self.keys
        self.pages, self.keys = Counter(), Counter()
        return taken


def written(store, ran: list[int]):
    def work(i: int) -> ShardResult:
        ran.append(i)
        keys = [f"out/{i:06d}-{part:04d}.bin" for part in range(OUTPUTS)]
        for key in keys:
            store.put_bytes(key, f"{i}".encode())
        return ShardResult(outputs=[ObjectInfo(key=k, size=len(f"{i}"), sha256="0" * 64) for k in keys])

    return work


def test_a_rerun_lists_its_outputs_by_sub_prefixes_a_page_per_1000_keys_and_still_checks_each(s3_bucket_uri, monkeypatch):
    monkeypatch.setattr(fanout, "LIST_KEYS", LIST_KEYS)  # the full size's split, at a test's size
    store, ran = open_store(f"{s3_bucket_uri}/rerun-scale"), []
    stage = Stage("many", list(range(SHARDS)), lambda i: f"{i:06d}", written(store, ran), ("out/",))
    first = run_stage(store, stage, inline=True)
    listings = Listings()
    ran.clear()
    again = run_stage(store, stage, inline=True)
    pages, keys = listings.take()
    root = store.uri.removeprefix(f"{s3_bucket_uri}/") + "/"
    outputs = {prefix.removeprefix(root): n for prefix, n in keys.items() if prefix != root + layout.receipts("many")}
    assert ran == [] and again.to_parquet() == first.to_parquet()
    assert outputs == {"out/0000": LIST_KEYS, "out/0001": LIST_KEYS, "out/0002": LIST_KEYS}, keys  # none holds them all
    assert sum(pages.values()) == math.ceil(SHARDS / 1000) + len(outputs), pages  # a page each: receipts, 3 prefixes

    store.put_bytes("out/000150-0002.bin", b"999")  # rewritten at the same size: only its version tells
    store.delete("out/000299-0003.bin")
    again = run_stage(store, stage, inline=True)
    assert sorted(ran) == [150, 299]  # redone (a receipt's content may repeat: the same bytes in the same milliseconds)
    assert store.get_bytes("out/000150-0002.bin") == b"150" and store.get_bytes("out/000299-0003.bin") == b"299"
    assert [r.shard for r in again.receipts] == [f"{i:06d}" for i in range(SHARDS)]


@pytest.mark.parametrize("keys, covers", [
    ([], []),
    (["out/000001-0000.bin"], ["out/"]),
    ([f"out/{i:06d}-0000.bin" for i in range(900)], [f"out/000{i}" for i in range(9)]),  # 100 shards each
    (["out/a", *(f"out/a{i:03d}" for i in range(500))], ["out/a"]),  # a key ends where a split would go
])
def test_the_sub_prefixes_cover_every_output_and_hold_at_most_list_keys_of_them(keys, covers, monkeypatch):
    import pyarrow as pa

    monkeypatch.setattr(fanout, "LIST_KEYS", LIST_KEYS)
    assert fanout._cover(pa.array(keys, pa.string()), "out/") == covers

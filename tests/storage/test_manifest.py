"""The manifest: a small header and the shard table it names and checksums (storage/manifest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from storage.build_layout import MANIFEST, SHARD_TABLE
from storage.manifest import (
    ManifestError,
    ObjectInfo,
    ShardTable,
    SourceAccounting,
    TokenizerInfo,
    TokenShard,
    new_manifest,
    put_manifest,
    read_manifest,
    read_shard_table,
    record_bytes,
    sha256_bytes,
)
from storage.store import open_store


def token_shards(count: int) -> list[TokenShard]:
    def info(prefix: str, ext: str, size: int) -> ObjectInfo:
        return ObjectInfo(key=f"{prefix}.{ext}", size=size, sha256=sha256_bytes(f"{prefix}.{ext}".encode()))

    prefixes = [f"tokens/{'web' if i % 3 else 'code'}/{i:06d}-0000" for i in range(count)]
    return [
        TokenShard(prefix=p, source=p.split("/")[1], documents=i + 1, tokens=1000 * i + 7,
                   bin=info(p, "bin", 2000 * i + 14), idx=info(p, "idx", 34 + i))
        for i, p in enumerate(prefixes)
    ]


def write_build(store, shards: list[TokenShard]):
    manifest, table = new_manifest(
        ShardTable.of(shards), SHARD_TABLE, name="toy", build_id="b1", config={"seed": 1}, config_hash="0" * 64,
        tokenizer=TokenizerInfo(key="tokenizer/tokenizer.model", sha256="1" * 64, vocab_size=32000, bos_id=1,
                                eos_id=2, trained=False),
        dtype="uint16", sources={"web": SourceAccounting(docs_in=3, kept=3)},
    )
    put_manifest(store, MANIFEST, manifest, table)
    return manifest


def test_the_shard_table_round_trips_in_order_and_the_header_holds_its_totals(tmp_path):
    store = open_store(str(tmp_path))
    shards = token_shards(50)
    manifest = write_build(store, shards)
    table = read_shard_table(store, MANIFEST, read_manifest(store, MANIFEST))
    assert [table.shard(i) for i in range(len(table))] == shards
    assert table.tokens.dtype == np.int64 and table.tokens.tolist() == [s.tokens for s in shards]
    assert table.of_source("code").prefixes == [s.prefix for s in shards if s.source == "code"]
    assert table.source_names() == ["code", "web"]
    assert manifest.shard_table.rows == 50 and manifest.total_tokens == sum(s.tokens for s in shards)
    assert manifest.total_documents == sum(s.documents for s in shards)
    assert len(record_bytes(manifest)) < 2000  # the header does not grow with the shards


def test_equal_shards_give_equal_bytes():
    """The header records the table's sha256: equal builds must write equal tables."""
    first, second = ShardTable.of(token_shards(300)).to_parquet(), ShardTable.of(token_shards(300)).to_parquet()
    assert first == second
    assert ShardTable.from_parquet(first).to_parquet() == first


def test_a_flipped_table_byte_is_refused_naming_both_keys(tmp_path):
    store = open_store(str(tmp_path))
    write_build(store, token_shards(20))
    data = bytearray(store.get_bytes(SHARD_TABLE))
    data[len(data) // 2] ^= 0x01
    store.put_bytes(SHARD_TABLE, bytes(data))
    with pytest.raises(ManifestError) as refused:
        read_shard_table(store, MANIFEST, read_manifest(store, MANIFEST))
    message = str(refused.value)
    assert store.url(SHARD_TABLE) in message and store.url(MANIFEST) in message and "\n" not in message


def test_a_manifest_with_shards_inline_is_refused_saying_to_rerun_the_build(tmp_path):
    store = open_store(str(tmp_path))
    header = json.loads(record_bytes(write_build(store, token_shards(2))))
    old = {k: v for k, v in header.items() if k not in ("shard_table", "total_documents", "total_tokens")}
    old.update(version=1, shards=[s.model_dump(mode="json") for s in token_shards(2)])
    store.put_bytes(MANIFEST, json.dumps(old).encode())
    with pytest.raises(ManifestError, match=r"manifest version 1 lists every shard inline.*rerun its build") as refused:
        read_manifest(store, MANIFEST)
    assert str(refused.value).startswith(store.url(MANIFEST)) and "\n" not in str(refused.value)

"""Typed records of what a stage produced: per-shard receipts, per-stage summaries and the
dataset manifest.

A receipt is written only after every object it names, so "has a receipt" means "done".
A stage summary (every receipt of a stage as a row of one table, storage.stage_summary,
written once the stage completes) lets a rerun and the later stages read one object instead
of one per shard.
A build *is* its manifest: a small JSON header (tokenizer, config, accounting, totals) and the
compact shard table it names and checksums (one parquet object, a row per token shard), so a
reader of the header never parses 240,000 shard records, and one of the table holds columns,
not objects.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from typing import BinaryIO, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

from storage.store import ListedObject, Store

MANIFEST_VERSION = 2  # 1: every shard inline in manifest.json

Model = TypeVar("Model", bound=BaseModel)


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectInfo(Record):
    key: str  # relative to the build folder
    size: int
    sha256: str
    # The store's answer to the write (size, version), for the shard's commit to record without
    # asking the store again; not stored with the record (a receipt keeps its versions apart).
    stored: ListedObject | None = Field(default=None, exclude=True, repr=False)

    @classmethod
    def of_file(cls, key: str, path: str | os.PathLike, stored: ListedObject | None = None) -> ObjectInfo:
        return cls(key=key, size=os.path.getsize(path), sha256=sha256_file(path), stored=stored)


class SourceAccounting(Record):
    """Where every input document of one source went: docs_in = kept + the four losses."""

    docs_in: int = 0
    kept: int = 0
    filtered: int = 0
    exact_dup: int = 0
    near_dup: int = 0
    malformed: int = 0
    bytes_in: int = 0
    tokens: int = 0

    def __add__(self, other: SourceAccounting) -> SourceAccounting:
        return SourceAccounting(**{name: getattr(self, name) + getattr(other, name) for name in SourceAccounting.model_fields})

    @property
    def reconciles(self) -> bool:
        return self.docs_in == self.kept + self.filtered + self.exact_dup + self.near_dup + self.malformed


class TokenizerInfo(Record):
    key: str  # the SentencePiece model inside the build folder
    sha256: str  # the fingerprint: builds with equal fingerprints share token ids
    vocab_size: int
    bos_id: int
    eos_id: int
    trained: bool


class DocumentConvention(Record):
    """How each document's tokens are framed in the shards: [BOS] + text + [EOS]."""

    bos: bool = True
    eos: bool = True

    def frame(self, ids: list[int], tokenizer: TokenizerInfo) -> list[int]:
        return [tokenizer.bos_id] * self.bos + ids + [tokenizer.eos_id] * self.eos


# Manifests written before the convention was recorded: EOS after each document, no BOS.
UNRECORDED_CONVENTION = DocumentConvention(bos=False, eos=True)


class TokenShard(Record):
    """One Megatron indexed shard (`<prefix>.bin` + `<prefix>.idx`) of one source."""

    prefix: str  # relative to the build folder, without extension
    source: str
    documents: int
    tokens: int
    bin: ObjectInfo
    idx: ObjectInfo


class Counts(Record):
    """What one shard of a stage counted, typed: each stage declares its own record (a subclass
    with an int field per count, tasks.stage_counts), so a misspelt count fails when the record
    is made instead of reading as 0, and the counts that steer a build are read as attributes.

    On the store a receipt holds them as a name -> int object (`as_dict`); a summary as one
    column per name (storage.stage_summary), read back into the record by StageSummary.totals."""

    model_config = ConfigDict(frozen=True)

    def as_dict(self) -> dict[str, int]:
        """The counts a receipt records: a count that does not apply to this shard (None) is left out."""
        return self.model_dump(exclude_none=True)


class ShardResult(Record):
    """What one shard's work produced: the objects it wrote and what it counted."""

    outputs: list[ObjectInfo] = Field(default_factory=list)
    counts: SerializeAsAny[Counts] = Field(default_factory=Counts)  # the stage's own record, for its table
    sources: dict[str, SourceAccounting] = Field(default_factory=dict)  # this shard's share of the accounting
    token_shards: list[TokenShard] = Field(default_factory=list)  # tokenize stage only


class Receipt(ShardResult):
    """Proof that one shard of one stage finished: its result, and each output's version as
    the store reported it when the shard committed (a rerun's listing must show the same).

    It carries the sha256 of its own content: a receipt edited after it was written (valid JSON
    with a count changed) no longer matches it and is not trusted."""

    counts: dict[str, int] = Field(default_factory=dict)  # the result's Counts.as_dict(), as stored
    stage: str
    shard: str
    versions: dict[str, dict[str, str]] = Field(default_factory=dict)  # output key -> ListedObject.version
    seconds: float = 0.0  # wall time of the shard's work, for the build's summary (work seconds)
    checksum: str = ""  # sha256 of the receipt's JSON (keys sorted) without this field (see `sealed`)

    def content_checksum(self) -> str:
        # orjson, not canonical_json: a summary's every row is checked when it is read (10x faster);
        # storage.stage_summary.row_intact computes the same checksum from a row
        content = orjson.dumps(self.model_dump(mode="json", exclude={"checksum"}), option=orjson.OPT_SORT_KEYS)
        return sha256_bytes(content)

    def sealed(self) -> Receipt:
        """This receipt with the checksum of its content."""
        return self.model_copy(update={"checksum": self.content_checksum()})

    @property
    def intact(self) -> bool:
        """Whether the content is what was sealed (an unsealed receipt is not)."""
        return self.checksum == self.content_checksum()


class ShardTableInfo(ObjectInfo):
    """The manifest's shard table object, and how many shards (rows) it holds."""

    rows: int


class DatasetManifest(Record):
    """A build's header: everything but the shard table, which it names and checksums."""

    version: int = MANIFEST_VERSION
    name: str
    build_id: str
    config: dict
    config_hash: str
    tokenizer: TokenizerInfo
    documents: DocumentConvention = Field(default_factory=lambda: UNRECORDED_CONVENTION.model_copy())
    dtype: str  # numpy dtype name of the tokens: "uint16" or "int32"
    sources: dict[str, SourceAccounting]
    shard_table: ShardTableInfo
    total_documents: int
    total_tokens: int


class ManifestError(ValueError):
    """A manifest or shard table that cannot be used; the one-line message names its key."""


SHARD_TABLE_SCHEMA = pa.schema([
    ("prefix", pa.string()),  # relative to the build folder: the shard's files are <prefix>.bin, <prefix>.idx
    ("source", pa.string()),
    ("documents", pa.int64()),
    ("tokens", pa.int64()),
    ("bin_size", pa.int64()),
    ("bin_sha256", pa.binary(32)),
    ("idx_size", pa.int64()),
    ("idx_sha256", pa.binary(32)),
])
# Pinned, so equal shards give equal bytes (the header records their sha256) whatever the defaults.
_PARQUET_OPTIONS = dict(
    compression="zstd", compression_level=3, use_dictionary=["source"], write_statistics=False,
    version="2.6", data_page_version="1.0", data_page_size=1 << 20, write_page_index=False, store_schema=False,
)


class ShardTable:
    """Every token shard of a build as columns (arrow; numbers as numpy), one row per shard in
    the build's order. A reader takes the columns it needs or one row at a time (`shard`), so
    240,000 shards cost a few tens of MB, not a pydantic object each."""

    def __init__(self, table: pa.Table):
        self.table = table

    @classmethod
    def of(cls, shards: Sequence[TokenShard]) -> ShardTable:
        """A table of shards made one at a time (tools and tests; a build's come from columns)."""
        if not shards:
            return cls(SHARD_TABLE_SCHEMA.empty_table())
        return cls.of_columns(pa.array([shard.model_dump() for shard in shards]))

    @classmethod
    def of_columns(cls, shards: pa.StructArray) -> ShardTable:
        """A table of shards given as a struct array of TokenShard's fields (a stage summary's
        `token_shards`, flattened): column by column, with no object per shard."""
        prefix = shards.field("prefix")
        files = {ext: shards.field(ext) for ext in ("bin", "idx")}
        for ext, info in files.items():
            wrong = pc.not_equal(info.field("key"), pc.binary_join_element_wise(prefix, f".{ext}", ""))
            if pc.any(wrong).as_py():
                row = pc.index(wrong, True).as_py()
                raise ValueError(f"token shard {prefix[row].as_py()!r}: its {ext} file {info.field('key')[row].as_py()} is not <prefix>.{ext}")
        columns = {
            "prefix": prefix,
            "source": shards.field("source"),
            "documents": shards.field("documents"),
            "tokens": shards.field("tokens"),
            **{
                name: column
                for ext, info in files.items()
                for name, column in ((f"{ext}_size", info.field("size")), (f"{ext}_sha256", _digests(info.field("sha256"))))
            },
        }
        return cls(pa.table(columns, schema=SHARD_TABLE_SCHEMA))

    def to_parquet(self) -> bytes:
        out = io.BytesIO()
        pq.write_table(self.table, out, row_group_size=max(len(self), 1), **_PARQUET_OPTIONS)
        return out.getvalue()

    @classmethod
    def from_parquet(cls, data: bytes) -> ShardTable:
        table = pq.read_table(pa.BufferReader(data))
        if not table.schema.equals(SHARD_TABLE_SCHEMA):
            raise ValueError(f"its columns are {table.schema.names} of types {table.schema.types}, not the shard table's")
        return cls(table.combine_chunks())

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> np.ndarray:
        return self.table[name].to_numpy()

    @property
    def tokens(self) -> np.ndarray:
        return self.column("tokens")

    @property
    def prefixes(self) -> list[str]:
        return self.table["prefix"].to_pylist()

    def source_names(self) -> list[str]:
        """The sources with shards here, in order of first shard."""
        return pc.unique(self.table["source"]).to_pylist()

    def of_source(self, source: str) -> ShardTable:
        return ShardTable(self.table.filter(pc.equal(self.table["source"], source)))

    def shard(self, row: int) -> TokenShard:
        r = {name: self.table[name][row].as_py() for name in self.table.column_names}
        return TokenShard(
            prefix=r["prefix"], source=r["source"], documents=r["documents"], tokens=r["tokens"],
            bin=ObjectInfo(key=f"{r['prefix']}.bin", size=r["bin_size"], sha256=r["bin_sha256"].hex()),
            idx=ObjectInfo(key=f"{r['prefix']}.idx", size=r["idx_size"], sha256=r["idx_sha256"].hex()),
        )


def _digests(hex_digests: pa.StringArray) -> pa.FixedSizeBinaryArray:
    """sha256 hex digests as 32-byte values, decoded in one piece (a ValueError if one is not a digest)."""
    count = len(hex_digests)
    if not pc.all(pc.equal(pc.binary_length(hex_digests), 64), skip_nulls=False, min_count=0).as_py():
        raise ValueError("a token file's sha256 is not 64 hex digits")
    digests = bytes.fromhex(pc.binary_join(pa.ListArray.from_arrays([0, count], hex_digests), "")[0].as_py())
    if len(digests) != 32 * count:  # fromhex skips whitespace
        raise ValueError("a token file's sha256 is not 64 hex digits")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), count, [None, pa.py_buffer(digests)])


def new_manifest(shards: ShardTable, table_key: str, **header) -> tuple[DatasetManifest, bytes]:
    """A manifest header (its `header` fields, the totals and the table's checksum) and the shard
    table's bytes, to be stored at `table_key` before the header (put_manifest)."""
    data = shards.to_parquet()
    manifest = DatasetManifest(
        shard_table=ShardTableInfo(key=table_key, size=len(data), sha256=sha256_bytes(data), rows=len(shards)),
        total_documents=int(shards.column("documents").sum()),
        total_tokens=int(shards.tokens.sum()),
        **header,
    )
    return manifest, data


def put_manifest(store: Store, key: str, manifest: DatasetManifest, table: bytes) -> None:
    """The shard table, then the header naming it (`store` is the build folder's)."""
    store.put_bytes(manifest.shard_table.key, table)
    write_record(store, key, manifest)


def read_manifest(store: Store, key: str, data: bytes | None = None) -> DatasetManifest:
    """A build's manifest header (its bytes from the store, or `data` already fetched). One of
    version 1 (every shard inline) is refused: it is the cost this format removes, and a rerun of
    its build rewrites only the manifest."""
    if data is None:
        data = store.get_bytes(key)
    try:
        version = orjson.loads(data).get("version")
    except (orjson.JSONDecodeError, AttributeError):
        version = None  # not a JSON object: the validation below says what is wrong
    if isinstance(version, int) and version < MANIFEST_VERSION:
        raise ManifestError(
            f"{store.url(key)}: manifest version {version} lists every shard inline, which is no longer read; "
            "rerun its build with the same config to rewrite it (every stage is complete: only the manifest is written)"
        )
    return DatasetManifest.model_validate_json(data)


def read_shard_table(store: Store, manifest_key: str, manifest: DatasetManifest, data: bytes | None = None) -> ShardTable:
    """The manifest's shard table (its bytes from the store, or `data` already fetched),
    verified against the size and sha256 the header records."""
    info = manifest.shard_table
    if data is None:
        data = store.get_bytes(info.key)
    actual = sha256_bytes(data)
    if len(data) != info.size or actual != info.sha256:
        raise ManifestError(
            f"{store.url(info.key)} ({len(data)} bytes, sha256 {actual[:12]}) is not the shard table "
            f"{store.url(manifest_key)} records ({info.size} bytes, sha256 {info.sha256[:12]}): rerun the build"
        )
    try:
        table = ShardTable.from_parquet(data)
    except (ValueError, OSError, pa.ArrowException) as e:
        raise ManifestError(f"{store.url(info.key)}: not a shard table: {e}") from None
    if len(table) != info.rows:
        raise ManifestError(f"{store.url(info.key)}: {len(table)} shards, {store.url(manifest_key)} records {info.rows}")
    return table


def canonical_json(data) -> bytes:
    """Stable bytes for hashing and for byte-identical outputs: sorted keys, fixed layout."""
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def record_bytes(record: BaseModel) -> bytes:
    return canonical_json(record.model_dump(mode="json"))


def write_record(store: Store, key: str, record: BaseModel) -> None:
    store.put_bytes(key, record_bytes(record))


def upload(store: Store, key: str, path: str | os.PathLike) -> ObjectInfo:
    """Put a local file at `key` and describe the object stored, with the store's answer."""
    stored = store.put_file(key, path)
    return ObjectInfo.of_file(key, path, stored)


def read_record(store: Store, key: str, cls: type[Model]) -> Model:
    return cls.model_validate_json(store.get_bytes(key))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(stream: BinaryIO) -> str:
    """The sha256 of what a binary stream (a file, a store's reader) holds from here to its end."""
    digest = hashlib.sha256()
    while chunk := stream.read(8 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)

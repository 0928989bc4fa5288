"""Typed records of what a stage produced: per-shard receipts, per-stage summaries and the
dataset manifest.

A receipt is written only after every object it names, so "has a receipt" means "done".
A stage summary (every receipt of a stage, written once the stage completes) lets a rerun
and the later stages read one object instead of one per shard.
A build *is* its manifest: everything a reader needs (shards, counts, checksums, tokenizer,
config) is in that one JSON document.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import BinaryIO, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field

from storage.store import Store

MANIFEST_VERSION = 1

Model = TypeVar("Model", bound=BaseModel)


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectInfo(Record):
    key: str  # relative to the build folder
    size: int
    sha256: str

    @classmethod
    def of_file(cls, key: str, path: str | os.PathLike) -> ObjectInfo:
        return cls(key=key, size=os.path.getsize(path), sha256=sha256_file(path))


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


class ShardResult(Record):
    """What one shard's work produced: the objects it wrote and what it counted."""

    outputs: list[ObjectInfo] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)  # the stage's own metrics, for its table
    sources: dict[str, SourceAccounting] = Field(default_factory=dict)  # this shard's share of the accounting
    token_shards: list[TokenShard] = Field(default_factory=list)  # tokenize stage only


class Receipt(ShardResult):
    """Proof that one shard of one stage finished: its result, and each output's version as
    the store reported it when the shard committed (a rerun's listing must show the same).

    It carries the sha256 of its own content: a receipt edited after it was written (valid JSON
    with a count changed) no longer matches it and is not trusted."""

    stage: str
    shard: str
    versions: dict[str, dict[str, str]] = Field(default_factory=dict)  # output key -> ListedObject.version
    seconds: float = 0.0  # wall time of the shard's work, for the build's summary (work seconds)
    checksum: str = ""  # sha256 of the receipt's JSON (keys sorted) without this field (see `sealed`)

    def content_checksum(self) -> str:
        # orjson, not canonical_json: a summary's every receipt is checked when it is read (10x faster)
        content = orjson.dumps(self.model_dump(mode="json", exclude={"checksum"}), option=orjson.OPT_SORT_KEYS)
        return sha256_bytes(content)

    def sealed(self) -> Receipt:
        """This receipt with the checksum of its content."""
        return self.model_copy(update={"checksum": self.content_checksum()})

    @property
    def intact(self) -> bool:
        """Whether the content is what was sealed (an unsealed receipt is not)."""
        return self.checksum == self.content_checksum()


class StageSummary(Record):
    """Every receipt of a completed stage, and the version of each receipt object it was read
    from: a rerun re-reads only the receipts whose listed version differs."""

    stage: str
    receipts: list[Receipt]
    receipt_versions: dict[str, dict[str, str]]  # shard -> version of receipts/<stage>/<shard>.json

    def sources(self) -> dict[str, SourceAccounting]:
        """The per-source accounting of every shard, summed."""
        totals: dict[str, SourceAccounting] = {}
        for receipt in self.receipts:
            for name, share in receipt.sources.items():
                totals[name] = totals.get(name, SourceAccounting()) + share
        return totals


class DatasetManifest(Record):
    version: int = MANIFEST_VERSION
    name: str
    build_id: str
    config: dict
    config_hash: str
    tokenizer: TokenizerInfo
    documents: DocumentConvention = Field(default_factory=lambda: UNRECORDED_CONVENTION.model_copy())
    dtype: str  # numpy dtype name of the tokens: "uint16" or "int32"
    shards: list[TokenShard]
    sources: dict[str, SourceAccounting]

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def total_documents(self) -> int:
        return sum(s.documents for s in self.shards)


def canonical_json(data) -> bytes:
    """Stable bytes for hashing and for byte-identical outputs: sorted keys, fixed layout."""
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def record_bytes(record: BaseModel) -> bytes:
    return canonical_json(record.model_dump(mode="json"))


def write_record(store: Store, key: str, record: BaseModel) -> None:
    store.put_bytes(key, record_bytes(record))


def upload(store: Store, key: str, path: str | os.PathLike) -> ObjectInfo:
    """Put a local file at `key` and describe the object stored."""
    store.put_file(key, path)
    return ObjectInfo.of_file(key, path)


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

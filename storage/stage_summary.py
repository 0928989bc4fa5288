"""A completed stage's receipts as one typed table, `summaries/<stage>.parquet`: a row per
receipt (stage, shard, seconds, checksum, the receipt object's listed version, outputs with
their versions, per-source accounting, token shards, and one int64 column per count).

At the mission's size a stage has up to ~60,000 receipts (tokenize's hold ~8 token shards
each): as pydantic objects, or as one JSON document, they cost gigabytes in the driver and
seconds per thousand to parse. As rows they are a compact table: totals and per-source sums
are column sums, and the few consumers that walk receipts decode them one batch at a time.

Each row still proves itself: it carries the receipt's checksum, recomputed from the row's
content on every read, so a row edited in the table is caught like an edited receipt object.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.manifest import Counts, Receipt, SourceAccounting, sha256_bytes
from storage.store import ListedObject

COUNT = "counts."  # a count's column: "counts.<name>", null where a receipt does not have it
ACCOUNTING = tuple(SourceAccounting.model_fields)
VERSION = pa.map_(pa.string(), pa.string())  # a ListedObject.version
OBJECT = pa.struct([("key", pa.string()), ("size", pa.int64()), ("sha256", pa.string())])
OUTPUT = pa.struct([*OBJECT, ("version", VERSION)])  # an output and its version at commit
SOURCE = pa.struct([("source", pa.string()), *((name, pa.int64()) for name in ACCOUNTING)])
TOKEN_SHARD = pa.struct(
    [("prefix", pa.string()), ("source", pa.string()), ("documents", pa.int64()), ("tokens", pa.int64()),
     ("bin", OBJECT), ("idx", OBJECT)]
)
SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("shard", pa.string()),
        ("seconds", pa.float64()),
        ("checksum", pa.string()),
        ("receipt_version", VERSION),  # of receipts/<stage>/<shard>.json when the summary was written
        ("outputs", pa.list_(OUTPUT)),
        ("sources", pa.list_(SOURCE)),
        ("token_shards", pa.list_(TOKEN_SHARD)),
    ]
)
C = TypeVar("C", bound=Counts)
DECODE_ROWS = 1024  # rows held as Python objects at a time (decoding a table, or buffering new rows)


def schema_of(counts: Sequence[str]) -> pa.Schema:
    """The table's schema with these counts' columns, sorted: equal receipts give equal bytes."""
    return pa.schema([*SCHEMA, *(pa.field(COUNT + name, pa.int64()) for name in sorted(counts))])


def receipt_row(receipt: Receipt) -> dict:
    """A receipt as a row of SCHEMA (its receipt_version is filled when the summary is written)."""
    return {
        "stage": receipt.stage,
        "shard": receipt.shard,
        "seconds": receipt.seconds,
        "checksum": receipt.checksum,
        "receipt_version": None,
        "outputs": [{**o.model_dump(), "version": receipt.versions.get(o.key)} for o in receipt.outputs],
        "sources": [{"source": name, **share.model_dump()} for name, share in receipt.sources.items()],
        "token_shards": [shard.model_dump() for shard in receipt.token_shards],
        **{COUNT + name: value for name, value in receipt.counts.items()},
    }


def receipt_content(row: dict) -> dict:
    """The receipt a row holds, as Receipt.model_dump(mode="json") gives it, without its checksum."""
    outputs = row["outputs"]
    return {
        "stage": row["stage"],
        "shard": row["shard"],
        "seconds": row["seconds"],
        "outputs": [{"key": o["key"], "size": o["size"], "sha256": o["sha256"]} for o in outputs],
        "versions": {o["key"]: dict(o["version"]) for o in outputs if o["version"] is not None},
        "counts": {name.removeprefix(COUNT): v for name, v in row.items() if name.startswith(COUNT) and v is not None},
        "sources": {s["source"]: {name: s[name] for name in ACCOUNTING} for s in row["sources"]},
        "token_shards": row["token_shards"],
    }


def row_intact(row: dict) -> bool:
    """Whether a row's content is what its receipt sealed (the checksum of Receipt.content_checksum)."""
    return row["checksum"] == sha256_bytes(orjson.dumps(receipt_content(row), option=orjson.OPT_SORT_KEYS))


def rows_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema_of({n.removeprefix(COUNT) for r in rows for n in r if n.startswith(COUNT)}))


class ReceiptRows:
    """The receipts of a stage as they come in (from a summary, from receipt objects, from tasks):
    rows buffered and turned into columnar batches every DECODE_ROWS, never kept as objects."""

    def __init__(self) -> None:
        self._tables: list[pa.Table] = []
        self._buffer: list[dict] = []
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def add(self, row: dict) -> None:
        """One receipt_row: buffered, then part of a columnar batch."""
        self._buffer.append(row)
        self._rows += 1
        if len(self._buffer) >= DECODE_ROWS:
            self._flush()

    def add_table(self, table: pa.Table) -> None:
        self._tables.append(table)
        self._rows += table.num_rows

    def _flush(self) -> None:
        if self._buffer:
            self._tables.append(rows_table(self._buffer))
            self._buffer = []

    def table(self) -> pa.Table:
        """Every row so far, in the order they came (a shard added twice appears twice)."""
        self._flush()
        if not self._tables:
            return rows_table([])
        table = pa.concat_tables(self._tables, promote_options="default")
        self._tables = [table]
        return table

    def release(self) -> pa.Table:
        """`table()`, no longer held here: its caller may drop it once it has made what it needs."""
        table = self.table()
        self._tables, self._rows = [], 0
        return table


def version_text(version: dict[str, str] | Iterable[tuple[str, str]]) -> str:
    """A version (a ListedObject's, or a VERSION value as Arrow gives it back) as one comparable string."""
    return orjson.dumps(dict(version), option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True)
class Listing:
    """Listed objects as columns: a rerun of tokenize lists ~480,000 token files, which as a dict
    of ListedObject would cost ~300 MB of the driver's memory; as columns, ~50 MB."""

    keys: pa.Array  # string
    sizes: np.ndarray  # int64
    versions: pa.Array  # string: each version's version_text

    @classmethod
    def of(cls, listed: Iterable[ListedObject]) -> Listing:
        """The objects as columns, built DECODE_ROWS at a time."""
        listed, chunks = iter(listed), []
        while chunk := list(itertools.islice(listed, DECODE_ROWS)):
            chunks.append(cls._columns(chunk))
        return cls.concat(chunks)

    @classmethod
    def _columns(cls, listed: Sequence[ListedObject]) -> Listing:
        return cls(
            pa.array([o.key for o in listed], pa.string()), np.array([o.size for o in listed], np.int64),
            pa.array([version_text(o.version) for o in listed], pa.string()),
        )

    @classmethod
    def concat(cls, listings: Iterable[Listing]) -> Listing:
        parts = [cls._columns(()), *listings]
        return cls(
            pa.concat_arrays([p.keys for p in parts]), np.concatenate([p.sizes for p in parts]),
            pa.concat_arrays([p.versions for p in parts]),
        )


def flat(column: pa.ChunkedArray) -> pa.Array:
    """A list column's items, every row's in turn, as one array: a view of a column in one chunk
    (a summary's are), not a copy (tokenize's outputs are ~100 MB at 60,000 receipts)."""
    return pc.list_flatten(column.chunk(0) if column.num_chunks == 1 else column.combine_chunks())


def in_order(table: pa.Table, shards: Sequence[str]) -> pa.Table:
    """The rows of `shards`, in that order (each shard's last row), counts' columns sorted, in one chunk."""
    position = {shard: row for row, shard in enumerate(table.column("shard").to_pylist())}
    table = table.take(pa.array([position[shard] for shard in shards], pa.int64()))
    counts = [n.removeprefix(COUNT) for n in table.column_names if n.startswith(COUNT)]
    return table.select(schema_of(counts).names).combine_chunks()


def with_receipt_versions(table: pa.Table, versions: Sequence[dict[str, str]]) -> pa.Table:
    """The rows with the listed version of each one's receipt object."""
    column = table.schema.get_field_index("receipt_version")
    return table.set_column(column, "receipt_version", pa.array(versions, VERSION))


class SummaryDamaged(ValueError):
    """A summary object that is not a table of receipts."""


@dataclass(frozen=True)
class StageSummary:
    """Every receipt of a completed stage, as a table in item order (storage.stage_summary).

    Totals and per-source sums come from its columns; `receipts` decodes receipts on demand for
    the few consumers that walk them."""

    stage: str
    table: pa.Table
    sha256: str | None = None  # of the parquet it was read from or written as (to_parquet)

    def __len__(self) -> int:
        return self.table.num_rows

    @cached_property
    def shards(self) -> list[str]:
        return self.table.column("shard").to_pylist()

    @property
    def count_names(self) -> list[str]:
        return [n.removeprefix(COUNT) for n in self.table.column_names if n.startswith(COUNT)]

    def count_totals(self) -> dict[str, int]:
        """Every count summed, by name: for display (a step reads its counts with `totals`)."""
        return {name: int(pc.sum(self.table.column(COUNT + name)).as_py() or 0) for name in self.count_names}

    def totals(self, counts: type[C]) -> C:
        """The stage's counts summed, as the stage's record: a count no shard has is None where
        the record allows it; a summary without rows totals 0."""
        self._counted_by(counts)
        if not len(self):
            return counts(**{name: 0 for name, field in counts.model_fields.items() if field.is_required()})
        counted = [name for name in self.count_names if self.table.column(COUNT + name).null_count < len(self)]
        return counts(**{name: int(pc.sum(self.table.column(COUNT + name)).as_py()) for name in counted})

    def per_shard(self, counts: type[C]) -> list[C]:
        """Each receipt's counts as the stage's record, in shard order."""
        self._counted_by(counts)
        rows = self.table.select([COUNT + name for name in self.count_names]).to_pylist()
        return [counts(**{name.removeprefix(COUNT): v for name, v in row.items() if v is not None}) for row in rows]

    def _counted_by(self, counts: type[Counts]) -> None:
        if undeclared := sorted(set(self.count_names) - set(counts.model_fields)):
            raise SummaryDamaged(f"the {self.stage} summary has counts {undeclared} that {counts.__name__} does not declare")

    @property
    def work_seconds(self) -> float:
        return float(pc.sum(self.table.column("seconds")).as_py() or 0.0)

    @property
    def bytes_out(self) -> int:
        return int(pc.sum(self._flat("outputs").field("size")).as_py() or 0)

    def sources(self) -> dict[str, SourceAccounting]:
        """The per-source accounting of every shard, summed (sources in order of first appearance)."""
        shares = pa.Table.from_struct_array(self._flat("sources"))
        if not shares.num_rows:
            return {}
        sums = shares.group_by("source", use_threads=False).aggregate([(name, "sum") for name in ACCOUNTING])
        return {
            row["source"]: SourceAccounting(**{name: row[f"{name}_sum"] for name in ACCOUNTING}) for row in sums.to_pylist()
        }

    def outputs_size(self, prefix: str) -> dict[str, int]:
        """Per shard, the bytes of its outputs under `prefix`."""
        flat = self._flat("outputs")
        return self._per_shard("outputs", pc.if_else(pc.starts_with(flat.field("key"), prefix), flat.field("size"), 0))

    def source_sum(self, field: str) -> dict[str, int]:
        """Per shard, one accounting field (kept, bytes_in, ...) summed over its sources."""
        return self._per_shard("sources", self._flat("sources").field(field))

    def shares(self, source: str) -> pa.Table:
        """The shards that counted `source` (shard order), with their share of its accounting."""
        flat = self._flat("sources")
        counted = pc.equal(flat.field("source"), source)
        shards = pc.take(self.table.column("shard"), pc.filter(pc.list_parent_indices(self.table.column("sources")), counted))
        return pa.Table.from_struct_array(flat.filter(counted)).drop_columns(["source"]).add_column(0, "shard", shards)

    def _per_shard(self, column: str, values: pa.Array) -> dict[str, int]:
        """A value per item of a list column, summed per row, by shard."""
        rows = pc.list_parent_indices(self.table.column(column)).to_numpy(zero_copy_only=False)
        sums = np.bincount(rows, values.to_numpy(zero_copy_only=False), minlength=len(self))
        return dict(zip(self.shards, sums.astype(np.int64).tolist()))

    def _flat(self, column: str) -> pa.StructArray:
        return flat(self.table.column(column))

    def rows(self) -> Iterator[dict]:
        for batch in self.table.to_batches(max_chunksize=DECODE_ROWS):
            yield from batch.to_pylist()

    def edited(self) -> list[str]:
        """The shards whose rows do not match their receipts' checksums."""
        return [row["shard"] for row in self.rows() if not row_intact(row)]

    @property
    def receipts(self) -> Receipts:
        return Receipts(self.table)

    def to_parquet(self) -> bytes:
        """The summary as parquet (zstd): the same rows give the same bytes (`sha256` is theirs
        once written: see tasks.fanout.run_stage)."""
        buffer = io.BytesIO()
        pq.write_table(self.table, buffer, compression="zstd")
        return buffer.getvalue()

    @classmethod
    def from_parquet(cls, stage: str, body: bytes) -> StageSummary:
        """A summary from its parquet bytes (SummaryDamaged, or pyarrow's ArrowInvalid, if it is not one)."""
        table = pq.read_table(pa.BufferReader(body))
        counts = [n.removeprefix(COUNT) for n in table.column_names if n.startswith(COUNT)]
        schema = schema_of(counts)
        if table.column_names != schema.names:
            raise SummaryDamaged(f"columns {table.column_names} are not {schema.names}")
        try:
            table = table.cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise SummaryDamaged(str(error)) from None
        if table.num_rows and not pc.all(pc.equal(table.column("stage"), stage)).as_py():
            raise SummaryDamaged(f"rows of another stage than {stage}")
        return cls(stage, table, sha256_bytes(body))


class Receipts(Sequence[Receipt]):
    """A summary's receipts, decoded from its rows when they are asked for."""

    def __init__(self, table: pa.Table) -> None:
        self._table = table

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return _receipt(self._table.slice(index % len(self), 1).to_pylist()[0])

    def __iter__(self) -> Iterator[Receipt]:
        for batch in self._table.to_batches(max_chunksize=DECODE_ROWS):
            for row in batch.to_pylist():
                yield _receipt(row)


def _receipt(row: dict) -> Receipt:
    return Receipt.model_validate({**receipt_content(row), "checksum": row["checksum"]})

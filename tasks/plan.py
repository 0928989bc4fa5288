"""Stage 1: list the inputs and freeze them into a plan.

The plan fixes every unit of work and its document-id range before anything runs, so shard
boundaries depend only on the inputs and the config, never on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from ray.exceptions import RayTaskError

from storage.manifest import canonical_json
from storage.store import (
    COPY_BUFFER_BYTES,
    ListedObject,
    ObjectChanged,
    ObjectNotFound,
    Store,
    check_expected,
    differences,
    join_key,
    open_object,
    open_store,
)
from tasks.code_version import on_driver_code
from tasks.config import BuildConfig, Format, SourceConfig, check_output_outside_inputs
from tasks.fanout import ensure_ray
from tasks.globs import GLOB_CHARS, glob_regex, split_glob
from tasks.partitioning import batches
from tasks.reach import build_paths, check_reach_on_ray
from tasks.stage import PLAN, stage_task

PLAN_KEY = "plan.json"
HF_ROWS_PER_UNIT = 100_000
HASH_THREADS = 16  # inputs one task hashes at once when a source pins content (I/O bound)
HASH_TASK_BYTES = 1 << 30  # inputs one hashing task reads
REBUILD_HINT = "to build from the inputs as they are now, start a new build (set build_id)"


class PlanError(ValueError):
    """The inputs cannot be planned: nothing matches, or they changed since the plan was frozen."""


class InputChanged(PlanError):
    """An input is no longer the one the plan pinned; the message names it and what changed."""


class PlannedFile(BaseModel):
    """One unit of ingest work: a whole input file, or a row range of a local HF dataset."""

    model_config = ConfigDict(extra="forbid")

    source: str
    uri: str  # the input file's full URI (or the HF dataset folder)
    size: int  # bytes, as listed at plan time
    ordinal: int  # position in plan order; document ids are (ordinal << 32) | record index
    rows: tuple[int, int] | None = None  # [start, end) rows, for format hf
    # The version of the input the plan was made from: the listing's version stamp (S3 ETag;
    # local mtime_ns and inode), or its sha256 when the source pins content, or an HF
    # dataset's fingerprint. Ingest refuses an input that no longer matches.
    identity: dict[str, str] = Field(default_factory=dict)

    @property
    def shard(self) -> str:
        return f"{self.ordinal:06d}"


def shard_of(file: PlannedFile) -> str:
    """A per-file stage's shard name (Stage.shard_of for ingest and tokenize)."""
    return file.shard


@dataclass(frozen=True)
class SourceRanges:
    """Which source each plan ordinal belongs to, in a few values: the plan lists each source's
    files together, so a task that counts ids per source is given this, never the plan."""

    starts: tuple[int, ...]  # the first ordinal of each run of one source's files
    names: tuple[str, ...]

    @classmethod
    def of(cls, files: Sequence[PlannedFile]) -> SourceRanges:
        runs = [(f.ordinal, f.source) for i, f in enumerate(files) if i == 0 or files[i - 1].source != f.source]
        return cls(tuple(ordinal for ordinal, _ in runs), tuple(name for _, name in runs))

    def count(self, ids: np.ndarray) -> dict[str, int]:
        """How many of the document `ids` each source holds (sources holding some), by name."""
        runs, counts = np.unique(np.searchsorted(self.starts, ordinal_of(ids), side="right") - 1, return_counts=True)
        per_source: Counter[str] = Counter()
        for run, count in zip(runs.tolist(), counts.tolist()):
            per_source[self.names[run]] += count
        return dict(sorted(per_source.items()))


def document_id(ordinal: int, record: int) -> int:
    """Ids sort in plan order: file ordinal first, then the record's position in its file."""
    return (ordinal << 32) | record


def ordinal_of(document: int) -> int:
    return document >> 32


def list_source(source: SourceConfig) -> list[tuple[str, ListedObject]]:
    """(uri, size and version) of every input file of a source, sorted by URI, from listings alone."""
    if GLOB_CHARS.search(source.uri) is None:
        store, key = open_object(source.uri)
        try:
            return [(store.url(key), store.info(key))]
        except ObjectNotFound:
            raise PlanError(f"source {source.name!r}: input {source.uri} does not exist") from None
    static, pattern = split_glob(source.uri)
    store = open_store(static or ".")
    regex = glob_regex(pattern)
    found = [(store.url(info.key), info) for info in store.list_info() if regex.fullmatch(info.key)]
    if not found:
        raise PlanError(f"source {source.name!r}: no input matches {source.uri}")
    return sorted(found, key=lambda pair: pair[0])


def content_sha256(uri: str) -> str:
    """The sha256 of an input file's bytes, streamed (for sources that pin content)."""
    store, key = open_object(uri)
    digest = hashlib.sha256()
    with store.open_read(key) as f:
        while chunk := f.read(COPY_BUFFER_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _hf_fingerprint(folder: str) -> str:
    """The fingerprint `Dataset.save_to_disk` wrote; a dataset saved again with other rows has another."""
    try:
        return str(json.loads(open_store(folder).get_bytes("state.json"))["_fingerprint"])
    except (ObjectNotFound, ValueError, KeyError, TypeError) as error:
        raise PlanError(f"{folder}: not a dataset folder written by Dataset.save_to_disk: {error}") from None


def _hf_units(source: SourceConfig) -> list[tuple[str, int, tuple[int, int], dict[str, str]]]:
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(source.uri)
    except FileNotFoundError as error:
        raise PlanError(f"source {source.name!r}: no Hugging Face dataset at {source.uri}: {error}") from None
    n = dataset.num_rows
    size = dataset.data.nbytes
    identity = {"fingerprint": _hf_fingerprint(source.uri)}
    return [
        (source.uri, size * (min(n, s + HF_ROWS_PER_UNIT) - s) // max(n, 1), (s, min(n, s + HF_ROWS_PER_UNIT)), identity)
        for s in range(0, n, HF_ROWS_PER_UNIT)
    ]


def content_sha256s(uris: list[str]) -> list[str]:
    """The sha256 of each input, HASH_THREADS at a time (I/O bound): one Ray task's share."""
    with ThreadPoolExecutor(min(HASH_THREADS, max(len(uris), 1))) as pool:
        return list(pool.map(content_sha256, uris))


def hash_inputs(listed: list[tuple[str, ListedObject]]) -> list[str]:
    """The sha256 of every input, hashed in Ray tasks of about HASH_TASK_BYTES each; the driver
    only collects the digests (its bytes never pass through it)."""
    ensure_ray()
    remote = ray.remote(num_cpus=1)(on_driver_code(content_sha256s))
    shares = batches([info.size for _, info in listed], HASH_TASK_BYTES)
    refs = [remote.remote([uri for uri, _ in listed[share.start : share.stop]]) for share in shares]
    try:
        return [digest for ref in refs for digest in ray.get(ref)]
    except RayTaskError as error:
        raise (error.cause or error) from error  # ObjectNotFound naming the input, say


def _file_units(source: SourceConfig) -> list[tuple[str, int, None, dict[str, str]]]:
    listed = list_source(source)
    if not source.pin_content:
        return [(uri, info.size, None, info.version) for uri, info in listed]
    digests = hash_inputs(listed)
    return [(uri, info.size, None, {"sha256": digest}) for (uri, info), digest in zip(listed, digests)]


def make_plan(config: BuildConfig) -> list[PlannedFile]:
    files: list[PlannedFile] = []
    for source in config.sources:
        units = _hf_units(source) if source.format is Format.hf else _file_units(source)
        for uri, size, rows, identity in units:
            files.append(
                PlannedFile(source=source.name, uri=uri, size=size, ordinal=len(files), rows=rows, identity=identity)
            )
    return files


def check_unchanged(file: PlannedFile, hash_content: bool = True) -> None:
    """Raise InputChanged unless the input is still the one the plan pinned, as far as that takes
    no request: an HF dataset's fingerprint, a local file's size and stat, and with `hash_content`
    a pinned sha256 (one more read of the input). An input on S3 is checked on the answer of the
    read that ingests it (open_input, input_path): its length and ETag."""
    if file.rows is not None:
        if "fingerprint" in file.identity:
            _check_identity(file, {"fingerprint": _hf_fingerprint(file.uri)})
        return
    store, key = open_object(file.uri)
    with _refused_if_changed(file):
        if store.local_path(key) is not None:
            check_expected(store.url(key), store.info(key), _pinned(file, key))
        if hash_content and "sha256" in file.identity:
            _check_identity(file, {"sha256": content_sha256(file.uri)})


def open_input(file: PlannedFile) -> BinaryIO:
    """A streaming reader of a planned input file, refused (InputChanged) unless the input is at
    the size and version the plan pinned, on the read's own answer (S3: the GET's length and
    ETag; local: the opened file's stat): no request of its own."""
    store, key = open_object(file.uri)
    with _refused_if_changed(file):
        return store.open_read(key, _pinned(file, key))


def input_path(file: PlannedFile, folder: Path) -> Path:
    """A local path of a planned input file: a local one in place (check_unchanged checks it), one
    on S3 downloaded into `folder`, checked as open_input checks its read."""
    store, key = open_object(file.uri)
    if (path := store.local_path(key)) is not None:
        return path
    with _refused_if_changed(file):
        return store.download(key, folder / key.rpartition("/")[2], _pinned(file, key))


def _pinned(file: PlannedFile, key: str) -> ListedObject:
    """What a read must find of the input: its planned size and version stamp (a pinned sha256
    is no store's version, so then the size alone)."""
    return ListedObject(key, file.size, file.identity)


def _changed(file: PlannedFile, changes: list[str]) -> InputChanged:
    return InputChanged(f"input {file.uri} changed since the plan ({', '.join(changes)}); {REBUILD_HINT}")


def _check_identity(file: PlannedFile, now: dict[str, str]) -> None:
    if changes := differences(file.identity, now):
        raise _changed(file, changes)


@contextmanager
def _refused_if_changed(file: PlannedFile) -> Iterator[None]:
    """The store's ObjectChanged or ObjectNotFound for the input, as InputChanged naming it."""
    try:
        yield
    except ObjectChanged as changed:
        raise _changed(file, changed.changes) from None
    except ObjectNotFound:
        raise InputChanged(f"input {file.uri} was removed since the plan; {REBUILD_HINT}") from None


def check_tokenizer_input(config: BuildConfig) -> None:
    if config.tokenizer.model is not None:
        store, key = open_object(config.tokenizer.model)
        if not store.exists(key):
            raise PlanError(f"tokenizer model {config.tokenizer.model} does not exist")


def freeze_plan(config: BuildConfig, store: Store) -> list[PlannedFile]:
    """Write plan.json into the build folder, or check the inputs still match the frozen one."""
    check_output_outside_inputs(config)  # validated with the config, unless it was copied with changes since
    check_tokenizer_input(config)
    files = make_plan(config)
    body = canonical_json({"config_hash": config.config_hash(), "files": [f.model_dump(mode="json") for f in files]})
    try:
        frozen = store.get_bytes(PLAN_KEY)
    except ObjectNotFound:
        store.put_bytes(PLAN_KEY, body)
        return files
    if frozen != body:
        difference = _plan_difference(json.loads(frozen), files)
        raise PlanError(f"{difference} since this build was planned ({store.url(PLAN_KEY)}); {REBUILD_HINT}")
    return files


def _plan_difference(frozen: dict, files: list[PlannedFile]) -> str:
    """What differs between a frozen plan and the inputs now, naming the first changed input."""
    before = {f["uri"]: f for f in frozen["files"]}
    for file in files:
        was = before.pop(file.uri, None)
        if was is None:
            return f"the input {file.uri} is new"
        now = file.model_dump(mode="json")
        if was != now:
            fields = [f"{k} {was.get(k)} -> {now[k]}" for k in ("size", "identity") if was.get(k) != now[k]]
            return f"the input {file.uri} changed ({', '.join(fields) or 'its place in the plan'})"
    if before:
        return f"the input {next(iter(before))} is gone"
    return "the config changed"


def read_plan(store: Store) -> list[PlannedFile]:
    return [PlannedFile.model_validate(f) for f in json.loads(store.get_bytes(PLAN_KEY))["files"]]


class Build(BaseModel):
    """A build in progress, as the stages pass it to each other: small, serializable, no data."""

    model_config = ConfigDict(frozen=True)

    config: BuildConfig
    # Made on first use and kept out of the model's fields: Prefect walks every parameter of every
    # task call field by field (visit_collection), which walked all 60,000 planned files per step.
    _store: Store | None = PrivateAttr(default=None)
    _plan: list[PlannedFile] | None = PrivateAttr(default=None)

    @property
    def id(self) -> str:
        return self.config.resolved_build_id

    @property
    def key(self) -> str:
        """The build folder, relative to the output store."""
        return join_key("datasets", self.config.name, self.id)

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def store(self) -> Store:
        """The build folder as a store: every key a stage writes is relative to it."""
        if self._store is None:
            self._store = open_store(self.config.output).child(self.key)
        return self._store

    @property
    def plan(self) -> list[PlannedFile]:
        if self._plan is None:
            self._plan = read_plan(self.store)
        return self._plan


@stage_task(PLAN)
def plan(config: BuildConfig) -> Build:
    check_reach_on_ray(build_paths(config))  # on a Ray cluster, no local folder that a node lacks
    build = Build(config=config)
    freeze_plan(config, build.store)
    return build

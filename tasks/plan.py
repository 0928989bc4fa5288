"""Stage 1: list the inputs and freeze them into a plan.

The plan fixes every unit of work and its document-id range before anything runs, so shard
boundaries depend only on the inputs and the config, never on the number of workers.
"""

from __future__ import annotations

import fnmatch
import json
import re
from functools import cached_property

from pydantic import BaseModel, ConfigDict

from storage.manifest import canonical_json
from storage.store import ObjectNotFound, Store, join_key, open_object, open_store
from tasks.config import BuildConfig, Format, SourceConfig
from tasks.stage import stage_task

PLAN_KEY = "plan.json"
HF_ROWS_PER_UNIT = 100_000
_GLOB = re.compile(r"[*?\[]")


class PlanError(ValueError):
    """The inputs cannot be planned: nothing matches, or they changed since the plan was frozen."""


class PlannedFile(BaseModel):
    """One unit of ingest work: a whole input file, or a row range of a local HF dataset."""

    model_config = ConfigDict(extra="forbid")

    source: str
    uri: str  # the input file's full URI (or the HF dataset folder)
    size: int  # bytes, as listed at plan time
    ordinal: int  # position in plan order; document ids are (ordinal << 32) | record index
    rows: tuple[int, int] | None = None  # [start, end) rows, for format hf

    @property
    def shard(self) -> str:
        return f"{self.ordinal:06d}"


def document_id(ordinal: int, record: int) -> int:
    """Ids sort in plan order: file ordinal first, then the record's position in its file."""
    return (ordinal << 32) | record


def ordinal_of(document: int) -> int:
    return document >> 32


def list_source(source: SourceConfig) -> list[tuple[str, int]]:
    """(uri, size) of every input file of a source, sorted by URI."""
    if _GLOB.search(source.uri) is None:
        store, key = open_object(source.uri)
        try:
            return [(store.url(key), store.size(key))]
        except ObjectNotFound:
            raise PlanError(f"source {source.name!r}: input {source.uri} does not exist") from None
    static, _, _ = _GLOB.split(source.uri, 1)[0].rpartition("/")
    store = open_store(static or ".")
    pattern = source.uri[len(static) + 1 :] if static else source.uri
    found = [(store.url(key), store.size(key)) for key in store.list() if fnmatch.fnmatchcase(key, pattern)]
    if not found:
        raise PlanError(f"source {source.name!r}: no input matches {source.uri}")
    return sorted(found)


def _hf_units(source: SourceConfig) -> list[tuple[str, int, tuple[int, int]]]:
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(source.uri)
    except FileNotFoundError as error:
        raise PlanError(f"source {source.name!r}: no Hugging Face dataset at {source.uri}: {error}") from None
    n = dataset.num_rows
    size = dataset.data.nbytes
    return [
        (source.uri, size * (min(n, s + HF_ROWS_PER_UNIT) - s) // max(n, 1), (s, min(n, s + HF_ROWS_PER_UNIT)))
        for s in range(0, n, HF_ROWS_PER_UNIT)
    ]


def make_plan(config: BuildConfig) -> list[PlannedFile]:
    files: list[PlannedFile] = []
    for source in config.sources:
        if source.format is Format.hf:
            units = _hf_units(source)
        else:
            units = [(uri, size, None) for uri, size in list_source(source)]
        for uri, size, rows in units:
            files.append(PlannedFile(source=source.name, uri=uri, size=size, ordinal=len(files), rows=rows))
    return files


def check_tokenizer_input(config: BuildConfig) -> None:
    if config.tokenizer.model is not None:
        store, key = open_object(config.tokenizer.model)
        if not store.exists(key):
            raise PlanError(f"tokenizer model {config.tokenizer.model} does not exist")


def freeze_plan(config: BuildConfig, store: Store) -> list[PlannedFile]:
    """Write plan.json into the build folder, or check the inputs still match the frozen one."""
    check_tokenizer_input(config)
    files = make_plan(config)
    body = canonical_json({"config_hash": config.config_hash(), "files": [f.model_dump(mode="json") for f in files]})
    try:
        frozen = store.get_bytes(PLAN_KEY)
    except ObjectNotFound:
        store.put_bytes(PLAN_KEY, body)
        return files
    if frozen != body:
        raise PlanError(
            f"the inputs changed since this build was planned ({store.url(PLAN_KEY)}); "
            "start a new build (set build_id) instead of resuming this one"
        )
    return files


def read_plan(store: Store) -> list[PlannedFile]:
    return [PlannedFile.model_validate(f) for f in json.loads(store.get_bytes(PLAN_KEY))["files"]]


class Build(BaseModel):
    """A build in progress, as the stages pass it to each other: small, serializable, no data."""

    model_config = ConfigDict(frozen=True)

    config: BuildConfig

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

    @cached_property
    def store(self) -> Store:
        """The build folder as a store: every key a stage writes is relative to it."""
        return open_store(self.config.output).child(self.key)

    @cached_property
    def plan(self) -> list[PlannedFile]:
        return read_plan(self.store)


@stage_task("plan")
def plan(config: BuildConfig) -> Build:
    build = Build(config=config)
    freeze_plan(config, build.store)
    return build

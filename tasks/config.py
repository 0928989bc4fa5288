"""The typed build configuration: the `build-dataset` flow's parameters and its YAML file."""

from __future__ import annotations

import hashlib
import json
import os
from enum import Enum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, model_validator

from storage.config_fields import MAX_NAME_CHARS, InputPath, OutputPath, Real, Seed
from storage.config_file import read_config
from storage.store import StoreError, check_name, open_store
from tasks.globs import could_match_below

# A name that becomes one folder of the output store.
FolderName = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(check_name)]

from storage.manifest import DocumentConvention

TASK_MEMORY_BYTES = 1 << 30  # the default of what one dedup task may hold
MAX_PARTITIONS = 1 << 16  # of a dedup step: each is one Ray task and one part of every map task's output
# What the output store writes, never a build's input: datasets/<name>/<build>/<key> and runs/<run>/<key>
# (a folder, and how many segments below it its keys are at least).
OUTPUT_FOLDERS = {"datasets": 3, "runs": 2}


class Config(BaseModel):
    """Numbers and flags are strict (`seed: true` or `seed: "7"` is a mistake, not 1 or 7) and bounded;
    floats still take YAML 1.1's strings such as "8e-1" (storage/config_fields.py)."""

    # Errors never echo the input: a rejected value might be a secret.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class Format(str, Enum):
    jsonl = "jsonl"
    jsonl_zst = "jsonl.zst"
    parquet = "parquet"
    hf = "hf"  # a local Hugging Face dataset saved with `Dataset.save_to_disk`


class SourceConfig(Config):
    name: str = Field(
        pattern=r"^[A-Za-z0-9_-]+$", max_length=MAX_NAME_CHARS, description="Short name, used in keys and accounting"
    )
    uri: InputPath = Field(description="A file, a glob, or (format hf) a dataset folder; local or s3://")
    format: Format
    pin_content: StrictBool = Field(
        False,
        description="Pin each input by its sha256 rather than its listing's version (ETag; mtime and inode): "
        "a copy or a touch keeps the build valid; costs one more read of every input at plan and ingest",
    )
    text_field: str = Field("text", min_length=1)
    meta_fields: list[str] = Field(default_factory=list, description="Fields kept as metadata ('a.b' for nested)")
    exclude: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Drop records whose field ('a.b' for nested) has one of these values, "
        "e.g. {'meta.redpajama_set_name': ['RedPajamaGithub']}",
    )


class Filters(Config):
    min_chars: int = Field(
        200, strict=True, ge=0, le=1 << 31, description="Documents shorter than this (after NFC) are filtered"
    )
    max_record_bytes: int = Field(
        64 << 20, strict=True, gt=0, le=1 << 31, description="A longer input line/record is malformed (at most 2 GiB)"
    )


class Dedup(Config):
    exact: StrictBool = True
    near: StrictBool = True
    exact_partitions: int | None = Field(
        None, strict=True, ge=1, le=MAX_PARTITIONS,
        description="Hash ranges of exact dedup (one Ray task each); default: sized from the documents",
    )


class MinHashConfig(Config):
    """Near-duplicate detection: SlimPajama's shingling and threshold with a recall-oriented,
    verified LSH shape (16 x 8); SlimPajama's own shape is the preset bands=9, rows=13."""

    ngram: int = Field(13, strict=True, ge=1, le=1024)
    shingle: str = Field("char", pattern="^(char|word)$")
    num_perm: int = Field(128, strict=True, ge=1, le=4096)
    bands: int | None = Field(16, strict=True, ge=1)
    rows: int | None = Field(8, strict=True, ge=1)
    threshold: Real = Field(0.8, gt=0, lt=1)
    verify: StrictBool = Field(True, description="Drop candidate pairs whose true Jaccard is below threshold")
    verify_anchors: int = Field(
        4, strict=True, ge=1, le=1024, description="Most members of a bucket each candidate is verified against"
    )
    bucket_partitions: int | None = Field(
        None, strict=True, ge=1, le=MAX_PARTITIONS,
        description="Band-hash ranges, one Ray task each; default: sized from the documents",
    )
    component_partitions: int | None = Field(
        None, strict=True, ge=1, le=MAX_PARTITIONS,
        description="Vertex partitions of connected components, one Ray task each (n*n files a round); "
        "default: sized from the documents",
    )
    seed: Seed = 1

    @model_validator(mode="after")
    def _bands_rows(self) -> MinHashConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("minhash: set both bands and rows, or neither (derived from threshold)")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"minhash: {self.bands} bands x {self.rows} rows exceed num_perm={self.num_perm}")
        return self


class TokenizerTrain(Config):
    vocab_size: int = Field(32000, strict=True, ge=64, le=(1 << 31) - 1, description="Token ids are int32 at most")
    sample_bytes: int = Field(
        50 << 20, strict=True, gt=0, le=1 << 40, description="Bytes of kept text sampled (seeded) to train on"
    )
    character_coverage: Real = Field(
        0.9995, gt=0, le=1, description="Share of the sample's characters the vocabulary covers"
    )


class TokenizerConfig(Config):
    model: InputPath | None = Field(None, description="Path or URI of a SentencePiece .model")
    train: TokenizerTrain | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenizerConfig:
        if (self.model is None) == (self.train is None):
            raise ValueError("tokenizer needs exactly one of 'model' (a .model path/URI) or 'train'")
        return self


class BuildConfig(Config):
    name: FolderName = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    output: OutputPath = Field(
        "./data", validate_default=True, description="Store URI: a folder or s3://bucket/prefix"
    )
    sources: list[SourceConfig] = Field(min_length=1)
    tokenizer: TokenizerConfig = Field(default_factory=lambda: TokenizerConfig(train=TokenizerTrain()))
    filters: Filters = Field(default_factory=Filters)
    dedup: Dedup = Field(default_factory=Dedup)
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    quarantine: StrictBool = Field(True, description="Quarantine and count bad records; False fails on the first")
    shard_tokens: int = Field(4 << 20, strict=True, gt=0, le=1 << 36, description="Target tokens per token shard")
    bos: StrictBool = Field(True, description="Start every document with BOS, as Llama 2 and TinyLlama do (EOS ends each)")
    seed: Seed = 42
    build_id: FolderName | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="Default: the config hash")
    parallelism: int | None = Field(
        None, strict=True, ge=1, le=1 << 20,
        description="At most this many shards at once (default: twice Ray's CPUs); never changes outputs",
    )
    task_memory_bytes: int = Field(
        TASK_MEMORY_BYTES, strict=True, ge=1 << 16, le=1 << 50,
        description="What one dedup task may hold: partition counts and batches are sized to it, as are the tokenizer sample's groups",
    )

    @model_validator(mode="after")
    def _unique_sources(self) -> BuildConfig:
        names = [s.name for s in self.sources]
        if len(names) != len(set(names)):
            raise ValueError(f"source names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _output_outside_inputs(self) -> BuildConfig:
        check_output_outside_inputs(self)
        return self

    @classmethod
    def from_yaml(cls, path_or_uri: str | os.PathLike) -> BuildConfig:
        """Read a YAML config from a local path or a store URI; its relative paths from its folder."""
        return read_config(path_or_uri, cls)

    def content(self) -> dict:
        """What determines the outputs: everything but where they go and how many workers run."""
        return self.model_dump(mode="json", exclude={"output", "build_id", "parallelism"})

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.content(), sort_keys=True).encode()).hexdigest()

    @property
    def documents(self) -> DocumentConvention:
        return DocumentConvention(bos=self.bos)

    @property
    def resolved_build_id(self) -> str:
        return self.build_id or self.config_hash()[:12]


def check_output_outside_inputs(config: BuildConfig) -> None:
    """Refuse a source whose glob could match what the output store writes (its builds and runs):
    a later build would read its own quarantine files or documents as inputs."""
    for source in config.sources:
        glob = f"{source.uri.removesuffix('/')}/*" if source.format is Format.hf else source.uri  # hf: a folder
        try:
            output = open_store(config.output)
            inside = [name for name, depth in OUTPUT_FOLDERS.items() if could_match_below(glob, output.url(name), depth)]
        except StoreError as error:
            raise ValueError(str(error)) from None
        if inside:
            raise ValueError(
                f"source {source.name!r}: input {source.uri} could match the store's own outputs under output "
                f"{config.output} ({output.url(inside[0])}/); put the output outside the inputs or narrow the glob"
            )

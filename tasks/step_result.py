"""What a build step hands on: one small typed handle per step (flows/build_dataset.py).

A step's Prefect task runs its stages through a `StepRun`, which adds up each stage's summary
as it completes and returns a `StepResult`: the step's totals for the build's summary table, its
per-source accounting for the manifest, and the way to its own stage's summary for the steps
that need its rows (ingest's documents per file, tokenize's token shards). Later steps receive
the handle as a parameter, so Prefect's graph shows what each step reads, and nothing is looked
up by a stage's name or read again to be counted; no receipt passes through Prefect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from storage import build_layout as layout
from storage.manifest import SourceAccounting, TokenizerInfo
from storage.stage_summary import StageSummary
from storage.store import Store
from tasks.fanout import read_summary, run_stage
from tasks.stage import Stage

if TYPE_CHECKING:
    from tasks.config import BuildConfig


class StageMissing(ValueError):
    """A step's summary is gone or damaged after the step completed: a retry of a later step
    finds the same (a ValueError), a rerun of the build redoes the step."""


class StepResult(BaseModel):
    """A completed build step: its stages' totals, and its own stage's per-source accounting."""

    model_config = ConfigDict(frozen=True)

    step: str  # its name (tasks.stage); also that of its own stage, whose summary later steps read
    stages: int
    shards: int
    work_seconds: float
    bytes_out: int
    sources: dict[str, SourceAccounting] = {}  # of its own stage's receipts
    counts: dict[str, int] = {}  # its stages' counts summed by name: for display, never for control flow
    summary_sha256: str | None = None  # of its own stage's summary, every row of which the step checked

    def summary(self, store: Store) -> StageSummary:
        """Its own stage's summary (a row per receipt), read from the store; its rows are checked
        against their receipts' checksums again only if its bytes are not those the step checked."""
        summary = read_summary(store, self.step, self.summary_sha256)
        if summary is None:
            raise StageMissing(f"{store.url(layout.summary(self.step))} is missing or damaged; rerun the build to redo it")
        return summary


class TokenizerResult(StepResult):
    """The tokenizer step: the tokenizer it loaded or trained as well."""

    tokenizer: TokenizerInfo


class StepRun:
    """run(stage) -> its summary, for every stage of one step (tasks.fanout.run_stage with the
    build's store, config and parallelism; `inline` as there), keeping only the step's running totals."""

    def __init__(self, step: str, store: Store, config: BuildConfig, inline: bool = False) -> None:
        self.step, self.store, self.config, self.inline = step, store, config, inline
        self._stages = self._shards = self._bytes_out = 0
        self._seconds = 0.0
        self._counts: dict[str, int] = {}
        self._sources: dict[str, SourceAccounting] = {}
        self._summary_sha256: str | None = None

    def __call__(self, stage: Stage) -> StageSummary:
        summary = run_stage(self.store, stage, self.config, self.config.parallelism, self.inline)
        self._stages += 1
        self._shards += len(summary)
        self._seconds += summary.work_seconds
        self._bytes_out += summary.bytes_out
        for name, value in summary.count_totals().items():
            self._counts[name] = self._counts.get(name, 0) + value
        if stage.name == self.step:
            self._sources, self._summary_sha256 = summary.sources(), summary.sha256
        return summary

    def result(self) -> StepResult:
        return StepResult(
            step=self.step, stages=self._stages, shards=self._shards, work_seconds=round(self._seconds, 3),
            bytes_out=self._bytes_out, sources=self._sources, counts=self._counts, summary_sha256=self._summary_sha256,
        )

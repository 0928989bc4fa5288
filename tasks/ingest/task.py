"""The ingest stage as a Prefect task: one planned file per shard, `ingest_file` as its work."""

from __future__ import annotations

from storage import build_layout as layout
from tasks.ingest.shard import ingest_file
from tasks.plan import Build, shard_of
from tasks.stage import INGEST, Stage, stage_task
from tasks.step_result import StepResult, StepRun


@stage_task(INGEST)
def ingest(build: Build) -> StepResult:
    """Every planned file to a docs shard, one Ray task each."""
    config, store = build.config, build.store
    sources = {s.name: s for s in config.sources}
    run = StepRun(INGEST, store, config)
    run(Stage(
        INGEST, build.plan, shard_of,
        lambda f: ingest_file(f, sources[f.source], config.filters, config.quarantine, store),
        (layout.DOCS, layout.QUARANTINE),
    ))
    return run.result()

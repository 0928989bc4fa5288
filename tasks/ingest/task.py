"""The ingest stage as a Prefect task: every planned file to a docs shard, one Ray task each."""

from __future__ import annotations

from tasks.fanout import run_shards
from tasks.ingest.shard import ingest_file
from tasks.plan import Build
from tasks.reporting import progress, stage_table
from tasks.stage import stage_task


@stage_task("ingest")
def ingest(build: Build) -> dict[str, int | float]:
    """Every planned file to a docs shard, one Ray task each; returns the stage's totals."""
    config, store = build.config, build.store
    sources = {s.name: s for s in config.sources}
    receipts = run_shards(
        "ingest", store, build.plan, lambda f: f.shard,
        lambda f: ingest_file(f, sources[f.source], config.filters, config.quarantine, store),
        on_progress=progress("ingest", config.name), max_in_flight=config.parallelism,
    )
    return stage_table("ingest", config.name, receipts)

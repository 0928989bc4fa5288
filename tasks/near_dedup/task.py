"""The near-dedup stage as one Prefect task: every step's shards fan out on Ray with receipts."""

from __future__ import annotations

from prefect.artifacts import create_table_artifact

from tasks.exact_dedup import removed_prefix
from tasks.fanout import list_receipts, run_shards
from tasks.ingest import docs_key
from tasks.near_dedup.stage import SAMPLE_KEY, STAGE, DocsShard, run_near_dedup
from tasks.parquet_io import read_table
from tasks.plan import Build
from tasks.reporting import artifact_key, progress, stage_table
from tasks.stage import stage_task

SAMPLE_ARTIFACT_ROWS = 20


@stage_task("near-dedup")
def near_dedup(build: Build) -> dict[str, int | float]:
    store, config = build.store, build.config
    shards = [DocsShard(f, docs_key(f), tuple(store.list(removed_prefix(f.shard)))) for f in build.plan]

    def fan_out(stage, items, shard_of, work):
        return run_shards(
            stage, store, items, shard_of, work,
            on_progress=progress(stage, config.name), max_in_flight=config.parallelism,
        )

    run_near_dedup(store, shards, config.minhash, fan_out)
    sample = read_table(store, SAMPLE_KEY).slice(0, SAMPLE_ARTIFACT_ROWS).to_pylist()
    create_table_artifact(
        sample or [{"removed": "none"}],
        key=artifact_key(config.name, "near-dup-sample"),
        description=f"near duplicates removed, with the document kept (first {SAMPLE_ARTIFACT_ROWS}; all in {store.url(SAMPLE_KEY)})",
    )
    return stage_table(STAGE, config.name, list_receipts(store, STAGE))

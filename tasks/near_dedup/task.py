"""The near-dedup stage as one Prefect task: every step runs through tasks.fanout.run_stage."""

from __future__ import annotations

from functools import partial

from storage import build_layout as layout
from tasks.fanout import read_summary, run_stage
from tasks.near_dedup.steps import STAGE, DocsShard, bands_rows, run_near_dedup
from tasks.partitioning import NEAR_BAND_ROW_BYTES, NEAR_EDGE_BYTES, batch_bytes, ingested_documents, partitions
from tasks.plan import Build
from tasks.reporting import stage_totals
from tasks.stage import INGEST, NEAR_DEDUP, stage_task


@stage_task(NEAR_DEDUP)
def near_dedup(build: Build) -> dict[str, int | float]:
    store, config = build.store, build.config
    documents, sizes = ingested_documents(read_summary(store, INGEST))
    budget, cfg = config.task_memory_bytes, config.minhash
    bands, _ = bands_rows(cfg)
    cfg = cfg.model_copy(
        update={
            "bucket_partitions": partitions(documents, bands * NEAR_BAND_ROW_BYTES, budget, cfg.bucket_partitions),
            "component_partitions": partitions(documents, NEAR_EDGE_BYTES, budget, cfg.component_partitions),
        }
    )
    exact = config.dedup.exact
    shards = [
        DocsShard(f, layout.docs(f.source, f.shard), exact, sizes[f.shard])
        for f in build.plan
    ]
    run = partial(run_stage, store, build_config=config, max_in_flight=config.parallelism)
    run_near_dedup(store, shards, cfg, run, batch_bytes(budget), budget)
    return stage_totals(read_summary(store, STAGE))

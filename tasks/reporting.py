"""What a stage shows in the Prefect UI: a progress bar while it runs, a table when it ends."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from storage.manifest import Receipt


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def progress(stage: str, build_name: str) -> Callable[[int, int], None]:
    """A callback that keeps one progress artifact up to date (at most every whole percent)."""
    artifact_id = create_progress_artifact(
        0.0, key=artifact_key(build_name, stage, "progress"), description=f"{stage}: shards done"
    )
    last = -1

    def update(done: int, total: int) -> None:
        nonlocal last
        percent = int(100 * done / total) if total else 100
        if percent != last:
            last = percent
            update_progress_artifact(artifact_id, float(percent), description=f"{stage}: {done}/{total} shards")

    return update


def plan_table(build_name: str, files, source_bytes: dict[str, int]) -> None:
    create_table_artifact(
        [{"source": name, "files": sum(f.source == name for f in files), "bytes": size} for name, size in source_bytes.items()],
        key=artifact_key(build_name, "plan"),
        description=f"plan: {len(files)} input units",
    )


def stage_totals(receipts: Sequence[Receipt]) -> dict[str, int | float]:
    """The receipts' counts summed (what a stage's Prefect task returns: a small summary)."""
    totals: dict[str, int | float] = {"shards": len(receipts)}
    for receipt in receipts:
        for name, value in receipt.counts.items():
            totals[name] = totals.get(name, 0) + value
    totals["bytes_out"] = sum(o.size for r in receipts for o in r.outputs)
    totals["work_seconds"] = round(sum(r.seconds for r in receipts), 3)
    return totals


def stage_table(stage: str, build_name: str, receipts: Sequence[Receipt]) -> None:
    """The stage's totals as a table artifact."""
    totals = stage_totals(receipts)
    create_table_artifact(
        [{"metric": name, "value": value} for name, value in totals.items()],
        key=artifact_key(build_name, stage),
        description=f"{stage}: totals over {len(receipts)} shards",
    )

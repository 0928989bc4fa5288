"""Progress bars in the terminal: the progress artifacts of a command's flow runs (build stages'
shards done, training steps of the segment), redrawn with rich once a second; nothing when
stderr is not a terminal (logs and CI output stay plain)."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from uuid import UUID

POLL_S = 1.0


@contextlib.contextmanager
def progress_bars(flow_runs: list[UUID]) -> Iterator[None]:
    """Show bars for the progress artifacts of `flow_runs` (a list that grows) and their subflows."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    stop = threading.Event()
    bars = Progress(
        TextColumn("{task.fields[key]}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.description}"),
        console=Console(stderr=True), transient=False,
    )
    thread = threading.Thread(target=_follow, args=(flow_runs, bars, stop), daemon=True, name="progress-bars")
    with bars:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)


def _follow(flow_runs: list[UUID], bars, stop: threading.Event) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    shown: dict[UUID, int] = {}
    with get_client(sync_client=True) as client:
        while not stop.wait(POLL_S):
            with contextlib.suppress(Exception):  # a bar is a nicety: never fail the command over it
                runs = list(flow_runs)
                if not runs:
                    continue
                subflows = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=runs))
                )
                artifacts = client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=runs + [run.id for run in subflows]),
                        type=ArtifactFilterType(any_=["progress"]),
                    )
                )
                for artifact in sorted(artifacts, key=lambda a: a.created):
                    if artifact.id not in shown:
                        shown[artifact.id] = bars.add_task("", total=100.0, key=artifact.key or "progress")
                    bars.update(shown[artifact.id], completed=float(artifact.data or 0), description=artifact.description or "")

"""What a build shows in the Prefect UI: one progress bar per pipeline step while it runs, and
the steps' run times for its summary.

The step's totals, and the whole build's, go into the build's summary (tasks/publish.py), so
the run's Artifacts tab holds one card per step and the summary, not a card per stage.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext

if TYPE_CHECKING:
    from tasks.config import BuildConfig

_step_artifacts: dict[UUID, UUID] = {}  # task run -> its progress artifact, shared by the step's stages
_run_seconds: dict[UUID, dict[str, float]] = {}  # flow run -> task name -> seconds it ran
_step_artifacts_lock = threading.Lock()  # guards both


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def build_artifact_key(config: BuildConfig, *parts: str) -> str:
    """A key of one build's artifacts, `build-<name>-<build id>-...`: each build has its own (a
    rerun of the same build adds a version), so no build's card shadows another's."""
    return artifact_key("build", config.name, config.resolved_build_id, *parts)


def _step_artifact(step: str, config: BuildConfig, description: str) -> UUID:
    """The progress artifact of the Prefect task (pipeline step) running now: created by its first
    stage, moved by the later ones (near dedup runs a dozen stages in one step)."""
    context = TaskRunContext.get()
    owner = context.task_run.id if context else None
    with _step_artifacts_lock:
        if owner in _step_artifacts:
            return _step_artifacts[owner]
        artifact_id = create_progress_artifact(0.0, key=build_artifact_key(config, step, "progress"), description=description)
        if owner is not None:
            _step_artifacts[owner] = artifact_id
        return artifact_id


def progress(stage: str, config: BuildConfig) -> Callable[[int, int], None]:
    """A callback that moves its step's progress artifact to this stage's shards done (at most
    every whole percent); the description names the stage."""
    context = TaskRunContext.get()
    step = context.task.name if context else stage
    label = stage if stage == step else f"{step} · {stage}"
    artifact_id = _step_artifact(step, config, f"{label}: shards done")
    last = -1

    def update(done: int, total: int) -> None:
        nonlocal last
        percent = int(100 * done / total) if total else 100
        if percent != last:
            last = percent
            update_progress_artifact(artifact_id, float(percent), description=f"{label}: {done}/{total} shards")

    return update


def record_run_time(task, task_run, _state) -> None:
    """A stage task's completion hook: its run time (all attempts, as Prefect's engine timed it
    here), for the build's summary; the server's copy of the task run may lag behind."""
    if task_run.flow_run_id is not None:
        with _step_artifacts_lock:
            _run_seconds.setdefault(task_run.flow_run_id, {})[task.name] = task_run.total_run_time.total_seconds()


def step_seconds() -> dict[str, float]:
    """Seconds each step of the current flow run ran, by task name (empty outside a flow run)."""
    context = FlowRunContext.get()
    with _step_artifacts_lock:
        return _run_seconds.pop(context.flow_run.id, {}) if context else {}

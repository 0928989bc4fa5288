"""Cancelled, all the way down: a stopped flow run's task runs and subflow runs are marked
Cancelled with it, so the UI shows what was stopped (not Running forever, nor Crashed).

Two paths stop a flow run: the runner of `tinyllama serve` on a cancel from the UI or the API
(it stops the run's process, runs the flow's `on_cancellation` hooks, then marks the flow run
Cancelled), and an interrupt of a CLI command (deployments/session.py). Both end here.

On the runner's path the training task ends its own run Cancelled (tasks/train.py), the `train`
flow returns that state, and the deployment's flow above it ends Cancelled too
(result_unless_cancelled), so every run's log ends `Finished in state Cancelled(...)`: no
`Crash detected!`, no `Running()`.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, NoReturn, TypeVar
from uuid import UUID

if TYPE_CHECKING:  # Prefect loads when a run needs it: the CLI checks its configs first
    from prefect.states import State

R = TypeVar("R")


def cancel_runs(flow_runs: list[UUID], message: str, failed_since: datetime | None = None) -> int:
    """Mark `flow_runs` Cancelled unless they had ended (Completed, or Failed before `failed_since`:
    a run that failed after the interrupt failed because of it), with their task runs and subflow
    runs that had not (a Crashed one included: it crashed because it was stopped); returns how
    many runs were marked. A run already Cancelled (a subflow's engine marks its own)
    is looked into all the same."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.states import Cancelled

    cancelled = 0
    with get_client(sync_client=True) as client:
        todo, seen = list(flow_runs), set(flow_runs)
        while todo:
            flow_run_id = todo.pop()
            state = client.read_flow_run(flow_run_id).state
            if _ended(state) and not (failed_since and state.is_failed() and state.timestamp >= failed_since):
                continue  # an earlier flow of the command that had ended
            if not _cancelled(state):
                client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)
                cancelled += 1
            task_runs = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
            )
            for task_run in task_runs:
                if not (_ended(task_run.state) or _cancelled(task_run.state)):
                    client.set_task_run_state(task_run.id, Cancelled(message=message), force=True)
                    cancelled += 1
            if task_runs:
                subflows = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in task_runs])
                    )
                )
                todo.extend(run.id for run in subflows if run.id not in seen)
                seen.update(run.id for run in subflows)
    return cancelled


def result_unless_cancelled(state: State[R]) -> R | State[R]:
    """A subflow run's result (raising its error as a plain call would), or, when a runner's cancel
    stopped it, this flow run's end as Cancelled too: a subflow returns the state to its caller; the
    top run records it and stops (end_cancelled), as its engine would log a returned Cancelled state
    as an unexpected exception."""
    from prefect.runtime import flow_run

    if not state.is_cancelled():
        return state.result()
    if flow_run.get_parent_flow_run_id():
        return state
    end_cancelled(state.message or "Flow run was cancelled.")


def end_cancelled(message: str) -> NoReturn:
    """End the current (top) flow run Cancelled, then stop its engine the way a paused run stops: a
    signal carrying the state it has, which the engine logs as its final state. (The engine's own
    handling of the runner's cancel leaves the state to the runner and logs `Finished in state
    Running()`.) The runner then marks it Cancelled again and runs the on_cancellation hooks."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import Abort
    from prefect.runtime import flow_run
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        cancelled = client.set_flow_run_state(flow_run.get_id(), Cancelled(message=message), force=True).state
    stop = Abort(message)
    stop.state = cancelled
    raise stop


def cancel_task_and_subflow_runs(flow, flow_run, state) -> None:
    """The flows' `on_cancellation` hook (the runner calls it once the run's process is stopped)."""
    cancel_runs([flow_run.id], state.message or "Flow run was cancelled.")


def _ended(state) -> bool:
    return state is not None and (state.is_completed() or state.is_failed())


def _cancelled(state) -> bool:
    return state is not None and state.is_cancelled()

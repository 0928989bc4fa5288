"""What a command shows on stderr while flow runs work.

- Progress bars: the progress artifacts of a command's flow runs (build stages' shards done,
  training steps of the segment), redrawn with rich once a second; only when stderr is a
  terminal (the runs' own logs already reach the console, and CI output stays plain).
- `wait_for_run`: a run submitted to a server (its logs stay there) is followed until it ends:
  a line per change of state of the run, its subflow runs and task runs (a stage completed,
  say), with the bars on a terminal, else a line per progress artifact at most every
  PROGRESS_LINE_S (and when it reaches 100%).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from uuid import UUID

POLL_S = 1.0
PROGRESS_LINE_S = 10.0


@contextlib.contextmanager
def progress_bars(flow_runs: list[UUID]) -> Iterator[Callable[[str], None] | None]:
    """Show bars for the progress artifacts of `flow_runs` (a list that grows) and their subflows;
    yields a function that prints a line above the bars (None when stderr is not a terminal)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    stop = threading.Event()
    bars = Progress(
        TextColumn("{task.fields[key]}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.description}"),
        console=Console(stderr=True), transient=False,
    )
    thread = threading.Thread(target=_follow_bars, args=(flow_runs, bars, stop), daemon=True, name="progress-bars")
    with bars:
        thread.start()
        try:
            yield lambda line: bars.console.print(line, markup=False, highlight=False)
        finally:
            stop.set()
            thread.join(timeout=5)


def _follow_bars(flow_runs: list[UUID], bars, stop: threading.Event) -> None:
    from prefect.client.orchestration import get_client

    shown: dict[UUID, int] = {}
    with get_client(sync_client=True) as client:
        tree = _RunTree(client)
        while not stop.wait(POLL_S):
            with contextlib.suppress(Exception):  # a bar is a nicety: never fail the command over it
                for artifact in tree.progress_artifacts(list(flow_runs)):
                    if artifact.id not in shown:
                        shown[artifact.id] = bars.add_task("", total=100.0, key=artifact.key or "progress")
                    bars.update(shown[artifact.id], completed=float(artifact.data or 0), description=artifact.description or "")


def wait_for_run(flow_run_id: UUID):
    """Wait until the flow run ends and return it (a FlowRun), reporting on stderr meanwhile (see
    the module docstring)."""
    from prefect.client.orchestration import get_client

    started = time.monotonic()
    with progress_bars([flow_run_id]) as print_above_bars, get_client(sync_client=True) as client:
        tree = _RunTree(client)

        def say(line: str) -> None:
            line = f"{time.monotonic() - started:5.0f}s  {line}"
            if print_above_bars:
                print_above_bars(line)
            else:
                print(line, file=sys.stderr, flush=True)

        last_state_at: dict[UUID, object] = {}  # run -> the time of its last state said
        progress_said: dict[UUID, tuple[float, float]] = {}  # artifact -> (when, percent) last said
        while True:
            # The states first: once a run has ended, the progress read next is its last. Printed
            # the other way round: a stage's progress, then its end.
            changes = tree.state_changes([flow_run_id], last_state_at)
            run = tree.runs[flow_run_id]
            if not print_above_bars:
                for artifact in tree.progress_artifacts([flow_run_id]):
                    percent = float(artifact.data or 0)
                    said_at, said = progress_said.get(artifact.id, (-PROGRESS_LINE_S, -1.0))
                    if percent != said and (percent >= 100 or time.monotonic() - said_at >= PROGRESS_LINE_S):
                        progress_said[artifact.id] = (time.monotonic(), percent)
                        say(f"{artifact.description or artifact.key} ({percent:.0f}%)")
            for changed in changes:
                say(changed)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(POLL_S)


class _RunTree:
    """A flow run with its subflow runs (at any depth: one level more is found on each read)."""

    def __init__(self, client) -> None:
        self.client = client
        self.runs: dict[UUID, object] = {}  # every run of the tree seen so far, by id

    def flow_runs(self, roots: list[UUID]) -> list:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

        known = list(dict.fromkeys([*roots, *self.runs]))
        read = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=known)))
        read += self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=known))
        )
        for run in read:
            self.runs[run.id] = run
        return sorted(self.runs.values(), key=lambda run: run.created)

    def progress_artifacts(self, roots: list[UUID]) -> list:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

        runs = [run.id for run in self.flow_runs(roots)]
        if not runs:
            return []
        artifacts = self.client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=runs), type=ArtifactFilterType(any_=["progress"])
            )
        )
        return sorted(artifacts, key=lambda artifact: artifact.created)

    def state_changes(self, roots: list[UUID], said: dict[UUID, object]) -> list[str]:
        """`<flow run>: <state>` and `<flow run> › <task run>: <state>` for each state a run reached
        since the last call (`said` keeps, per run, the time of the last state said); a subflow's
        own task run is left out. A flow run's states come from its history, so a state between two
        polls (a short build's Running) is said too, under the run's current name (a deployment's
        run is renamed by its flow as it starts)."""
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

        flow_runs = self.flow_runs(roots)
        names = {run.id: run.name for run in flow_runs}
        subflow_task_runs = {run.parent_task_run_id for run in flow_runs}
        task_runs = self.client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=list(names)))
        )
        reached = []  # (run, state)
        for run in [*flow_runs, *task_runs]:
            if run.state is None or run.id in subflow_task_runs or said.get(run.id) == run.state.timestamp:
                continue
            states = self.client.read_flow_run_states(run.id) if run.id in names else [run.state]
            reached += [(run, state) for state in states if said.get(run.id) is None or state.timestamp > said[run.id]]
            said[run.id] = run.state.timestamp
        changes = []
        for run, state in sorted(reached, key=lambda pair: pair[1].timestamp):  # in the order they happened
            subject = names[run.id] if run.id in names else f"{names.get(run.flow_run_id, '?')} › {run.name}"
            message = f" ({state.message})" if state.is_final() and not state.is_completed() else ""
            line = f"{subject}: {state.name}{message}"
            if not changes or changes[-1] != line:
                changes.append(line)
        return changes

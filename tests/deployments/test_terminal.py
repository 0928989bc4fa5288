"""`wait_for_run`, which `submit-build --wait` and `train-epoch --wait` follow a served run with:
a flow with a subflow and stages, run in a thread on the session's Prefect server, followed from
this one; stderr is not a terminal here, so it prints plain lines."""

from __future__ import annotations

import queue
import re
import threading
import time

from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from deployments.terminal import wait_for_run

STAGE_S = 3.0  # a stage lasts several polls (a second each), so that the follower sees the runs running


@task(name="count-shards")
def count_shards(shards: int) -> int:
    artifact = create_progress_artifact(0.0, key="count-shards-progress", description=f"count: 0/{shards} shards")
    for done in range(1, shards + 1):
        time.sleep(STAGE_S / shards)
        update_progress_artifact(artifact, 100.0 * done / shards, description=f"count: {done}/{shards} shards")
    return shards


@task(name="sum-up")
def sum_up(value: int) -> int:
    time.sleep(STAGE_S)
    return value + 1


@flow(name="inner-stages", flow_run_name="inner-run")
def inner(shards: int) -> int:
    return sum_up(count_shards(shards))


@flow(name="outer-stages", flow_run_name="outer-run")
def outer(shards: int = 3, fail: bool = False) -> int:
    result = inner(shards)
    if fail:
        raise ValueError("the last stage found a bad record")
    return result


def follow(capsys, fail: bool = False):
    """Run `outer` in a thread and wait for it here; returns the final run and the lines printed."""
    started: queue.Queue = queue.Queue()
    remember = lambda _flow, run, _state: started.put(run.id)  # noqa: E731
    thread = threading.Thread(target=outer.with_options(on_running=[remember]),
                              kwargs={"fail": fail, "return_state": True}, daemon=True)
    thread.start()
    final = wait_for_run(started.get(timeout=120))
    thread.join(timeout=60)
    printed = [re.fullmatch(r" *\d+s  (.*)", line) for line in capsys.readouterr().err.splitlines()]
    return final, [line[1] for line in printed if line]  # its lines (not the flows' logs), without the time


def test_a_run_waited_for_prints_a_line_per_state_change_of_its_flows_and_stages(prefect_server, capsys):
    final, lines = follow(capsys)
    assert final.state.is_completed()
    assert lines[-1] == "outer-run: Completed" and "outer-run: Running" in lines
    assert lines.index("inner-run: Running") < lines.index("inner-run: Completed") < lines.index("outer-run: Completed")
    stages = [re.fullmatch(r"inner-run › (count-shards|sum-up)-\w+: (\w+)", line) for line in lines]
    assert [m.groups() for m in stages if m and m[2] == "Completed"] == [("count-shards", "Completed"), ("sum-up", "Completed")]
    assert "count: 3/3 shards (100%)" in lines  # the stage's progress artifact, once complete
    assert len(lines) == len(set(lines))  # one line per change, none repeated


def test_a_failed_run_ends_with_its_state_and_message(prefect_server, capsys):
    final, lines = follow(capsys, fail=True)
    assert final.state.is_failed()
    assert lines[-1].startswith("outer-run: Failed (") and "the last stage found a bad record" in lines[-1]
    assert "inner-run: Completed" in lines

"""Cancelling a flow run through the Prefect API, as the UI's Cancel button does.

A real `serve_main` process serves the deployments on the session's Prefect server; each flow
run is a subprocess of it (its own local Ray, its own torchrun). The tests set a running flow
run to Cancelling the way `prefect flow-run cancel` does, then check that it ends Cancelled,
that nothing it started is left (serve's process tree is empty again), that its stopped task
and subflow runs show Cancelled (a training run's logs too: no crash, each run's last line
Cancelled), and that a rerun (called here) gives the output of an
undisturbed run: the same bytes, the same losses and weights.

(A flow called in-process, as the CLI does, has no runner to stop it: Prefect cancels only
deployment runs. The CLI's own Ctrl-C is tested in tests/deployments/test_cli.py and
tests/flows/test_train_flow.py.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterParentTaskRunId,
    TaskRunFilter, TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling

from demo.sample_corpus import make_sample_corpus
from deployments.deploy import BUILD, EVALUATE, TRAIN_ON_BUILD, submit
from flows.build_dataset import build_dataset
from flows.pretrain import TrainSettings, manifest_uri
from flows.train import train
from model.checkpoint import latest_checkpoint, load_model
from runtime.processes import process_tree
from storage.store import open_store
from tasks.config import BuildConfig
from tasks.reporting import artifact_key
from tests.fixtures.prefect import log_messages_of
from tests.builds import build_objects, sample_config
from tests.deployments.conftest import stop
from tests.fixtures.served import ServedProcess
from tests.model.runs import metrics, train_config

# Each test starts flow runs with a Ray or a torchrun of their own: minutes on 2 cores.
pytestmark = [pytest.mark.usefixtures("prefect_server", "ray_local"), pytest.mark.slow]

STARTUP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 300


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Served(ServedProcess):
    def tree(self) -> dict[int, str]:
        """serve's live descendants and their command lines: the flow runs and all they started."""
        tree = {pid: command_line(pid) for pid in process_tree(self.process.pid)}
        return {pid: line for pid, line in tree.items() if line}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return make_sample_corpus(tmp_path_factory.mktemp("raw"), target_bytes=128 << 10, seed=7)


@pytest.fixture(scope="module")
def reference_build(corpus, tmp_path_factory) -> BuildConfig:
    """An undisturbed build (called here, not served) to compare reruns with."""
    config = sample_config(corpus, str(tmp_path_factory.mktemp("reference")), dedup={"exact": True, "near": False})
    build_dataset(config)
    return config


@pytest.fixture(scope="module")
def served(prefect_server, reference_build, tmp_path_factory) -> Iterator[Served]:
    """`serve_main` attached to the session's Prefect server (PREFECT_API_URL)."""
    root = tmp_path_factory.mktemp("served")
    build_yaml = root / "build.yaml"
    build_yaml.write_text(yaml.safe_dump(reference_build.model_dump(mode="json")))
    command = (
        "from pathlib import Path; from deployments.serve import serve_main; "
        f"serve_main(data_dir=Path({str(root / 'data')!r}), build_config=Path({str(build_yaml)!r}), "
        "train_after_build=False)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each flow run starts a Ray of its own
    env.update(PREFECT_API_URL=prefect_server, PREFECT_RUNNER_POLL_FREQUENCY="1")
    log = root / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", command], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    served = Served(process, log)
    try:
        served.wait_for(lambda: registered(EVALUATE), STARTUP_TIMEOUT_S, "the deployments")
        yield served
    finally:
        stop(process)


def registered(deployment: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return False
    return True


def flow_run(flow_run_id) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def cancel(flow_run_id) -> None:
    """What `prefect flow-run cancel ID` (and the UI's Cancel) does: propose Cancelling; the runner
    serving the run sees it and stops the run's process."""
    with get_client(sync_client=True) as client:
        result = client.set_flow_run_state(flow_run_id, Cancelling())
    assert result.status == SetStateStatus.ACCEPT, result.details


def child_runs(flow_run_id) -> dict[str, StateType]:
    """The states of a flow run's task runs and subflow runs (and theirs), by name."""
    return {run.name: run.state.type for run in descendants(flow_run_id)}


def descendants(flow_run_id) -> list:
    """A flow run's task runs and subflow runs, and theirs."""
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in tasks]))
        ) if tasks else []
    return [*tasks, *subflows, *(run for subflow in subflows for run in descendants(subflow.id))]


def logged(flow_run_id) -> list[str]:
    """The log lines of a flow run and of its subflow runs, as the UI shows them."""
    return log_messages_of([flow_run_id, *(run.id for run in descendants(flow_run_id) if isinstance(run, FlowRun))])


def artifact_texts(flow_run_id) -> dict[str, str]:
    """key -> description and data of the artifacts of the run and its subflow runs."""
    ids = [flow_run_id, *(run.id for run in descendants(flow_run_id) if isinstance(run, FlowRun))]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    return {artifact.key: f"{artifact.description or ''}\n{artifact.data}" for artifact in artifacts if artifact.key}


def assert_cancelled_and_gone(served: Served, flow_run_id) -> FlowRun:
    ended = served.wait_for(lambda: (run := flow_run(flow_run_id)).state.is_final() and run, 120, "the run to end")
    assert ended.state.type == StateType.CANCELLED, f"{ended.state.name}: {ended.state.message}\n{served.log_tail()}"
    deadline = time.monotonic() + 30
    while (left := served.tree()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "left behind by the cancelled run:\n" + "\n".join(f"{p}: {c[:120]}" for p, c in left.items())
    # What was stopped shows as Cancelled in the UI too (not Running or Crashed), what had ended as it ended.
    children = child_runs(flow_run_id)
    assert StateType.CANCELLED in children.values() and set(children.values()) <= {StateType.COMPLETED, StateType.CANCELLED}, children
    return ended


def test_cancelling_a_running_build_stops_its_ray_tasks_and_a_rerun_gives_the_same_bytes(served, reference_build, tmp_path):
    config = reference_build.model_copy(update={"output": str(tmp_path / "cancelled")})
    run = submit(BUILD, {"config": config.model_dump(mode="json")})

    def tasks_in_flight() -> list[str]:
        return [line for line in served.tree().values() if line.startswith("ray::_work_and_commit")]

    served.wait_for(tasks_in_flight, RUN_TIMEOUT_S, "the build's Ray tasks", poll_s=0.1)
    cancel(run.id)
    assert_cancelled_and_gone(served, run.id)
    manifest = Path(config.output) / "datasets" / config.name / config.resolved_build_id / "manifest.json"
    assert not manifest.exists()

    build_dataset(config)  # the rerun (here, on the session's Ray: a served one would start another)
    assert build_objects(config.output, receipts=False) == build_objects(reference_build.output, receipts=False)


MORE_STEPS = 2  # trained after the checkpoint the cancelled run resumes from
RUN_PARAMETERS = {"max_steps": 100_000, "checkpoint_every": 2, "launcher": {"kind": "torchrun", "nproc": 2}}


def test_cancelling_a_running_training_stops_torchrun_and_its_ranks_and_a_rerun_trains_the_same_model(
    served, reference_build, tmp_path
):
    manifest = manifest_uri(reference_build)
    config = train_config("cancelled", str(tmp_path / "out"), manifest, tmp_path, **RUN_PARAMETERS)
    settings = TrainSettings.model_validate({**config.model_dump(mode="json"), "data": []})

    parameters = {"build": reference_build.model_dump(mode="json"), "train": settings.model_dump(mode="json")}
    run = submit(TRAIN_ON_BUILD, {**parameters, "train_run": config.name})
    run_store = open_store(config.run_uri)

    def training() -> list[str]:  # torchrun and its 2 ranks, past the first checkpoint
        job = [line for line in served.tree().values() if "model.train" in line]
        return job if len(job) == 3 and latest_checkpoint(run_store) else []

    served.wait_for(training, RUN_TIMEOUT_S, "training past its first checkpoint")
    (child,) = [r for r in descendants(run.id) if isinstance(r, FlowRun)]  # the `train` subflow run
    cancel(run.id)
    cancel(child.id)  # the Cancel dialog's "Cancel all sub flow runs" (the child's own button needs a deployment)
    assert_cancelled_and_gone(served, run.id)
    assert flow_run(child.id).state.type == StateType.CANCELLED, flow_run(child.id).state
    # One line says what was kept, in the log and on the progress card; the ranks' tracebacks of the
    # signal that stopped them are not logged, nor is the cancel called a crash, nor does a run's
    # log end in a state other than Cancelled.
    kept = latest_checkpoint(run_store).step
    said = re.compile(rf"cancelled at step \d+; checkpoint step {kept} kept")
    lines = logged(run.id)
    assert len([line for line in lines if said.search(line)]) == 1, lines
    assert not [line for line in lines if "Traceback" in line or "SignalException" in line], lines
    assert not [line for line in lines if re.search(r"Crash detected|Crashed\(|Running\(\)", line)], lines
    finished = [line for line in lines if line.startswith("Finished in state")]
    assert len(finished) == 3 and all(line.startswith("Finished in state Cancelled(") for line in finished), lines
    texts = artifact_texts(run.id)  # the progress card's description, and the live card's status
    assert said.search(texts[artifact_key(config.name, "train-progress")]), texts
    assert said.search(texts[artifact_key(config.name, "train-live")]), texts

    steps = latest_checkpoint(run_store).step + MORE_STEPS
    train(config.model_copy(update={"max_steps_this_run": MORE_STEPS}))  # the rerun, here: it resumes
    reference = train_config("reference", str(tmp_path / "out"), manifest, tmp_path, max_steps_this_run=steps, **RUN_PARAMETERS)
    train(reference)  # undisturbed, called here
    finished, undisturbed = metrics(config.run_uri), metrics(reference.run_uri)
    assert [r["step"] for r in finished] == list(range(1, steps + 1))
    assert [(r["loss"], r["grad_norm"]) for r in finished] == [(r["loss"], r["grad_norm"]) for r in undisturbed]
    model, _ = load_model(config.run_uri)
    reference_model, _ = load_model(reference.run_uri)
    for name, tensor in reference_model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name

"""The deployments, served by a real `serve_main` process (tests/deployments/conftest.py).

In order: registration; a build run through the API that completes and triggers training;
an epoch during which a manual `train` of the same run is refused by the run's lease; a
second epoch that continues where the first stopped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun, StateType

from deployments.deploy import BUILD, TRAIN_EPOCH, TRAIN_ON_BUILD, submit
from deployments.serve import epoch_schedule_was_active
from flows.pretrain import TrainSettings, check_same_data, manifest_uri
from flows.train import train
from model.checkpoint import latest_checkpoint
from model.metrics import read_metrics
from storage.lease import LeaseHeld
from storage.store import open_object, open_store
from tasks.train import LEASE_FILE, run_config
from tests.deployments.conftest import GLOBAL_BATCH_TOKENS, RUN, RUN_TIMEOUT_S, SEGMENT, tiny_training
from tests.storage.leases import read_lease

LONG_EPOCH = 30  # steps: long enough that a second job is tried while it trains


async def _deployment(client, name):
    return await client.read_deployment_by_name(name)


async def _runs_of(client, name) -> list[FlowRun]:
    found = await client.read_deployment_by_name(name)
    return await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])))


async def _flow_run(client, flow_run_id) -> FlowRun:
    return await client.read_flow_run(flow_run_id)


def finished(served, flow_run_id) -> FlowRun | None:
    run = served.call(_flow_run, flow_run_id)
    return run if run.state.is_final() else None


def assert_completed(run: FlowRun, served) -> None:
    assert run.state.type == StateType.COMPLETED, f"{run.name} ended {run.state.name}: {run.state.message}\n{served.log_tail()}"


def newest_step(served) -> int:
    checkpoint = latest_checkpoint(served.run_store())
    return checkpoint.step if checkpoint else 0


def test_deployments_register_with_parameters_schedule_limit_and_trigger(served):
    build = served.call(_deployment, BUILD)
    assert build.parameters["config"]["output"] == str(served.data)
    assert "config" in build.parameter_openapi_schema["properties"]  # what the UI's form is made from

    epoch = served.call(_deployment, TRAIN_EPOCH)
    assert epoch.parameters == {"run": RUN, "output": str(served.data), "steps": 50}
    assert [(s.schedule.cron, s.active) for s in epoch.schedules] == [("0 * * * *", False)]  # created paused
    assert epoch.global_concurrency_limit.limit == 1

    async def automations(client):
        on_build = await client.read_deployment_by_name(TRAIN_ON_BUILD)
        return await client.read_resource_related_automations(f"prefect.deployment.{on_build.id}")

    (automation,) = served.call(automations)
    assert automation.enabled and automation.trigger.expect == {"prefect.flow-run.Completed"}


def test_a_schedule_switched_on_stays_on_when_serve_registers_again(served):
    async def switch(client, active: bool):
        epoch = await client.read_deployment_by_name(TRAIN_EPOCH)
        await client.update_deployment_schedule(epoch.id, epoch.schedules[0].id, active=active)

    with served.api():
        assert not epoch_schedule_was_active()
        served.call(switch, True)
        try:
            assert epoch_schedule_was_active()
        finally:
            served.call(switch, False)


def test_build_run_through_the_api_completes_and_triggers_training(served, finished_build):
    config, run = finished_build
    assert_completed(run, served)
    assert run.parameters["config"]["name"] == "api-build"
    store, key = open_object(manifest_uri(config))
    assert store.exists(key), "the build's manifest is missing"

    # The automation starts train-on-build with that build's config; it trains the first segment.
    (triggered,) = served.wait_for(lambda: served.call(_runs_of, TRAIN_ON_BUILD), 120, "the triggered run")
    assert triggered.parameters["build"]["name"] == "api-build"
    assert_completed(served.wait_for(lambda: finished(served, triggered.id), RUN_TIMEOUT_S, "training"), served)
    assert newest_step(served) == SEGMENT
    assert [d.manifest for d in run_config(str(served.data), RUN).data] == [manifest_uri(config)]


def test_a_second_job_is_refused_and_consecutive_epochs_continue_the_run(served, finished_build):
    start = newest_step(served)
    assert start >= SEGMENT, "the triggered training run did not leave a checkpoint"

    with served.api():
        first = submit(TRAIN_EPOCH, {"steps": LONG_EPOCH})
    lease = served.wait_for(lambda: read_lease(served.run_store(), LEASE_FILE), RUN_TIMEOUT_S, "the epoch's lease")
    holder_env = Path(f"/proc/{lease.pid}/environ").read_bytes().split(b"\0")
    assert f"PREFECT__FLOW_RUN_ID={first.id}".encode() in holder_env, "the lease is not the epoch's"
    # A manual `train` of the same run while the epoch trains: refused before it writes anything.
    with served.api(), pytest.raises(LeaseHeld) as refused:
        train(run_config(str(served.data), RUN))
    assert lease.owner in str(refused.value) and f"host {lease.host}, pid {lease.pid}" in str(refused.value)

    assert_completed(served.wait_for(lambda: finished(served, first.id), RUN_TIMEOUT_S, "the first epoch"), served)
    assert newest_step(served) == start + LONG_EPOCH
    with served.api():
        second = submit(TRAIN_EPOCH, {"steps": SEGMENT}, wait=True)
    assert_completed(second, served)
    end = start + LONG_EPOCH + SEGMENT
    assert newest_step(served) == end

    records = read_metrics(served.run_store())
    assert [r["step"] for r in records] == list(range(1, end + 1))  # each epoch resumed, none restarted
    assert records[-1]["tokens"] == end * GLOBAL_BATCH_TOKENS
    assert read_lease(served.run_store(), LEASE_FILE) is None  # released after each job


def test_an_existing_run_continues_only_on_its_own_datasets(tmp_path):
    settings = TrainSettings.model_validate({**tiny_training(tmp_path, tmp_path / "work"), "max_steps_this_run": None})
    store = open_store(tmp_path).child(f"runs/{RUN}")
    check_same_data(settings.with_build(str(tmp_path / "a/manifest.json")))  # a new run: anything goes
    store.put_text("config.json", settings.with_build(str(tmp_path / "a/manifest.json")).to_json())
    check_same_data(settings.with_build(str(tmp_path / "a/manifest.json")))
    with pytest.raises(ValueError, match="give this training its own run name"):
        check_same_data(settings.with_build(str(tmp_path / "b/manifest.json")))


def test_a_build_submitted_with_a_run_name_trains_that_run_and_a_mismatch_is_skipped(served, finished_build):
    import subprocess
    import sys

    build_yaml = served.data.parent / "build.yaml"  # the corpus under another build name: a new build
    done = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "--data", str(served.data), "submit-build", str(build_yaml),
         "--train-run", "cli-run", "--api-url", served.api_url, "--wait"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0 and done.stdout.startswith("Completed: http"), done.stdout + done.stderr + served.log_tail()
    assert re.search(r"\d+s  build-sample › ingest-\w+: Completed\n", done.stderr), done.stderr  # --wait shows progress
    def triggered_by_it() -> list[FlowRun]:
        return [run for run in served.call(_runs_of, TRAIN_ON_BUILD) if run.parameters["build"]["name"] == "sample"]

    (triggered,) = served.wait_for(triggered_by_it, RUN_TIMEOUT_S, "the run triggered by the submitted build")
    assert triggered.parameters["train_run"] == "cli-run"
    assert_completed(served.wait_for(lambda: finished(served, triggered.id), RUN_TIMEOUT_S, "training"), served)
    new_build = served.build
    assert [d.manifest for d in run_config(str(served.data), "cli-run").data] == [manifest_uri(new_build)]

    # The same build named onto a run that trains on another build: a clear skip, not a failure.
    with served.api():
        skipped = submit(TRAIN_ON_BUILD, {"build": new_build.model_dump(mode="json"), "train_run": RUN}, wait=True)
    assert_completed(skipped, served)
    assert skipped.state.message.startswith("skipped: run ") and "give this training its own run name" in skipped.state.message

"""The deployments, served by a real `serve_main` process against the session's Prefect server.

One module fixture starts the serve process once; the tests then go in order: registration,
a build run through the API (which triggers training), a second job refused by the run's
lease, and two scheduled-style epochs that continue the run where it stopped.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelling

from deployments.deploy import BUILD, PRETRAIN, TRAIN_EPOCH, TRAIN_ON_BUILD, submit
from flows.pretrain import manifest_uri
from flows.train import train
from flows.train_epoch import run_config
from model.checkpoint import latest_checkpoint
from model.metrics import METRICS_FILE, read_metrics
from storage.lease import LeaseHeld, read_lease
from storage.store import open_object, open_store
from tasks.config import BuildConfig
from tasks.sample_corpus import make_sample_corpus

RUN = "deploy-run"
SEGMENT = 2  # steps per segment: the trained run's max_steps_this_run, and each epoch's steps
STARTUP_TIMEOUT_S = 180
RUN_TIMEOUT_S = 240


@dataclass
class Served:
    process: subprocess.Popen
    log: Path
    data: Path
    build: BuildConfig

    def run_store(self):
        return open_store(self.data).child(f"runs/{RUN}")

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


def tiny_training(data: Path, work_dir: Path) -> dict:
    """A two-layer model on 2 gloo processes: a segment of 2 steps takes seconds."""
    return {
        "name": RUN,
        "output": str(data),
        "model": "tiny",
        "model_overrides": {"n_layers": 2, "dim": 64, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 128, "max_seq_len": 64},
        "seq_len": 64,
        "global_batch_tokens": 512,
        "micro_batch": 4,
        "lr": {"max": 1e-3, "min": 1e-4, "warmup_steps": 1},
        "max_steps": 100000,
        "max_steps_this_run": SEGMENT,
        "checkpoint_every": SEGMENT,
        "keep_checkpoints": None,
        "launcher": {"kind": "torchrun", "nproc": 2},
        "work_dir": str(work_dir),
    }


def wait_for(condition, timeout_s: float, what: str, served: Served, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if served.process.poll() is not None:
            pytest.fail(f"the serve process exited ({served.process.returncode}) while waiting for {what}:\n{served.log_tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; serve log:\n{served.log_tail()}")
        time.sleep(poll_s)
    return result


async def _deployment(name: str):
    async with get_client() as client:
        return await client.read_deployment_by_name(name)


def deployment(name: str):
    return asyncio.run(_deployment(name))


async def _flow_runs(deployment_name: str) -> list[FlowRun]:
    async with get_client() as client:
        found = await client.read_deployment_by_name(deployment_name)
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])), flow_run_filter=FlowRunFilter()
        )


def flow_runs(deployment_name: str) -> list[FlowRun]:
    return asyncio.run(_flow_runs(deployment_name))


async def _read_flow_run(flow_run_id) -> FlowRun:
    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


def read_flow_run(flow_run_id) -> FlowRun:
    return asyncio.run(_read_flow_run(flow_run_id))


def assert_completed(flow_run: FlowRun, served: Served) -> None:
    assert flow_run.state.type == StateType.COMPLETED, (
        f"flow run {flow_run.name} ended {flow_run.state.name}: {flow_run.state.message}\n{served.log_tail()}"
    )


def newest_step(served: Served) -> int:
    checkpoint = latest_checkpoint(served.run_store())
    return checkpoint.step if checkpoint else 0


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("served")
    data = root / "data"
    corpus = make_sample_corpus(root / "raw", target_bytes=96 << 10, seed=5)
    build = yaml.safe_load(Path(corpus["config"]).read_text())
    build.update(output=str(data), tokenizer={"train": {"vocab_size": 320}}, dedup={"exact": True, "near": False})
    build_yaml, train_yaml = root / "build.yaml", root / "train.yaml"
    build_yaml.write_text(yaml.safe_dump(build))
    train_yaml.write_text(yaml.safe_dump(tiny_training(data, root / "work")))
    log = root / "serve.log"
    command = (
        "from pathlib import Path; from deployments.serve import serve_main; "
        f"serve_main(data_dir=Path({str(data)!r}), build_config=Path({str(build_yaml)!r}), "
        f"train_config=Path({str(train_yaml)!r}))"
    )
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", command],
            env={**os.environ, "PREFECT_API_URL": prefect_server},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    served = Served(process, log, data, BuildConfig.model_validate(build))
    try:
        for name in (BUILD, PRETRAIN, TRAIN_ON_BUILD, TRAIN_EPOCH):
            wait_for(lambda: _exists(name), STARTUP_TIMEOUT_S, f"deployment {name}", served)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _exists(name: str) -> bool:
    try:
        deployment(name)
    except Exception:  # ObjectNotFound until serve has registered it
        return False
    return True


def test_deployments_register_with_parameters_schedule_limit_and_trigger(served):
    build = deployment(BUILD)
    assert build.parameters["config"]["output"] == str(served.data)
    assert "config" in build.parameter_openapi_schema["properties"]  # the UI form

    epoch = deployment(TRAIN_EPOCH)
    assert epoch.parameters == {"run": RUN, "output": str(served.data), "steps": 50}
    assert [s.schedule.cron for s in epoch.schedules] == ["0 * * * *"]
    assert [s.active for s in epoch.schedules] == [False]  # created paused
    assert epoch.global_concurrency_limit.limit == 1

    async def automations():
        async with get_client() as client:
            on_build = await client.read_deployment_by_name(TRAIN_ON_BUILD)
            return await client.read_resource_related_automations(f"prefect.deployment.{on_build.id}")

    (trigger,) = asyncio.run(automations())
    assert trigger.enabled and trigger.trigger.expect == {"prefect.flow-run.Completed"}


def test_build_run_through_the_api_completes_and_triggers_training(served):
    config = served.build.model_copy(update={"name": "api-build"})
    run = submit(BUILD, {"config": config.model_dump(mode="json")}, wait=True)
    assert_completed(run, served)
    store, key = open_object(manifest_uri(config))
    assert store.exists(key), "the build's manifest is missing"

    # The automation starts train-on-build with that build's config; it trains the first segment.
    triggered = wait_for(lambda: flow_runs(TRAIN_ON_BUILD), 60, "the triggered train-on-build run", served)
    assert triggered[0].parameters["build"]["name"] == "api-build"
    finished = wait_for(
        lambda: (r := read_flow_run(triggered[0].id)).state.is_final() and r, RUN_TIMEOUT_S, "training", served
    )
    assert_completed(finished, served)
    assert newest_step(served) == SEGMENT
    assert [d.manifest for d in run_config(str(served.data), RUN).data] == [manifest_uri(config)]


def test_a_second_job_on_a_run_being_trained_is_refused(served):
    long_epoch = submit(TRAIN_EPOCH, {"steps": 5000})
    lease = wait_for(lambda: read_lease(served.run_store(), "lease.json"), RUN_TIMEOUT_S, "the epoch's lease", served)
    assert str(long_epoch.id) in lease.owner
    try:
        # A manual `train` beside the scheduled epoch: refused before it writes anything.
        with pytest.raises(LeaseHeld) as refused:
            train(run_config(str(served.data), RUN))
        assert f"pid {lease.pid}" in str(refused.value) and str(long_epoch.id) in str(refused.value)
    finally:
        async def cancel():
            async with get_client() as client:
                await client.set_flow_run_state(long_epoch.id, Cancelling(), force=True)

        asyncio.run(cancel())
    cancelled = wait_for(lambda: (r := read_flow_run(long_epoch.id)).state.is_final() and r, 120, "cancellation", served)
    assert cancelled.state.type == StateType.CANCELLED


def test_consecutive_epochs_continue_the_run_where_it_stopped(served):
    start = newest_step(served)
    assert start >= SEGMENT
    for epoch in (1, 2):
        run = submit(TRAIN_EPOCH, {"steps": SEGMENT}, wait=True)
        assert_completed(run, served)
        assert newest_step(served) == start + epoch * SEGMENT
    records = read_metrics(served.run_store().get_text(METRICS_FILE))
    assert [r["step"] for r in records] == list(range(1, start + 2 * SEGMENT + 1))  # resumed, never restarted
    assert records[-1]["tokens"] == (start + 2 * SEGMENT) * 512
    assert read_lease(served.run_store(), "lease.json") is None  # each epoch released it

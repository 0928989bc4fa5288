"""The train flow on a real Prefect server, 2 gloo processes under torchrun, data and run on S3."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterName, TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType

from flows.train import train
from model.checkpoint import complete_checkpoints
from model.data import DataError
from storage.store import open_store
from storage.lease import LeaseHeld, acquire_lease
from tasks.train import LEASE_FILE, latest_step, prepare_config
from tests.fixtures.prefect import log_messages_of
from tests.model.synthetic import write_synthetic_build
from tests.model.runs import START_TIMEOUT_S, metrics, short_documents_build, train_config, training_processes, wait_until

STEPS = 8


@pytest.fixture
def bucket_prefix(s3_bucket_uri) -> str:
    return f"{s3_bucket_uri}/flow-{uuid.uuid4().hex[:8]}"


def artifacts(keys: list[str]) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    return {a.key: a for a in found}


def test_train_flow_trains_checkpoints_and_reports(prefect_server, bucket_prefix, tmp_path):
    manifest = short_documents_build(f"{bucket_prefix}/data")
    held_out = short_documents_build(f"{bucket_prefix}/data", name="held-out")
    config = train_config(
        "flow-run", f"{bucket_prefix}/out", manifest, tmp_path,
        max_steps=STEPS, checkpoint_every=4, keep_checkpoints=1,
        val={"manifest": held_out, "every": 4, "batches": 2},
        launcher={"kind": "torchrun", "nproc": 2},
    )

    run_uri = train(config)

    assert run_uri == config.run_uri
    store = open_store(run_uri)
    records = metrics(run_uri)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "mfu"} <= record.keys()
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert (records[-1]["loss"] + records[-2]["loss"]) / 2 < records[0]["loss"] - 1.0  # it learns
    assert records[-1]["val_loss"] < records[3]["val_loss"]
    assert [c.step for c in complete_checkpoints(store)] == [STEPS]
    assert store.get_bytes("plots/loss.png").startswith(b"\x89PNG")
    saved = store.get_text("config.json")
    assert '"vocab_size": 512' in saved and '"output": "s3://' in saved

    found = artifacts(["flow-run-train-progress", "flow-run-train-metrics", "flow-run-loss-curve", "flow-run-train-live"])
    assert found["flow-run-train-progress"].data == 100.0
    live = found["flow-run-train-live"].data  # the live card, as the flow last edited it
    rows = re.findall(r"^\| ([\d,]+) \| ([\d.]+) \| ([\d.]*) \|", live, re.MULTILINE)
    assert [(int(s), float(loss)) for s, loss, _ in rows] == [(r["step"], round(r["loss"], 4)) for r in records
                                                              if r["step"] in (1, 4, STEPS)]  # the logged steps
    assert [(int(s), float(val)) for s, _, val in rows if val] == [(r["step"], round(r["val_loss"], 4)) for r in records
                                                                   if "val_loss" in r]
    assert f"step {STEPS} of {STEPS}" in live and f"tinyllama export-hf {run_uri} ./flow-run-hf" in live
    table = {row["metric"]: row["value"] for row in json.loads(found["flow-run-train-metrics"].data)}
    assert table["step"] == f"{STEPS:,}" and table["loss"] == f"{records[-1]['loss']:.4g}"
    assert run_uri + "/plots/loss.png" in found["flow-run-loss-curve"].data
    assert "](data:image/png;base64,iVBOR" in found["flow-run-loss-curve"].data  # the PNG itself, inline

    # The Prefect log: a line per log_every (10) steps and per checkpoint, not per step; no
    # torchrun banner, no second timestamp inside the line.
    def step_lines() -> list[str]:
        return [found[1] for m in log_messages("train-flow-run") if (found := re.search(r"model.metrics: step (\S+)", m))]

    wait_until(lambda: "8/8" in step_lines(), 30, "the last step's log line in Prefect")
    assert step_lines() == ["1/8", "4/8", "8/8"]
    messages = log_messages("train-flow-run")
    assert not [m for m in messages if "*****" in m or "OMP_NUM_THREADS" in m]
    assert not [m for m in messages if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d", m)]


def log_messages(flow_run_name: str) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))
    return log_messages_of(r.id for r in runs)


def test_datasets_with_different_tokenizers_are_refused(bucket_prefix, tmp_path):
    first = write_synthetic_build(bucket_prefix, "a", {"web": [8] * 20}, 512, seed=0, shard_tokens=100)
    second = write_synthetic_build(bucket_prefix, "b", {"web": [8] * 20}, 512, seed=0, shard_tokens=100, tokenizer="other")
    config = train_config("mixed", bucket_prefix, first, tmp_path)
    config = config.model_copy(update={"data": [*config.data, config.data[0].model_copy(update={"manifest": second})]})
    with pytest.raises(DataError, match="different tokenizers"):
        prepare_config(config)


def test_sigterm_to_tinyllama_train_stops_the_job_and_marks_its_runs_cancelled(prefect_server, bucket_prefix, tmp_path):
    """SIGTERM (or Ctrl-C) to `tinyllama train`: the task stops torchrun and its workers, the command
    marks its runs Cancelled and exits 130. (A bare process running the flow, without the CLI or
    a runner, ends Crashed: to Prefect a SIGTERM nobody asked it for is a crash.)"""
    manifest = short_documents_build(f"{bucket_prefix}/data")
    config = train_config(
        # a run name no other test of the session gives a run (its flow run is looked up by name)
        "sigterm", f"{bucket_prefix}/out", manifest, tmp_path, max_steps=100_000, launcher={"kind": "torchrun", "nproc": 2}
    )
    config_path = tmp_path / "sigterm.yaml"
    config_path.write_text(config.to_json())
    command = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "--data", str(tmp_path / "data"), "train", str(config_path)],
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_until(lambda: latest_step(config) >= 1, START_TIMEOUT_S, "the first training step")
        assert len(training_processes(config.run_uri + "/config.json")) == 3  # torchrun and 2 workers
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=60) == 130
        wait_until(lambda: not training_processes(config.run_uri + "/config.json"), 30, "training to stop")
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["train-sigterm"])))
        task_runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])))
    assert run.state.type == StateType.CANCELLED, run.state
    assert {t.name.split("-")[0]: t.state.type for t in task_runs} == {"train": StateType.CANCELLED}


def test_a_run_held_by_another_job_is_refused(prefect_server, bucket_prefix, tmp_path):
    manifest = short_documents_build(f"{bucket_prefix}/data")
    config = train_config("busy", f"{bucket_prefix}/out", manifest, tmp_path)
    with acquire_lease(open_store(config.run_uri), LEASE_FILE, owner="another trainer"):
        with pytest.raises(LeaseHeld, match="another trainer"):
            train(config)
    assert not open_store(config.run_uri).exists("config.json")  # refused before touching the run

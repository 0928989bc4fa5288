"""Faults that are not Ray's: the object store goes away mid-stage, or mid-training, and comes back.

The store layer rides out an outage itself (storage/retry.py: every call is retried with capped
backoff for up to TINYLLAMA_STORE_RETRY_S, 300 s by default), so no Prefect retry is needed:
- test_s3_restart_mid_stage_is_ridden_out stops the real S3 server mid-ingest for
  SERVER_DOWN_S (then seconds of 500s while it restarts: more than the ~10 s that Prefect's
  stage retries alone carried before);
- test_an_outage_mid_ingest_and_mid_training_is_ridden_out (slow) puts a fault-injecting proxy
  (tests/fixtures/faulty_proxy.py) between S3 and both a build (its driver and its Ray workers)
  and a training run (the flow's progress polls and both ranks' checkpoints and metrics), parks
  each at its point (mid-ingest; after step 1) until both are there, then makes the proxy refuse
  connections for 60 s and answer 503 for 60 s: one outage window, met by both at once. No step
  is lost or redone and every loss equals an uninterrupted run's.
Each build must finish byte-identical to an undisturbed one.

Covered elsewhere, not repeated here: resets, short bodies, SlowDown, access errors and the
deadline, store call by store call (tests/storage/test_retry.py); a flow process SIGKILLed
mid-stage then rerun (tests/flows/test_build_dataset.py::test_killed_flow_reruns_to_identical_output);
a Ray worker SIGKILLed inside each stage (tests/reliability/test_multinode.py); training SIGKILLed
with its torchrun tree during a checkpoint and between checkpoints, then resumed bit-exactly
(tests/model/test_kills.py).
"""

from __future__ import annotations

import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import BotoCoreError, ClientError
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

from flows.build_dataset import build_dataset
from flows.train import train
from tests.builds import assert_reconciles, build_objects, sample_config
from tests.model.runs import flow_run_logs, metrics, run_training, short_documents_build, train_config, wait_until
from tests.reliability.cluster import finish_build, start_build

SERVER_DOWN_S = 15
REFUSED_S = 60  # then as long again of 503s
TRAIN_STEPS = 8


def refuses_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def serves(client, bucket: str, key: str) -> bool:
    """Reads and writes work again (SeaweedFS answers 500 for a few seconds after a restart)."""
    try:
        client.get_object(Bucket=bucket, Key=key)["Body"].read()
        client.put_object(Bucket=bucket, Key="outage-probe", Body=b"")
        return True
    except (ClientError, BotoCoreError):
        return False


def first_key(client, bucket: str, prefix: str, part: str) -> str | None:
    """A key under `prefix` containing `part`, listed straight from the server (not through a proxy)."""
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return next((o["Key"] for o in listed if part in o["Key"]), None)


def run_counts(flow_run_ids: list) -> dict[str, int]:
    """Each task run of those flow runs, by name without its suffix: how often it ran."""
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
    return {run.name.rsplit("-", 1)[0]: run.run_count for run in task_runs}


def test_s3_restart_mid_stage_is_ridden_out(corpus, reference, s3_endpoint, s3_bucket_uri, prefect_server, ray_local):
    """The S3 server stopped mid-ingest and started again: no stage fails, none is rerun."""
    prefix = f"outage-{uuid.uuid4().hex[:8]}"
    config = sample_config(corpus, f"{s3_bucket_uri}/{prefix}")
    bucket = s3_bucket_uri.removeprefix("s3://")
    client = s3_endpoint.client()
    # The build runs on a helper thread: the S3 server must be restarted from this (long-lived)
    # thread, since it is killed when the thread that started it exits.
    with ThreadPoolExecutor(1) as pool:
        build = pool.submit(build_dataset, config, return_state=True)
        receipt = None
        deadline = time.monotonic() + 240
        while not build.done() and receipt is None and time.monotonic() < deadline:
            receipt = first_key(client, bucket, f"{prefix}/", "/receipts/ingest/")
            time.sleep(0.05)
        assert not build.done(), "the build finished before S3 could be taken away"
        down = time.monotonic()
        s3_endpoint.stop()  # SIGTERMed, the server stops answering at once
        assert refuses_connections(int(s3_endpoint.endpoint_url.rsplit(":", 1)[1]))
        time.sleep(max(0.0, SERVER_DOWN_S - (time.monotonic() - down)))
        assert not build.done(), "the build ended while S3 was down"
        s3_endpoint.start()
        wait_until(lambda: serves(client, bucket, receipt), 60, "S3 to serve again")
        outage_s = time.monotonic() - down
        state = build.result(timeout=300)
    assert state.is_completed(), f"S3 was down {outage_s:.1f} s: {state.message}"
    reruns = {name: count for name, count in run_counts([state.state_details.flow_run_id]).items() if count > 1}
    assert reruns == {}  # the store rode the outage out: no stage was rerun by Prefect
    assert_reconciles(state.result(), corpus)
    assert build_objects(config.output, receipts=False) == reference


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_an_outage_mid_ingest_and_mid_training_is_ridden_out(corpus, reference, s3_bucket_uri, prefect_server, faulty_s3, tmp_path):
    """Two minutes without S3 (60 s refused, then 60 s of 503s) met at once by a build mid-ingest
    (its driver and Ray workers) and by 2 ranks mid-training (and the flow polling their progress):
    the build finishes with the undisturbed build's bytes, no stage retried by Prefect; the training
    job is neither stopped nor retried, no step is lost or redone, the losses are exact."""
    unique = uuid.uuid4().hex[:8]
    build = sample_config(corpus, f"{s3_bucket_uri}/proxied-{unique}")
    prefix = f"{s3_bucket_uri}/train-outage-{unique}"
    manifest = short_documents_build(f"{prefix}/data")
    launcher = {"kind": "torchrun", "nproc": 2}
    straight = train_config("straight", f"{prefix}/straight", manifest, tmp_path, max_steps=TRAIN_STEPS, launcher=launcher)
    config = train_config(f"through-outage-{unique}", f"{prefix}/out", manifest, tmp_path, max_steps=TRAIN_STEPS,
                          launcher=launcher)  # a name of its own: its flow run's logs are this run's only
    build_keys = f"/proxied-{unique}/"
    run_keys = f"/train-outage-{unique}/out/runs/{config.name}/"
    # Each side is parked at its point until both are there: the build at its first ingest receipt
    # (mid-ingest), the training at rank 0's first progress record (after step 1, before the
    # checkpoints of steps 2, 4, ...). One outage window then meets both.
    build_parked = faulty_s3.hold("/receipts/ingest/", methods=("PUT",))
    training_parked = faulty_s3.hold(f"{run_keys}progress.json", methods=("PUT",))

    started = time.time()
    # Its own process and its own local Ray, whose workers inherit AWS_ENDPOINT_URL: the proxy.
    process = start_build(build, tmp_path, prefect_server, ray_address=None)
    run_training(straight, nproc=2)  # the undisturbed losses, while the build starts
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(train, config, return_state=True)
        try:
            wait_until(lambda: process.poll() is not None or job.done() or (
                build_parked.reached.is_set() and training_parked.reached.is_set()), 300, "the build and the training")
            assert process.poll() is None and not job.done(), "the build or the training ended before the outage"
            faulty_s3.inject("refuse", duration=REFUSED_S)
            faulty_s3.inject("503", duration=REFUSED_S, after=REFUSED_S)
        finally:
            faulty_s3.release()  # into the outage; or, if the wait failed, so that the job can end
        manifest_uri = finish_build(process, timeout=900)
        state = job.result(timeout=900)
    assert faulty_s3.injected["refuse"] == 1
    for keys in (build_keys, run_keys):  # each side was refused (its parked request) and then answered 503s
        assert {"refuse", "503"} <= {seen.fault for seen in faulty_s3.requests if keys in seen.path}, keys

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"build-{build.name}"])))
    [this] = [run for run in runs if run.start_time and run.start_time.timestamp() >= started]
    counts = run_counts([this.id])
    assert "ingest" in counts and set(counts.values()) == {1}, counts  # no Prefect retry was needed
    assert_reconciles(manifest_uri, corpus)
    assert build_objects(build.output, receipts=False) == reference

    assert state.is_completed(), state.message
    assert run_counts([state.state_details.flow_run_id])["train"] == 1  # not stopped, not retried
    records = metrics(config.run_uri)
    assert [r["step"] for r in records] == list(range(1, TRAIN_STEPS + 1))  # no step lost or redone
    assert [r["loss"] for r in records] == [r["loss"] for r in metrics(straight.run_uri)]
    logs = flow_run_logs(f"train-{config.name}")
    assert logs.count("training progress not updated (the job goes on)") == 1  # once, not per poll

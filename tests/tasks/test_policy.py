"""The pipeline's policies, each on the real path: which failures a stage retries, a rerun of a
build whose inputs changed, a build whose accounting does not reconcile, and train-epoch on a
finished run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from prefect.runtime import task_run

from flows.build_dataset import build_dataset
from flows.train_epoch import train_epoch
from model.checkpoint import complete_checkpoints
from model.data import BlockLoader, DataError
from storage import build_layout as layout
from storage.lease import LeaseHeld, acquire_lease
from storage.manifest import Receipt, read_record, write_record
from storage.run_layout import RunLayout
from storage.store import StoreAccessError, StoreError, open_object, open_store
from tasks.config import BuildConfig
from tasks.plan import PlanError
from tasks.publish import AccountingError
from tasks.stage import STAGE_RETRIES, stage_task
from tests.fixtures.prefect import log_messages_of
from tests.builds import build_objects, tiny_config, tiny_corpus
from tests.fixtures.ports import free_port
from tests.model.runs import STEPS, short_documents_build, train_config, wait_until

pytestmark = pytest.mark.usefixtures("prefect_server")


# --- retries are for transient failures only -------------------------------------------------


def run_stage_task(work) -> tuple[list[int], object]:
    """`work` as a stage's Prefect task (its retry policy, without the delay); returns the attempts
    it made (Prefect's run count at each) and its final state."""
    attempts: list[int] = []

    @stage_task("policy-probe")
    def probe():
        attempts.append(task_run.run_count)
        return work(len(attempts))

    state = probe.with_options(retry_delay_seconds=0)(return_state=True)
    return attempts, state


def bad_config(_attempt):
    return BuildConfig.model_validate({"name": "b", "sources": [{"name": "web", "uri": "x/*.jsonl", "format": "jsonl", "txt": 1}]})


def bad_loader_setting(_attempt):
    return BlockLoader([], seq_len=0, seed=0, cache_dir="unused")


@pytest.mark.parametrize(("work", "error"), [(bad_config, ValueError), (bad_loader_setting, DataError)], ids=["config", "data"])
def test_bad_input_fails_on_its_first_attempt(work, error):
    attempts, state = run_stage_task(work)
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), error)
    assert attempts == [1]


def test_a_held_lease_or_a_denied_store_fails_on_its_first_attempt(s3_bucket_uri, tmp_path, monkeypatch):
    store = open_store(str(tmp_path / "store"))
    with acquire_lease(store, "runs/r/lease.json", owner="another job"):
        attempts, state = run_stage_task(lambda _: acquire_lease(store, "runs/r/lease.json", owner="this job"))
    assert isinstance(state.result(raise_on_failure=False), LeaseHeld) and attempts == [1]

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    attempts, state = run_stage_task(lambda _: open_store(s3_bucket_uri).get_bytes("anything"))
    assert isinstance(state.result(raise_on_failure=False), StoreAccessError) and attempts == [1]


def test_a_store_outage_is_retried_until_the_store_answers(s3_bucket_uri, monkeypatch):
    store = open_store(f"{s3_bucket_uri}/policy")
    store.put_bytes("object", b"here")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    def read_through_an_outage(attempt: int) -> bytes:
        with monkeypatch.context() as outage:
            if attempt < 3:  # the store is down for the first two attempts
                outage.setenv("AWS_ENDPOINT_URL", endpoint)
                outage.setenv("AWS_MAX_ATTEMPTS", "1")
                outage.setenv("TINYLLAMA_STORE_RETRY_S", "1")  # the store's own retries give up: Prefect's take over
            return store.get_bytes("object")

    attempts, state = run_stage_task(read_through_an_outage)
    assert state.is_completed() and state.result() == b"here"
    assert attempts == [1, 2, 3] == list(range(1, STAGE_RETRIES + 2))

    attempts, state = run_stage_task(lambda _: read_through_an_outage(1))  # an outage that outlasts the retries
    error = state.result(raise_on_failure=False)
    assert type(error) is StoreError and "unreachable" in str(error) and attempts == [1, 2, 3]


# --- builds: inputs pinned by the plan, accounting that must reconcile -------------------------


@pytest.fixture
def tiny_build(tmp_path, ray_local) -> tuple[BuildConfig, str]:
    """A finished build of 2 small jsonl files (no near dedup: the policies below come after it)."""
    raw = tiny_corpus(tmp_path / "raw", files=2, docs_per_file=20, seed=3)
    config = tiny_config(f"{raw}/*.jsonl", str(tmp_path / "out"), dedup={"exact": True, "near": False})
    return config, build_dataset(config)


def test_a_rerun_of_a_build_whose_input_changed_is_refused_naming_the_file(tiny_build, tmp_path):
    config, _ = tiny_build
    before = build_objects(config.output)
    changed = tmp_path / "raw" / "part-00001.jsonl"
    with changed.open("a") as f:
        f.write('{"text": "a document added after the build"}\n')
    with pytest.raises(PlanError) as refused:
        build_dataset(config)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"the input {open_object(str(changed))[0].url(changed.name)} changed (size ")
    assert "build_id" in message  # how to build from the inputs as they are now
    assert build_objects(config.output) == before  # the old build stays as it was


def test_a_build_whose_counts_do_not_reconcile_fails_naming_the_receipts_and_publishes_no_manifest(tiny_build):
    """A document counted twice: one ingest receipt says one more document came in than it wrote,
    filtered or quarantined (rewritten, and sealed with its checksum, before the manifest step, as a
    faulty stage would). The error names the source and that receipt first."""
    config, manifest_uri = tiny_build
    build, _ = open_object(manifest_uri)  # the build folder
    build.delete(layout.MANIFEST)
    key = list(build.list(layout.receipts("ingest")))[-1]
    receipt = read_record(build, key, Receipt)
    web = receipt.sources["web"]
    wrong = {"web": web.model_copy(update={"docs_in": web.docs_in + 1})}
    write_record(build, key, receipt.model_copy(update={"sources": wrong}).sealed())

    with pytest.raises(AccountingError) as failed:
        build_dataset(config)
    message = str(failed.value)
    assert "\n" not in message and message.startswith("source 'web' does not reconcile: ")
    total_in = sum(read_record(build, k, Receipt).sources["web"].docs_in for k in build.list(layout.receipts("ingest")))
    assert f"'docs_in': {total_in}," in message
    assert f"counted by {build.url(key)}, " in message and "(1 of them do not add up on their own)" in message
    assert not build.exists(layout.MANIFEST)


# --- train-epoch leaves a finished run alone ------------------------------------------------------


def test_train_epoch_leaves_a_run_at_max_steps_alone(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    output = str(tmp_path / "store")
    config = train_config("finished", output, short_documents_build(output), tmp_path)
    config_uri = RunLayout.of(output, config.name).write_config(config.to_json())
    subprocess.run([sys.executable, "-m", "model.train", config_uri], check=True, capture_output=True, timeout=300)
    run = RunLayout.of(output, config.name).store
    assert complete_checkpoints(run)[0].step == STEPS
    before = {key: run.get_bytes(key) for key in run.list()}

    state = train_epoch(config.name, output, steps=10, return_state=True)
    assert state.is_completed() and state.result() == config.run_uri
    assert {key: run.get_bytes(key) for key in run.list()} == before  # no checkpoint, no metrics, no config rewritten
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        launched = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"train-{config.name}"])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert launched == [] and task_runs == []  # no train flow, so no training task and no torchrun

    def said_so() -> bool:
        APILogHandler().flush()  # logs reach the API in batches
        return any(f"run {config.run_uri} is complete (step {STEPS} of {STEPS}): nothing to train" in message
                   for message in log_messages_of([flow_run_id]))

    wait_until(said_so, 30, "the flow run's log line")

"""Credentials stay out of everything a build leaves behind; config names cannot escape the root.

The planted secret is the S3 server's secret key, which reaches the build only through the
environment (AWS_SECRET_ACCESS_KEY). Checkpoint loading refusing pickled code is tested in
tests/reliability/test_pickle_payloads.py (crafted DCP metadata) and tests/model/test_checkpoint.py
(weights_only values).
"""

from __future__ import annotations

import logging
import re
import traceback
import uuid

import httpx
import pytest
from pydantic import ValidationError

from flows.build_dataset import build_dataset
from model.train_config import TrainConfig
from storage.store import NO_CREDENTIALS_PATTERN, InvalidKey, StoreAccessError, check_uri_has_no_credentials, open_store
from tasks.train import run_config
from tests.builds import sample_config

pytestmark = pytest.mark.usefixtures("prefect_server", "ray_local")

# A small valid training config; each test sets name, output and data.
TRAIN_FIELDS = {
    "model": "tiny",
    "seq_len": 64,
    "global_batch_tokens": 512,
    "micro_batch": 8,
    "lr": {"max": 1e-3, "min": 1e-4, "warmup_steps": 1},
    "max_steps": 4,
    "checkpoint_every": 2,
    "launcher": {"kind": "torchrun", "nproc": 1},
}


def prefect_api_responses(api_url: str, flow_run_id: str) -> list[httpx.Response]:
    """What the Prefect UI reads about a flow run: the run (its parameters), task runs, artifacts, logs."""
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the API in batches
    by_run = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    with httpx.Client(base_url=api_url, timeout=30) as api:
        responses = [
            api.get(f"/flow_runs/{flow_run_id}"),
            api.post("/task_runs/filter", json=by_run),
            api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}),
            api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}}),
        ]
    for response in responses:
        response.raise_for_status()
    return responses


def ray_log_bytes(tmp_path_factory) -> bytes:
    """Every log file of this session's Ray (tests/fixtures/ray.py): the driver's, the workers' and Ray's own."""
    sessions = {p.resolve() for p in tmp_path_factory.getbasetemp().glob("ray*/session_latest/logs")}
    files = [f for logs in sessions for f in logs.rglob("*") if f.is_file()]
    assert any(f.name.startswith("python-core-worker-") for f in files)  # the workers' logs are there
    return b"".join(f.read_bytes() for f in files)


def test_the_secret_key_appears_in_no_log_artifact_object_or_api_response(
    corpus, s3_endpoint, s3_bucket_uri, prefect_server, caplog, tmp_path_factory
):
    secret = s3_endpoint.secret_key
    caplog.set_level(logging.INFO)
    config = sample_config(corpus, f"{s3_bucket_uri}/secure-{uuid.uuid4().hex[:8]}")
    state = build_dataset(config, return_state=True)
    assert state.is_completed()
    store = open_store(config.output)
    keys = store.list()
    assert any(k.endswith("manifest.json") for k in keys)
    for key in keys:
        assert secret.encode() not in store.get_bytes(key), key
    assert caplog.text and secret not in caplog.text
    responses = prefect_api_responses(prefect_server, str(state.state_details.flow_run_id))
    assert len(responses[2].json()) >= 3 and len(responses[3].json()) >= 3  # artifacts and logs were read
    assert config.name in responses[0].text  # the parameters are there
    assert not [r.request.url for r in responses if secret in r.text]
    assert secret.encode() not in ray_log_bytes(tmp_path_factory)  # the workers that read and wrote S3


def test_a_uri_holding_credentials_is_refused_by_config_validation(corpus, s3_endpoint, s3_bucket_uri, tmp_path):
    """Refused while the config is read, so no flow run (and no Prefect database row) ever holds it."""
    secret, bucket = s3_endpoint.secret_key, s3_bucket_uri.removeprefix("s3://")
    signed = f"X-Amz-Credential={s3_endpoint.access_key}%2F20260101&X-Amz-Signature={secret}"
    for uri in [f"s3://{s3_endpoint.access_key}:{secret}@{bucket}/out", f"{s3_bucket_uri}/out/m.model?{signed}"]:
        sources = [s.model_dump(mode="json") for s in sample_config(corpus, str(tmp_path)).sources]
        sources[0]["uri"] = uri
        build_fields = [{"output": uri}, {"tokenizer": {"model": uri}}, {"sources": sources}]
        train_fields = [{"output": uri}, {"data": [{"manifest": uri}]}]
        attempts = [lambda f=f: sample_config(corpus, **{"output": str(tmp_path), **f}) for f in build_fields] + [
            lambda f=f: TrainConfig.model_validate(
                {**TRAIN_FIELDS, "name": "r", "output": str(tmp_path), "data": [{"manifest": "m.json"}], **f}
            )
            for f in train_fields
        ]
        for attempt in attempts:
            with pytest.raises(ValidationError) as refused:
                attempt()
            text = "".join(traceback.format_exception(refused.value))
            assert "AWS environment" in text and secret not in text and s3_endpoint.access_key not in text


def test_a_build_with_wrong_credentials_fails_without_echoing_them(
    corpus, s3_endpoint, s3_bucket_uri, prefect_server, monkeypatch, caplog, tmp_path_factory
):
    """The store's refusal itself (not any error naming the output), on the first attempt, naming
    what to fix; neither the wrong secret nor the real one in the error, the logs (this process's,
    Prefect's, Ray's) or the API."""
    real, wrong = s3_endpoint.secret_key, "planted-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    caplog.set_level(logging.INFO)
    output = f"{s3_bucket_uri}/out-{uuid.uuid4().hex[:8]}"
    state = build_dataset(sample_config(corpus, output), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert type(error) is StoreAccessError
    # the S3 error codes of a request signed with a wrong key (storage/s3.py maps them)
    assert re.fullmatch(
        rf"access denied: cannot \w+ {re.escape(output)}/\S+ \((AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch)\); "
        r"check the AWS credentials .*", str(error)
    ), str(error)
    responses = prefect_api_responses(prefect_server, str(state.state_details.flow_run_id))
    (plan_run,) = [r for r in responses[1].json() if r["name"].startswith("plan")]
    assert plan_run["run_count"] == 1 and plan_run["state"]["type"] == "FAILED"  # not retried
    assert "access denied" in responses[3].text  # the failure is in the run's log
    text = "".join(traceback.format_exception(error)) + caplog.text + "".join(r.text for r in responses)
    ray_logs = ray_log_bytes(tmp_path_factory)
    for secret in (wrong, real):
        assert secret not in text and secret.encode() not in ray_logs


@pytest.mark.parametrize(
    "uri",
    ["s3://b/out", "./data", "/a/b@c", "s3://b/a@b", "a/b?secret=1", "s3://k:s@b/o", "S3://K@B", "file:///x?Password=1",
     "s3://b/m?X-AMZ-SIGNATURE=1", "s3://b/m?a=1&my_Token=2", "s3://b/m?AWSAccessKeyId=k", "s3://b/m?version=2"],
)
def test_the_schema_pattern_refuses_exactly_what_config_validation_refuses(uri):
    try:
        check_uri_has_no_credentials(uri)
        valid = True
    except ValueError:
        valid = False
    assert (re.search(NO_CREDENTIALS_PATTERN, uri) is not None) == valid


def test_a_deployment_run_with_credentials_in_a_uri_is_refused_by_the_prefect_server(corpus, s3_endpoint, s3_bucket_uri, tmp_path):
    """A run started from the UI or the API: the server checks its parameters against the flow's
    schema (the URI fields' pattern) before storing them, so no flow run ever holds the secret."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    from flows.pretrain import pretrain
    from flows.train_epoch import train_epoch

    secret, bucket = s3_endpoint.secret_key, s3_bucket_uri.removeprefix("s3://")
    in_authority = f"s3://{s3_endpoint.access_key}:{secret}@{bucket}/out"
    signed = f"{s3_bucket_uri}/out/manifest.json?X-Amz-Credential=k&X-Amz-Signature={secret}"
    build = sample_config(corpus, str(tmp_path)).model_dump(mode="json")
    train = {**TRAIN_FIELDS, "name": "r", "output": str(tmp_path), "data": [{"manifest": f"{s3_bucket_uri}/m.json"}]}
    cases = [  # a flow, parameters it accepts, and the same with credentials in a URI
        (build_dataset, {"config": build}, [{"config": {**build, "output": in_authority}},
                                             {"config": {**build, "tokenizer": {"model": signed}}}]),
        (pretrain, {"build": build, "train": train}, [{"build": build, "train": {**train, "output": signed}},
                                                       {"build": build, "train": {**train, "data": [{"manifest": in_authority}]}}]),
        (train_epoch, {"run": "r", "output": str(tmp_path)}, [{"run": "r", "output": in_authority}]),
    ]
    with get_client(sync_client=True) as client:
        for flow, accepted, refused_parameters in cases:
            deployment_id = flow.to_deployment("credentials-check").apply()
            client.delete_flow_run(client.create_flow_run_from_deployment(deployment_id, parameters=accepted).id)
            for parameters in refused_parameters:
                with pytest.raises(PrefectHTTPStatusError) as refused:
                    client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
                # (the 409's detail quotes the value back to whoever sent it; nothing is stored)
                assert refused.value.response.status_code == 409 and "does not match" in refused.value.response.text
            by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            assert client.read_flow_runs(deployment_filter=by_deployment) == []


@pytest.mark.parametrize("name", [".", "..", "a/b"])
@pytest.mark.parametrize("field", ["name", "build_id"])
def test_a_folder_name_of_dots_or_with_a_slash_fails_config_validation(corpus, tmp_path, field, name):
    with pytest.raises(ValidationError, match=field):
        sample_config(corpus, str(tmp_path), **{field: name})


@pytest.mark.parametrize("field", ["name", "build_id"])
def test_a_config_name_cannot_escape_the_store_root(corpus, tmp_path, field):
    output = tmp_path / "root" / "out"
    with pytest.raises((InvalidKey, ValidationError), match=r"\.\."):
        build_dataset(sample_config(corpus, str(output), **{field: ".."}))
    assert not (tmp_path / "root").exists() or not any(p.name == "plan.json" for p in (tmp_path / "root").rglob("*"))


def test_builds_and_runs_refuse_a_symlink_out_of_the_output_root(corpus, tmp_path):
    outside, output = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    (output / "datasets").mkdir(parents=True)
    (output / "runs").mkdir()
    (output / "datasets" / "sample").symlink_to(outside, target_is_directory=True)
    (output / "runs" / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidKey, match="outside the store root"):
        build_dataset(sample_config(corpus, str(output)))
    run = TrainConfig.model_validate(
        {**TRAIN_FIELDS, "name": "escape", "output": str(output), "data": [{"manifest": str(tmp_path / "m.json")}]}
    )
    with pytest.raises(InvalidKey, match="outside the store root"):
        run.run_uri
    with pytest.raises(InvalidKey, match="outside the store root"):
        run_config(str(output), "escape")
    assert list(outside.iterdir()) == []


def test_a_source_name_with_a_path_is_rejected(corpus, tmp_path):
    config = sample_config(corpus, str(tmp_path / "out"))
    sources = [s.model_dump(mode="json") for s in config.sources]
    sources[0]["name"] = "../../escape"
    with pytest.raises(ValidationError, match="name"):
        sample_config(corpus, str(tmp_path / "out"), sources=sources)

"""Faults that are not Ray's: the object store goes away mid-stage and comes back.

Covered elsewhere, not repeated here: the flow process SIGKILLed mid-stage then rerun
(tests/flows/test_build_dataset.py::test_killed_flow_reruns_to_identical_output); training
SIGKILLed between checkpoints and resumed bit-exactly (tests/model/test_train.py), and a
checkpoint cut off during its write (files but no COMMIT) being ignored
(tests/model/test_checkpoint.py::test_checkpoints_without_commit_or_with_missing_files_are_ignored).
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from flows.build_dataset import build_dataset
from tests.builds import assert_reconciles, build_objects, sample_config

pytestmark = pytest.mark.usefixtures("prefect_server", "ray_local")
OUTAGE_S = 3


def test_s3_outage_mid_stage_is_ridden_out(corpus, reference, s3_endpoint, s3_bucket_uri):
    """botocore's retries, then the stage's Prefect retries (receipts keep finished shards)
    carry the build over a stop-and-restart of the S3 server."""
    prefix = f"outage-{uuid.uuid4().hex[:8]}"
    config = sample_config(corpus, f"{s3_bucket_uri}/{prefix}")
    bucket = s3_bucket_uri.removeprefix("s3://")
    client = s3_endpoint.client()
    # The build runs on a helper thread: the S3 server must be restarted from this (long-lived)
    # thread, since it is killed when the thread that started it exits.
    with ThreadPoolExecutor(1) as pool:
        build = pool.submit(build_dataset, config)
        deadline = time.monotonic() + 240
        while not build.done() and time.monotonic() < deadline:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
            if any("/receipts/ingest/" in o["Key"] for o in listed.get("Contents", [])):
                break
            time.sleep(0.05)
        assert not build.done(), "the build finished before S3 could be taken away"
        stopped = time.monotonic()
        s3_endpoint.stop()
        time.sleep(OUTAGE_S)
        s3_endpoint.start()
        assert time.monotonic() - stopped >= OUTAGE_S
        manifest_uri = build.result(timeout=300)
    assert_reconciles(manifest_uri, corpus)
    assert build_objects(config.output, receipts=False) == reference

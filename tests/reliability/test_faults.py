"""Faults that are not Ray's: the object store goes away mid-stage and comes back.

Covered elsewhere, not repeated here: the flow process SIGKILLed mid-stage then rerun
(tests/flows/test_build_dataset.py::test_killed_flow_reruns_to_identical_output); training
SIGKILLed between checkpoints and resumed bit-exactly (tests/model/test_train.py), and a
checkpoint cut off during its write (files but no COMMIT) being ignored
(tests/model/test_checkpoint.py::test_checkpoints_without_commit_or_with_missing_files_are_ignored).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from flows.build_dataset import build_dataset
from tests.reliability.conftest import assert_reconciles, build_outputs, sample_config

pytestmark = pytest.mark.usefixtures("prefect_server", "ray_local")
OUTAGE_S = 4


def test_s3_outage_mid_stage_is_ridden_out(corpus, reference, s3_endpoint, s3_bucket_uri):
    prefix = f"outage-{uuid.uuid4().hex[:8]}"
    config = sample_config(corpus, f"{s3_bucket_uri}/{prefix}")
    bucket = s3_bucket_uri.removeprefix("s3://")
    client = s3_endpoint.client()
    outage: dict[str, float] = {}

    def take_s3_away_once_ingest_commits() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
            if any("/receipts/ingest/" in o["Key"] for o in listed.get("Contents", [])):
                break
            time.sleep(0.05)
        outage["stopped"] = time.monotonic()
        s3_endpoint.stop()
        time.sleep(OUTAGE_S)
        s3_endpoint.start()
        outage["restarted"] = time.monotonic()

    saboteur = threading.Thread(target=take_s3_away_once_ingest_commits)
    saboteur.start()
    try:
        manifest_uri = build_dataset(config)
    finally:
        saboteur.join()
    assert outage["restarted"] - outage["stopped"] >= OUTAGE_S
    assert_reconciles(manifest_uri, corpus)
    assert build_outputs(config.output) == reference

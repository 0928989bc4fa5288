"""Shared fixtures: real services, started once per session.

- `s3_endpoint` / `s3_bucket_uri` (tests/fixtures/s3.py): a SeaweedFS `weed mini` S3 server.
- `prefect_server` (tests/fixtures/prefect.py): Prefect's test harness on a temp SQLite database.
- `ray_local` (tests/fixtures/ray.py): one local Ray with 2 CPUs.
- `faulty_s3` (tests/fixtures/faulty_proxy.py): a fault-injecting proxy in front of that S3 server,
  AWS_ENDPOINT_URL pointing at it for the test.
- `store_uri` / `store`: parametrized over a local folder and an S3 prefix; a fresh root per test.

Under pytest-xdist (`-n 2 --dist loadfile`, docs/testing.md) each worker is a session of its own, with
its own servers on free ports and its own folders, and a file's tests stay on one worker.
"""

from __future__ import annotations

import uuid

import pytest

from storage.store import open_store

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.prefect", "tests.fixtures.ray", "tests.fixtures.faulty_proxy"]


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    bucket_uri = request.getfixturevalue("s3_bucket_uri")
    return f"{bucket_uri}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store(store_uri):
    return open_store(store_uri)

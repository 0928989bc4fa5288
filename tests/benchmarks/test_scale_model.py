"""benchmarks/scale_model.py: the exponent fit, and the whole scale model at a tiny size on the
SeaweedFS fixture (every stage's requests, bytes and objects counted in the driver and in the
Ray workers). No timings are asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.scale_model import COSTS, FLAG_EXPONENT, exponent, fits, flagged
from storage.store import open_store


def test_the_exponent_of_a_square_is_two_and_flagged():
    xs = [1e4, 3e4, 1e5, 1e6]
    assert exponent(xs, [x**2 for x in xs]) == pytest.approx(2.0)
    assert exponent(xs, [5 * x for x in xs]) == pytest.approx(1.0)
    assert exponent(xs, [7.0] * 4) == pytest.approx(0.0)
    assert exponent([10], [100]) is None  # one point fits nothing
    points = [{"documents": x, "stages": {"ingest": {c: 3 * x for c in COSTS}, "verify": {c: x**2 for c in COSTS}}} for x in xs]
    exponents = fits(points, "documents")
    assert exponents["ingest"]["requests"] == pytest.approx(1.0)
    assert exponents["verify"]["requests"] == pytest.approx(2.0)
    assert exponents["total"]["cpu_s"] > FLAG_EXPONENT  # the sum of x and x^2 grows faster than x
    assert "verify requests 2.00" in flagged(exponents)
    assert not [f for f in flagged(exponents) if f.startswith("ingest")]


@pytest.mark.slow
def test_the_scale_model_counts_every_stage_at_a_tiny_size(s3_bucket_uri, prefect_server, tmp_path):
    out = tmp_path / "scale_model.json"
    subprocess.run(
        [
            sys.executable, "-m", "benchmarks.scale_model", "--docs", "400,800", "--docs-per-file", "200",
            "--budgets", "", "--files", "", "--budget", "256K", "--s3", f"{s3_bucket_uri}/scale-model", "--out", str(out),
        ],
        check=True,
        env={**os.environ, "PREFECT_API_URL": prefect_server},  # the session's server: no Prefect start per build
    )
    results = json.loads(out.read_text())
    points = results["documents"]
    assert [p["files"] for p in points] == [2, 4]
    for point in points:
        stages = point["stages"]
        assert list(stages) == ["plan", "ingest", "exact-dedup", "near-dedup", "tokenizer", "tokenize", "manifest"]
        ingest, tokenize = stages["ingest"], stages["tokenize"]
        # Ray workers' requests are counted: the ingest tasks read every input file, write its docs
        assert ingest["ray_tasks"] == {"ingest": point["files"]}
        assert ingest["requests_by_operation"]["GetObject"] >= point["files"]
        assert ingest["bytes_read"] > point["text_bytes"]  # jsonl around every text
        assert all(s["requests"] > 0 and s["deterministic"] for s in stages.values())
        # every token shard was written by a counted request (a worker's), with its bytes
        tokens = [o for o in open_store(point["output"]).list_info("datasets/") if "/tokens/" in o.key]
        assert len(tokens) == 2 * point["token_shards"]  # .bin + .idx
        assert tokenize["objects_written"] >= len(tokens) + point["files"]  # and a receipt per file
        assert tokenize["bytes_written"] >= sum(o.size for o in tokens)
        assert stages["manifest"]["driver_peak_mib"] > 100  # Python, Prefect and Ray at least
    exponents = results["exponents"]["documents"]
    assert exponents["ingest"]["objects_written"] == pytest.approx(1.0, abs=0.2)  # a docs shard and a receipt per file

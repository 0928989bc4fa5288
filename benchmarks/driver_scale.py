"""The stage runner's driver at the full object counts: its memory per item, and a rerun's cost.

    .venv/bin/python -m benchmarks.driver_scale [--items 600,6000,60000] [--outputs 1,4]
        [--s3 s3://bucket/prefix] [--out benchmarks/results/driver_scale.json]
    .venv/bin/python -m benchmarks.driver_scale --report benchmarks/results/driver_scale.json

The real runner (tasks.fanout.run_stage on the local Ray, every core) on a stage of N items
whose work is trivial but writes what a per-file stage writes: `--outputs` tiny objects per item
(1 as ingest's docs shard, 4 as tokenize's token files), under one prefix, on S3 (`--s3`, or a
SeaweedFS server started here). Each point is two child processes, so each driver starts fresh:

1. the first run: every item a Ray task, its outputs, its commit and receipt, then the summary;
2. a rerun of the finished stage (nothing to redo): its receipts listed, its summary read and
   checked, its outputs listed and compared with the summary's.

For each: the driver's wall seconds, its peak RSS over its RSS before the run (VmHWM reset at the
start; a warm-up stage of 20 items ran first, so imports and Ray's start are not counted), its
Python allocations' peak (tracemalloc) and Arrow's pool peak, and its S3 requests by operation
(botocore's before-send hook on the driver's client; Ray workers are other processes). Each
cost's exponent against N is fitted on log-log axes (numpy polyfit), as benchmarks.scale_model does.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

from benchmarks.scale import reset_peak_rss, rss_mib, s3_bucket
from benchmarks.scale_model import S3Traffic, exponent, request_classes, traffic_since

WARM_UP_ITEMS = 20
COSTS = ("wall_s", "peak_growth_mib", "python_peak_mib", "arrow_peak_mib", "requests")


def write_outputs(store, outputs: int, item: int):
    """A per-file stage's work, without the work: `outputs` 16-byte objects, then what it wrote."""
    from storage.manifest import ObjectInfo, ShardResult
    from tasks.stage_counts import TokenizeCounts

    written = []
    for part in range(outputs):
        key = f"out/{item:06d}-{part:04d}.bin"
        store.put_bytes(key, b"0123456789abcdef")
        written.append(ObjectInfo(key=key, size=16, sha256="0" * 64))
    return ShardResult(outputs=written, counts=TokenizeCounts(documents=item, tokens=2 * item))


def stage_of(store, name: str, items: int, outputs: int):
    from tasks.stage import Stage

    return Stage(name, list(range(items)), lambda i: f"{i:06d}", functools.partial(write_outputs, store, outputs), ("out/",))


def run_one(root: str, items: int, outputs: int) -> None:
    """One run of the measured stage at `root` (a first run or a rerun, by what is there); prints JSON."""
    import pyarrow as pa

    from storage.store import open_store
    from tasks.fanout import ensure_ray, run_stage

    store = open_store(root)
    ensure_ray()
    warm_up = open_store(f"{root}-warm-up")
    for _ in range(2):  # a first run and a rerun: every code path imported and warm
        run_stage(warm_up, stage_of(warm_up, "measured", WARM_UP_ITEMS, outputs))
    stage = stage_of(store, "measured", items, outputs)
    traffic = S3Traffic.in_this_process()
    before, start_mib, arrow_before = traffic.snapshot(), reset_peak_rss(), pa.default_memory_pool().bytes_allocated()
    tracemalloc.start()
    started = time.perf_counter()
    summary = run_stage(store, stage)
    wall = time.perf_counter() - started
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(summary) == items
    requests = traffic_since(before, traffic.snapshot())["requests"]
    print(json.dumps({
        "wall_s": wall, "start_mib": start_mib, "peak_growth_mib": rss_mib("VmHWM") - start_mib,
        "python_peak_mib": python_peak / 2**20,
        "arrow_peak_mib": (pa.default_memory_pool().max_memory() - arrow_before) / 2**20,
        "requests": sum(requests.values()), "requests_by_operation": dict(sorted(requests.items())),
        "request_classes": request_classes(requests),
    }))


def measure_point(s3_uri: str, items: int, outputs: int) -> dict:
    root = f"{s3_uri.rstrip('/')}/driver-{uuid.uuid4().hex[:8]}"
    point = {"items": items, "outputs": outputs, "objects": items * (outputs + 1)}
    for run in ("first", "rerun"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.driver_scale", "--one", root, str(items), str(outputs)],
            stdout=subprocess.PIPE, text=True, check=True,  # the child's stderr shows, so a failure names its cause
        ).stdout
        point[run] = json.loads(out.strip().splitlines()[-1])
        print(f"{items} items x {outputs} outputs, {run}: {json.dumps(point[run])}", file=sys.stderr, flush=True)
    return point


def fitted(points: list[dict]) -> dict:
    """Per outputs per item, per run, each cost's exponent against items."""
    fits = {}
    for outputs in sorted({p["outputs"] for p in points}):
        line = [p for p in points if p["outputs"] == outputs]
        fits[str(outputs)] = {
            run: {cost: exponent([p["items"] for p in line], [p[run][cost] for p in line]) for cost in COSTS}
            for run in ("first", "rerun")
        }
    return fits


def report(results: dict) -> str:
    points, fits = results["points"], results["exponents"]
    lines = [
        "| outputs per item | run | cost | " + " | ".join(f"{n:,} items" for n in sorted({p['items'] for p in points}))
        + " | exponent |",
        "| --- | --- | --- |" + " ---: |" * (len({p["items"] for p in points}) + 1),
    ]
    for outputs, runs in fits.items():
        line = sorted((p for p in points if p["outputs"] == int(outputs)), key=lambda p: p["items"])
        for run, exponents in runs.items():
            for cost in (*COSTS, "LIST"):
                values = [p[run]["request_classes"]["LIST"] if cost == "LIST" else p[run][cost] for p in line]
                cells = " | ".join(f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" for v in values)
                fit = exponents.get(cost)
                lines.append(f"| {outputs} | {run} | {cost} | {cells} | {'-' if fit is None else f'{fit:.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="600,6000,60000")
    parser.add_argument("--outputs", default="1,4")
    parser.add_argument("--s3")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/driver_scale.json"))
    parser.add_argument("--report", type=Path)
    parser.add_argument("--one", nargs=3, metavar=("ROOT", "ITEMS", "OUTPUTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one[0], int(args.one[1]), int(args.one[2]))
        return
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return
    points = []
    with s3_bucket(args.s3, Path(tempfile.mkdtemp(prefix="bench-driver-scale-"))) as s3_uri:
        for outputs in (int(n) for n in args.outputs.split(",")):
            for items in (int(n) for n in args.items.split(",")):
                points.append(measure_point(s3_uri, items, outputs))
                results = {"points": points, "exponents": fitted(points)}
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1) + "\n")  # after every point: a long sweep keeps its results
    print(report(results))


if __name__ == "__main__":
    main()

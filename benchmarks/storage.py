"""Store throughput: a local folder and S3Store against plain boto3, on a SeaweedFS it starts.

    .venv/bin/python -m benchmarks.storage [--repeats 5] [--big-mib 64] [--small-count 64]

Moves one big object and many 1 MiB objects through
- LocalStore (a temp folder),
- S3Store (storage/s3.py) on a private `weed mini`,
- plain boto3 on the same server: upload_file/download_file with boto3's default
  TransferConfig ("boto3") and with the store's TransferConfig ("boto3 same cfg"), and
  put_object/get_object for the bytes workload.
Each implementation reads back what it has just written, so every read finds the server in
the same state (SeaweedFS serves the most recently written object faster); implementations
are interleaved, the first one rotates between repeats, and the disks are synced before each
measurement so no one pays for another's writeback. The table shows medians in MiB/s
and the ratio S3Store / boto3 (above 1: the store is faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from boto3.s3.transfer import TransferConfig

from storage.s3 import DEFAULT_TRANSFER, S3Store
from storage.store import LocalStore, Store
from tests.fixtures.s3 import SeaweedServer, aws_environment

MiB = 1 << 20
COLUMNS = ("local", "S3Store", "boto3", "boto3 same cfg")
Action = Callable[[], object]


def timed(action: Action) -> float:
    # Flush the previous action's dirty pages first, or their writeback slows whoever runs next.
    os.sync()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


class Workloads:
    """The inputs, the stores and a plain boto3 client; builds (put, get) pairs per implementation."""

    def __init__(self, server: SeaweedServer, workdir: Path, big_mib: int, small_count: int):
        self.bucket = f"bench-{uuid.uuid4().hex[:8]}"
        self.boto3 = server.client()
        self.boto3.create_bucket(Bucket=self.bucket)
        self.stores: dict[str, Store] = {"local": LocalStore(workdir / "local-store"), "S3Store": S3Store(self.bucket)}
        self.big = workdir / "big.bin"
        self.big.write_bytes(os.urandom(big_mib * MiB))
        self.small = [os.urandom(MiB) for _ in range(small_count)]
        self.small_files = []
        for i, data in enumerate(self.small):
            path = workdir / "small" / f"{i:04d}.bin"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            self.small_files.append(path)
        self.out = workdir / "out"

    def fresh_out(self) -> Path:
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir()
        return self.out

    def big_file_pairs(self) -> dict[str, tuple[Action, Action]]:
        pairs = {
            name: (
                lambda s=store: s.put_file("big.bin", self.big),
                lambda s=store: s.download("big.bin", self.fresh_out() / "big.bin"),
            )
            for name, store in self.stores.items()
        }
        for name, config in [("boto3", TransferConfig()), ("boto3 same cfg", DEFAULT_TRANSFER)]:
            key = f"{name.replace(' ', '-')}/big.bin"
            pairs[name] = (
                lambda k=key, c=config: self.boto3.upload_file(str(self.big), self.bucket, k, Config=c),
                lambda k=key, c=config: self.boto3.download_file(
                    self.bucket, k, str(self.fresh_out() / "big.bin"), Config=c
                ),
            )
        return pairs

    def small_bytes_pairs(self) -> dict[str, tuple[Action, Action]]:
        def store_put(store: Store) -> None:
            for i, data in enumerate(self.small):
                store.put_bytes(f"bytes/{i:04d}.bin", data)

        def store_get(store: Store) -> None:
            for i in range(len(self.small)):
                store.get_bytes(f"bytes/{i:04d}.bin")

        def boto3_put() -> None:
            for i, data in enumerate(self.small):
                self.boto3.put_object(Bucket=self.bucket, Key=f"boto3/bytes/{i:04d}.bin", Body=data)

        def boto3_get() -> None:
            for i in range(len(self.small)):
                self.boto3.get_object(Bucket=self.bucket, Key=f"boto3/bytes/{i:04d}.bin")["Body"].read()

        pairs = {name: (lambda s=store: store_put(s), lambda s=store: store_get(s)) for name, store in self.stores.items()}
        pairs["boto3"] = (boto3_put, boto3_get)
        return pairs

    def small_files_pairs(self) -> dict[str, tuple[Action, Action]]:
        def store_put(store: Store) -> None:
            for i, path in enumerate(self.small_files):
                store.put_file(f"files/{i:04d}.bin", path)

        def store_get(store: Store) -> None:
            out = self.fresh_out()
            for i in range(len(self.small_files)):
                store.download(f"files/{i:04d}.bin", out / f"{i:04d}.bin")

        def boto3_put() -> None:
            for i, path in enumerate(self.small_files):
                self.boto3.upload_file(str(path), self.bucket, f"boto3/files/{i:04d}.bin")

        def boto3_get() -> None:
            out = self.fresh_out()
            for i in range(len(self.small_files)):
                self.boto3.download_file(self.bucket, f"boto3/files/{i:04d}.bin", str(out / f"{i:04d}.bin"))

        pairs = {name: (lambda s=store: store_put(s), lambda s=store: store_get(s)) for name, store in self.stores.items()}
        pairs["boto3"] = (boto3_put, boto3_get)
        return pairs


def bookkeeping_seconds(store: S3Store, calls: int = 20000) -> float:
    """Seconds per call that S3Store spends on its own work around a boto3 call: key checks,
    the URI, the client lookup, the retry policy and the error-mapping block. Unlike throughput this does not
    depend on the server or on the machine's other load."""
    started = time.perf_counter()
    for _ in range(calls):
        store.call("write", store.url("bytes/0000.bin"), lambda client: store.bucket_key("bytes/0000.bin"))
    return (time.perf_counter() - started) / calls


def run(repeats: int, big_mib: int, small_count: int) -> tuple[list[dict], float]:
    workdir = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    server = SeaweedServer(workdir / "seaweedfs")
    server.start()
    try:
        with aws_environment(server):
            loads = Workloads(server, workdir, big_mib, small_count)
            # (put label, get label, objects, MiB moved, {implementation: (put, get)})
            workloads = [
                ("put_file / upload_file", "download / download_file", f"1 x {big_mib} MiB", big_mib, loads.big_file_pairs()),
                ("put_bytes / put_object", "get_bytes / get_object", f"{small_count} x 1 MiB", small_count, loads.small_bytes_pairs()),
                ("put_file / upload_file", "download / download_file", f"{small_count} x 1 MiB", small_count, loads.small_files_pairs()),
            ]
            # One untimed round first: clients, connections and the server's volumes get made.
            for *_, pairs in workloads:
                for put, get in pairs.values():
                    put()
                    get()
            seconds: dict[tuple[int, str, str], list[float]] = {}
            for repeat in range(repeats):
                for index, (*_, pairs) in enumerate(workloads):
                    order = list(pairs.items())
                    order = order[repeat % len(order) :] + order[: repeat % len(order)]
                    for name, (put, get) in order:
                        seconds.setdefault((index, name, "put"), []).append(timed(put))
                        seconds.setdefault((index, name, "get"), []).append(timed(get))
            results = []
            for index, (put_label, get_label, objects, mib, pairs) in enumerate(workloads):
                for op, label in [("put", put_label), ("get", get_label)]:
                    speeds = {name: mib / statistics.median(seconds[(index, name, op)]) for name in pairs}
                    results.append({"operation": label, "objects": objects, **speeds})
            return results, bookkeeping_seconds(loads.stores["S3Store"])
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def table(results: list[dict]) -> str:
    ratio_columns = [c for c in COLUMNS if c.startswith("boto3")]
    header = " | ".join(f"{c} MiB/s" for c in COLUMNS) + " | " + " | ".join(f"S3Store/{c}" for c in ratio_columns)
    lines = [f"| operation | objects | {header} |", "|---|---|" + "---:|" * (len(COLUMNS) + len(ratio_columns))]
    for row in results:
        cells = [f"{row[c]:.0f}" if c in row else "" for c in COLUMNS]
        cells += [f"{row['S3Store'] / row[c]:.2f}" if c in row else "" for c in ratio_columns]
        lines.append(f"| {row['operation']} | {row['objects']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--big-mib", type=int, default=64)
    parser.add_argument("--small-count", type=int, default=64)
    args = parser.parse_args()
    results, bookkeeping = run(args.repeats, args.big_mib, args.small_count)
    print(
        f"medians of {args.repeats} runs; SeaweedFS `weed mini` on 127.0.0.1; S3Store transfer: "
        f"threshold {DEFAULT_TRANSFER.multipart_threshold // MiB} MiB, parts "
        f"{DEFAULT_TRANSFER.multipart_chunksize // MiB} MiB, concurrency {DEFAULT_TRANSFER.max_concurrency}"
    )
    print(table(results))
    put_object = next(r["boto3"] for r in results if r["operation"].startswith("put_bytes"))
    print(
        f"S3Store's own work per call: {bookkeeping * 1e6:.0f} us, "
        f"{bookkeeping / (1 / put_object) * 100:.2f}% of one 1 MiB put_object at the boto3 rate above"
    )


if __name__ == "__main__":
    main()

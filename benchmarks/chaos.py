"""Chaos: builds and trainings on SeaweedFS behind a fault-injecting proxy, with SIGKILLs.

    python -m benchmarks.chaos [--rounds 20] [--seed 0] [--max-outage 120] [--work DIR]

A reference round runs `tinyllama build-dataset` then `tinyllama train` of a small corpus with
no faults. Every other round runs the same two commands into the same S3 prefix (wiped first)
under a seeded schedule of proxy faults: 503 and SlowDown bursts, resets and short bodies
mid-GET, stalls past the client's read timeout, refused connections of up to `--max-outage`
seconds; and, in about half the rounds, one SIGKILL of the whole process tree of the command
then running. A command that ends in any other way than success is run again, and counted as a
rerun; a killed one is rerun too, but its rerun is the kill's, not the faults'.

A round passes when the build's objects (receipts and summaries aside) are byte-identical to
the reference's, the run's loss at every step and its final weights equal the reference's, no
process of the round is left, and no object was written outside the round's prefix. The table
gives the rounds, the faults injected by kind, the reruns the faults made necessary, and the
longest outage (refusal, 5xx burst or stall) that happened in a round needing no rerun.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BUCKET = "chaos"
PREFIX = "round"  # every round writes under s3://chaos/round/
COMMAND_TIMEOUT_S = 900
MAX_ATTEMPTS = 4  # of one command in one round
MARK_ENV = "TINYLLAMA_CHAOS_MARK"  # in the environment of every process a round starts
TRAIN_STEPS = 6
OUTAGES = ("refuse", "503", "slowdown", "500", "stall")  # faults that last: a spell of seconds


@dataclass
class Round:
    index: int
    faults: list[tuple[str, float, float]] = field(default_factory=list)  # kind, start s, outage s
    killed: bool = False
    reruns: int = 0  # attempts beyond the first that the faults (not the kill) made necessary
    outage_ridden_s: float = 0.0  # the longest outage that happened, in a round that needed no rerun
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    rounds: list[Round]
    injected: Counter  # faults the proxy injected, by kind

    @property
    def passed(self) -> bool:
        return all(not r.problems for r in self.rounds)


@dataclass
class Outcome:
    objects: dict[str, bytes]
    losses: dict[int, float]
    weights: dict[str, bytes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds with faults, after the reference round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-outage", type=float, default=120.0, help="longest refusal or stall, seconds")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tinyllama-chaos-")))
        report = run_chaos(work, args.rounds, args.seed, args.max_outage)
    print_table(report)
    return 0 if report.passed else 1


def run_chaos(work: Path, rounds: int, seed: int, max_outage: float, prefect_api_url: str | None = None) -> Report:
    """The reference round, then `rounds` rounds with faults; each Round lists its problems (none: it passed)."""
    from demo.sample_corpus import make_sample_corpus
    from tests.fixtures.faulty_proxy import faulty_proxy_in_front
    from tests.fixtures.s3 import SeaweedServer

    work.mkdir(parents=True, exist_ok=True)
    corpus = make_sample_corpus(work / "corpus", target_bytes=256 << 10)
    server = SeaweedServer(work / "seaweedfs")
    server.start()
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        api_url = prefect_api_url or stack.enter_context(prefect_server(work / "prefect"))
        server.client().create_bucket(Bucket=BUCKET)
        proxy = stack.enter_context(faulty_proxy_in_front(server.endpoint_url, seed=seed))
        env = {**os.environ, **server.env(), "AWS_ENDPOINT_URL": proxy.url, "PREFECT_API_URL": api_url}
        env.pop("RAY_ADDRESS", None)
        configs = write_configs(work, corpus)
        reference = clean_round(server, work, env, configs)
        results = []
        rng = random.Random(seed)
        for index in range(1, rounds + 1):
            result = chaos_round(index, rng, proxy, server, work, env, configs, max_outage)
            if not result.problems:
                result.problems = compare(outcome_of(server, env), reference)
            results.append(result)
            print(f"round {index}: {'ok' if not result.problems else '; '.join(result.problems)} "
                  f"({result.seconds:.0f} s, faults {[f[0] for f in result.faults]}, killed {result.killed}, "
                  f"reruns {result.reruns})", flush=True)
            proxy.clear()
        return Report(results, Counter(proxy.injected))


@contextlib.contextmanager
def prefect_server(home: Path):
    """`prefect server start` on a free port with its own database; yields its API URL."""
    import httpx

    from tests.fixtures.ports import free_port

    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the Prefect server did not start")
            time.sleep(0.5)
        yield api
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def write_configs(work: Path, corpus: dict) -> dict[str, Path]:
    """The build config (the corpus's own, small vocabulary) and a tiny training run on its manifest."""
    from flows.pretrain import manifest_uri
    from tests.builds import sample_config

    output = f"s3://{BUCKET}/{PREFIX}"
    build = sample_config(corpus, output, name="chaos")
    train = {
        "name": "chaos", "output": output, "model": "tiny", "model_overrides": {"n_layers": 2},
        "data": [{"manifest": manifest_uri(build)}], "seq_len": 64, "global_batch_tokens": 1024,
        "micro_batch": 4, "lr": {"max": 3e-3, "min": 3e-4, "warmup_steps": 1}, "max_steps": TRAIN_STEPS,
        "checkpoint_every": 2, "keep_checkpoints": None, "seed": 7, "work_dir": str(work / "train-work"),
        "launcher": {"kind": "torchrun", "nproc": 2},
    }
    paths = {"build": work / "build.yaml", "train": work / "train.yaml"}
    paths["build"].write_text(yaml.safe_dump(build.model_dump(mode="json")))
    paths["train"].write_text(yaml.safe_dump(train))
    return paths


def clean_round(server, work: Path, env: dict, configs: dict[str, Path]) -> Outcome:
    wipe(server, work)
    for command in ("build-dataset", "train"):
        done = run_command(command, configs, env, mark=uuid.uuid4().hex)
        if done.returncode != 0:
            raise RuntimeError(f"the reference round's {command} failed:\n{done.stdout[-4000:]}")
    return outcome_of(server, env)


def chaos_round(index: int, rng: random.Random, proxy, server, work: Path, env: dict, configs: dict[str, Path],
                max_outage: float) -> Round:
    result = Round(index)
    wipe(server, work)
    mark = uuid.uuid4().hex
    kill_at = rng.uniform(5, 90) if rng.random() < 0.5 else None
    kill_command = rng.choice(("build-dataset", "train"))
    schedule = fault_schedule(rng, max_outage)
    started = time.monotonic()
    proxy.set_schedule(schedule, seed=rng.randrange(1 << 30))
    result.faults = [(f.kind, f.after, f.duration or f.stall_s) for f in schedule]
    for command in ("build-dataset", "train"):
        for attempt in range(MAX_ATTEMPTS):
            kill = kill_at if command == kill_command and attempt == 0 else None
            done = run_command(command, configs, env, mark, kill_after=kill)
            if done.returncode == 0:
                break
            if kill is not None and done.returncode == -signal.SIGKILL:
                result.killed = True
                continue
            result.reruns += 1
        else:
            result.problems.append(f"{command} failed {MAX_ATTEMPTS} times: {done.stdout.strip().splitlines()[-1:]}")
            break
    if not result.reruns:  # every outage that happened was ridden out
        result.outage_ridden_s = max((f.duration or f.stall_s for f in schedule if f.hits and f.kind in OUTAGES), default=0)
    result.seconds = time.monotonic() - started
    if left := processes_marked(mark):
        result.problems.append(f"processes left: {left}")
    if outside := [key for key in bucket_keys(server) if not key.startswith(f"{PREFIX}/")]:
        result.problems.append(f"objects outside the prefix: {outside[:5]}")
    return result


def fault_schedule(rng: random.Random, max_outage: float) -> list:
    """2-4 faults in the first ~90 s of a round: bursts, cut bodies, stalls and refusals."""
    from tests.fixtures.faulty_proxy import Fault

    faults = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(("503", "slowdown", "500", "reset", "short", "stall", "refuse"))
        after = rng.uniform(0, 90)
        if kind in ("503", "slowdown", "500"):
            faults.append(Fault(kind, duration=rng.uniform(5, min(30, max_outage)), after=after))
        elif kind in ("reset", "short"):
            faults.append(Fault(kind, count=rng.randint(1, 3), methods=("GET",), after=after))
        elif kind == "stall":
            faults.append(Fault(kind, count=1, methods=("GET",), stall_s=rng.uniform(5, max_outage), after=after))
        else:
            faults.append(Fault(kind, duration=rng.uniform(5, max_outage), after=after))
    return faults


def run_command(command: str, configs: dict[str, Path], env: dict, mark: str,
                kill_after: float | None = None) -> subprocess.CompletedProcess:
    """`tinyllama <command> <config>` in a session of its own; SIGKILL its whole tree after `kill_after` s."""
    from runtime.processes import process_tree

    config = configs["build" if command == "build-dataset" else "train"]
    process = subprocess.Popen([sys.executable, "-m", "deployments.cli", command, str(config)], cwd=REPO,
                               env={**env, MARK_ENV: mark}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=kill_after or COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in [process.pid, *process_tree(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = process.communicate()
        wait_for_no_processes(mark)
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def processes_marked(mark: str) -> list[int]:
    """Live processes started by a round (its mark in their environment)."""
    found = []
    needle = f"{MARK_ENV}={mark}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path("/proc", entry, "environ").read_bytes().split(b"\0"):
                    stat = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()
                    if stat[0] != "Z":
                        found.append(int(entry))
    return found


def wait_for_no_processes(mark: str, timeout_s: float = 60) -> None:
    """After a SIGKILL, Ray's guardian takes its processes down within seconds."""
    deadline = time.monotonic() + timeout_s
    while processes_marked(mark) and time.monotonic() < deadline:
        time.sleep(0.5)


def wipe(server, work: Path) -> None:
    """An empty bucket and no training cache: every round starts from nothing."""
    shutil.rmtree(work / "train-work", ignore_errors=True)
    client = server.client()
    for key in bucket_keys(server):
        client.delete_object(Bucket=BUCKET, Key=key)


def bucket_keys(server) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def outcome_of(server, env: dict) -> Outcome:
    """What a round left, read straight from the server (not through the proxy)."""
    import torch

    from model.checkpoint import load_model
    from model.metrics import read_metrics
    from storage.store import open_store
    from tests.builds import RECORDS

    client = server.client()
    objects = {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in bucket_keys(server)
               if key.startswith(f"{PREFIX}/datasets/") and not any(r in key for r in RECORDS)}
    with environment({**server.env()}):
        losses = {record["step"]: record["loss"] for record in read_metrics(open_store(f"s3://{BUCKET}/{PREFIX}/runs/chaos"))}
        model, _ = load_model(f"s3://{BUCKET}/{PREFIX}/runs/chaos")
    weights = {name: tensor.detach().to(torch.float32).numpy().tobytes() for name, tensor in model.state_dict().items()}
    return Outcome(objects, losses, weights)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def compare(outcome: Outcome, reference: Outcome) -> list[str]:
    problems = []
    if outcome.objects.keys() != reference.objects.keys():
        problems.append(f"build objects differ: {sorted(outcome.objects.keys() ^ reference.objects.keys())[:5]}")
    elif changed := [k for k in reference.objects if outcome.objects[k] != reference.objects[k]]:
        problems.append(f"build objects' bytes differ: {changed[:5]}")
    if outcome.losses != reference.losses:
        problems.append(f"losses differ: {outcome.losses} vs {reference.losses}")
    if outcome.weights != reference.weights:
        problems.append("final weights differ")
    return problems


def print_table(report: Report) -> None:
    rounds, injected = report.rounds, report.injected
    passed = sum(not r.problems for r in rounds)
    print("\n| round | faults scheduled | SIGKILL | reruns (faults) | longest outage ridden out (s) | s | result |")
    print("| ---: | --- | :---: | ---: | ---: | ---: | --- |")
    for r in rounds:
        kinds = ", ".join(f"{kind}" + (f" {seconds:.0f}s" if seconds else "") for kind, _, seconds in r.faults)
        print(f"| {r.index} | {kinds} | {'yes' if r.killed else ''} | {r.reruns} | {r.outage_ridden_s:.0f} | "
              f"{r.seconds:.0f} | {'ok' if not r.problems else '; '.join(r.problems)} |")
    print(f"\nrounds {len(rounds)}, passed {passed}; faults injected by kind: "
          f"{json.dumps(dict(sorted(injected.items())))}; SIGKILLs {sum(r.killed for r in rounds)}; "
          f"reruns needed (not counting a kill's) {sum(r.reruns for r in rounds)}; longest outage ridden out "
          f"without a rerun {max((r.outage_ridden_s for r in rounds if r.reruns == 0), default=0):.0f} s")


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the tests that train: a tiny run's config on a learnable synthetic build,
the training program launched as the launcher does, what a run left on the store, and the
training processes alive on this machine."""

from __future__ import annotations

import io
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import sentencepiece as spm

from model.checkpoint import complete_checkpoints, read_values
from model.data import read_manifest
from model.metrics import read_metrics
from model.train_config import TrainConfig
from storage.manifest import sha256_bytes, write_record
from storage.run_layout import RunLayout
from storage.store import open_object, open_store
from tests.fixtures.prefect import log_messages_of
from tests.model.synthetic import write_synthetic_build

LAUNCH_TIMEOUT_S = 300


class NotATensor:
    """Pickles as a call of builtins.eval, as a hostile checkpoint value or weights file would
    (loading must refuse it). Not `print`: Ray replaces it in a process where Ray runs, and the
    pickled name would change with the tests that ran before."""

    def __reduce__(self):
        return (eval, ("print('this code would run on load')",))

STEPS = 4  # max_steps of train_config's runs
START_TIMEOUT_S = 240  # for a launched job's first step or checkpoint


def train_config(name: str, output: str, manifest: str, work_dir: Path, **overrides) -> TrainConfig:
    """A tiny run: 2 layers, seq_len 32, 512 tokens per step (2 micro-steps on 2 ranks, 4 on 1)."""
    return TrainConfig.model_validate(
        {
            "name": name,
            "output": output,
            "model": "tiny",
            "model_overrides": {"n_layers": 2},
            "data": [{"manifest": manifest}],
            "seq_len": 32,
            "global_batch_tokens": 512,
            "micro_batch": 4,
            "lr": {"max": 3e-3, "min": 3e-4, "warmup_steps": 1},
            "max_steps": STEPS,
            "checkpoint_every": 2,
            "keep_checkpoints": None,
            "seed": 7,
            "work_dir": str(work_dir / name),
            **overrides,
        }
    )


def short_documents_build(store_uri: str, name: str = "toy") -> str:
    """A synthetic build whose documents are mostly 2 tokens (a random one, then EOS): learnable."""
    return write_synthetic_build(
        store_uri, name, {"web": [2] * 1500, "code": [24] * 60}, vocab_size=512, seed=0, shard_tokens=1024
    )


def train_sentencepiece_model(vocab_size: int = 320) -> bytes:
    """A BPE SentencePiece model (ids 0-2: unk, BOS, EOS), trained as the build trains them."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog def return import class lambda 42".split()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(8)) for _ in range(500)),
        model_writer=model, vocab_size=vocab_size, model_type="bpe", byte_fallback=True, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as the build trains them
    )
    return model.getvalue()


def with_tokenizer(manifest_uri: str, model: bytes) -> str:
    """Put a real SentencePiece `model` in place of a synthetic build's placeholder tokenizer (and
    its fingerprint in the manifest); returns the manifest's URI."""
    build_store, manifest = read_manifest(manifest_uri)
    build_store.put_bytes(manifest.tokenizer.key, model)
    tokenizer = manifest.tokenizer.model_copy(update={"sha256": sha256_bytes(model)})
    write_record(*open_object(manifest_uri), manifest.model_copy(update={"tokenizer": tokenizer}))
    return manifest_uri


def launch_training(config: TrainConfig, nproc: int) -> subprocess.CompletedProcess:
    """`python -m model.train` (1 process) or torchrun with `nproc` on the config written to the
    run folder, as the launcher does."""
    path = RunLayout.of(config.output, config.name).write_config(config.to_json())
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    return subprocess.run(
        [sys.executable, *launcher, "-m", "model.train", path], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )


def run_training(config: TrainConfig, nproc: int) -> str:
    """launch_training, which must succeed; returns its output."""
    result = launch_training(config, nproc)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def tinyllama_train(config: TrainConfig, api_url: str, folder: Path, *flags: str) -> subprocess.CompletedProcess:
    """`tinyllama train` of `config` (as a YAML file in `folder`) as a user runs it, recording on
    the Prefect server at `api_url`."""
    path = folder / f"{config.name}.yaml"
    path.write_text(config.to_json())  # JSON is YAML
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", "--data", str(folder / "data"), "train", str(path), *flags],
        capture_output=True, text=True, env={**os.environ, "PREFECT_API_URL": api_url}, timeout=LAUNCH_TIMEOUT_S,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """What the CLI said went wrong: its `error: ` lines."""
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


# torch's advice on a refused pickle (with or without its backticks): never to be passed on.
WEIGHTS_ONLY_ADVICE = re.compile(r"weights_only`? set to `?False")


def failed_train_task_runs(flow_run_name: str) -> list:
    """The train task run of each failed flow run of that name (their run_count: the tries)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, TaskRunFilter, TaskRunFilterFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))
        failed = [run.id for run in runs if run.state.is_failed()]
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=failed)))
    return [task for task in tasks if task.name.startswith("train-")]


def flow_run_logs(flow_run_name: str) -> str:
    """Every log message that Prefect recorded for the flow runs of that name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))
    return "\n".join(log_messages_of(r.id for r in runs))


def metrics(run_uri: str) -> list[dict]:
    return read_metrics(open_store(run_uri))


def train_state(run_uri: str) -> dict:
    """The newest checkpoint's progress counters, with its loader state under "loader"."""
    store = open_store(run_uri)
    newest = complete_checkpoints(store)[0]
    return {**read_values(store, newest, "progress"), "loader": read_values(store, newest, "loader")}


def training_processes(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry))
    return found


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)

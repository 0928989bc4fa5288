"""Helpers shared by the tests that train: a tiny run's config on a learnable synthetic build,
what a run left on the store, and the training processes alive on this machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

from model.checkpoint import complete_checkpoints, read_values
from model.metrics import METRICS_FILE, read_metrics
from model.train_config import TrainConfig
from storage.store import open_store
from tests.model.synthetic import write_synthetic_build

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


def metrics(run_uri: str) -> list[dict]:
    return read_metrics(open_store(run_uri).get_text(METRICS_FILE))


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

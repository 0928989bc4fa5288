"""Reading a run config (the CLI, the flows) does not pay for torch."""

from __future__ import annotations

import subprocess
import sys


def test_the_training_config_imports_without_torch():
    check = "import sys, model, model.train_config; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_checkpoint_discovery_imports_without_torch_and_every_public_name_resolves():
    check = (
        "import sys; from model.checkpoint import latest_checkpoint, resolve_checkpoint, CheckpointError; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')); "
        "import model.checkpoint as c; print(sorted(n for n in c.__all__ if getattr(c, n, None) is None))"
    )
    torch_modules, unresolved = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                                               check=True).stdout.split("\n")[:2]
    assert torch_modules == "[]" and unresolved == "[]"


def test_the_build_driver_imports_without_numba():
    """numba and the MinHash kernels (~170 MiB) load in the Ray workers that hash, not in the
    flow's process: at 60,000 input files the driver's peak is measured against 1 GiB."""
    check = (
        "import sys, flows.build_dataset, deployments.cli, tasks.near_dedup.steps; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite', 'torch')))"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"

"""Reading a run config (the CLI, the flows) does not pay for torch."""

from __future__ import annotations

import subprocess
import sys


def test_the_training_config_imports_without_torch():
    check = "import sys, model, model.train_config; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"

"""Process-wide defaults for running the pipeline on one machine."""

from __future__ import annotations

import os
from pathlib import Path

SAMPLE_RUN = "sample-tiny"  # the training run of the default demo and of the deployments' defaults

# A first Prefect start on a fresh SQLite database takes ~30 s on small machines; Prefect's
# default (20 s) gives up too soon.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
    # tqdm bars (transformers' weight loading, datasets, lm-eval's requests) turn into garbled
    # lines in a terminal's log stream and in the Prefect UI; tqdm reads this when it is imported.
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def configure_prefect(data_dir: str | os.PathLike = "data") -> None:
    """Keep Prefect's database under ./data (so `tinyllama serve` shows earlier runs) unless told otherwise.

    Must run before prefect is imported; values already in the environment win.
    """
    home = Path(os.environ.setdefault("PREFECT_HOME", str(Path(data_dir).resolve() / "prefect")))
    home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last folder of it
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)

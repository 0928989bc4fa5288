"""Training checkpoints on the object store: sharded, written by every rank, resharded on load,
and never trusted before their COMMIT marker.

    layout        the run's checkpoint folders by the page, no torch: COMMIT markers, discovery,
                  pruning, corrupt ones set aside, a URI resolved to its checkpoint
    safe_load     weights_only reading: DCP's metadata through an allow-list unpickler, values
                  with torch.load(weights_only=True), StoreReader, `load_model`
    states        the Stateful components that are not a torch object's own (model, optimizer,
                  architecture, RNG)
    checkpointer  the `Checkpointer` every rank saves and loads through

Every public name is importable from `model.checkpoint`; each is imported on first use, so that
`from model.checkpoint import latest_checkpoint` (the flows, the CLI) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAYOUT = (
    "CheckpointError", "Checkpoint", "CorruptCheckpoint", "CommitMarker", "LEGACY_MODEL_FILE", "METADATA_FILE",
    "OPTIMIZER_KEY", "commit_checkpoint", "committed_checkpoints", "complete_checkpoints", "latest_checkpoint",
    "prune_checkpoints", "resolve_checkpoint", "set_aside",
)
_SAFE_LOAD = ("StoreReader", "load_model", "load_value", "read_metadata", "read_values", "sha256_mismatches",
              "weights_only_refusal")
_STATES = ("Architecture", "ModelState", "OptimizerState", "RNGState", "RNG_KEY", "rng_state", "set_rng_state")
_CHECKPOINTER = ("Checkpointer", "DIST_TIMEOUT")
_MODULE_OF = {name: f"{__name__}.{module}" for module, names in (
    ("layout", _LAYOUT), ("safe_load", _SAFE_LOAD), ("states", _STATES), ("checkpointer", _CHECKPOINTER),
) for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)

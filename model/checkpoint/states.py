"""The Stateful components of a checkpoint that are not a torch object's own: the model's and
the optimizer's state by parameter name (so they reshard), the architecture a resume must match,
and each rank's RNG states (tensors and plain values: loadable with weights_only=True).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from model.checkpoint.layout import CheckpointError
from model.config import LlamaConfig

RNG_KEY = "rng"

class ModelState(Stateful):
    """The model's parameters by their unwrapped names (DTensor shards under FSDP2)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState(Stateful):
    """The optimizer's state keyed by parameter name (so it reshards like the parameters)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class Architecture(Stateful):
    """The model config a checkpoint's tensors belong to: saved with them, and a resume refuses another."""

    def __init__(self, config: LlamaConfig):
        self.config_json = config.model_dump_json()

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config_json}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != self.config_json:
            raise CheckpointError(f"the checkpoint's model {state['config']} differs from the config's {self.config_json}")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": np_pos,
                  "has_gauss": np_has_gauss, "cached_gaussian": np_gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGState(Stateful):
    """This rank's RNG states, under a key of its own (`rank-R`): ranks the saving run did not have
    (a larger world size now) keep their freshly seeded states."""

    def __init__(self, rank: int):
        self.key = f"rank-{rank}"

    def state_dict(self) -> dict[str, Any]:
        return {self.key: rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state[self.key])

"""Convert a checkpoint of the earlier full-state format (model.safetensors, optimizer.pt, rng.pt,
train_state.json) to the sharded format, in place, in one offline process:

    python -m model.convert_checkpoint s3://bucket/data/runs/NAME/checkpoints/step-0000040

The converted checkpoint holds exactly what a training run of this version saves (the same
Stateful components), so a run resumes from it on any world size. Its files are verified against
the old COMMIT first; the new COMMIT replaces it only after the sharded files are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

from model.checkpoint import CheckpointError, Checkpointer, load_value, resolve_checkpoint
from model.config import LlamaConfig
from model.llama import Llama
from model.train import TrainProgress, build_optimizer, build_scheduler, training_states
from model.train_config import TrainConfig
from storage.manifest import sha256_file

LEGACY_FILES = ("train_state.json", "model.safetensors", "optimizer.pt", "rng.pt")


def _fetch_verified(layout, checkpoint, dest: Path) -> dict[str, Path]:
    infos = {f.key: f for f in checkpoint.files}
    paths = {}
    for name in LEGACY_FILES:
        if name not in infos:
            raise CheckpointError(f"{layout.store.url(checkpoint.prefix)}: its COMMIT lists no {name}")
        path = layout.store.download(checkpoint.key(name), dest / name)
        if sha256_file(path) != infos[name].sha256:
            raise CheckpointError(f"{layout.store.url(checkpoint.key(name))}: sha256 differs from its COMMIT marker")
        paths[name] = path
    return paths


def convert(checkpoint_uri: str) -> int:
    """Rewrite a full-state checkpoint as a sharded one; returns its step."""
    layout, checkpoint = resolve_checkpoint(checkpoint_uri)
    if not checkpoint.is_legacy:
        raise CheckpointError(f"{layout.store.url(checkpoint.prefix)} is already in the sharded format")
    with tempfile.TemporaryDirectory(prefix="tinyllama-convert-") as tmp:
        paths = _fetch_verified(layout, checkpoint, Path(tmp))
        state = json.loads(paths["train_state.json"].read_text())
        weights = load_file(paths["model.safetensors"])
        optimizer_state = load_value(paths["optimizer.pt"].read_bytes(), str(paths["optimizer.pt"]))
        rng = load_value(paths["rng.pt"].read_bytes(), str(paths["rng.pt"]))
    config = TrainConfig.model_validate(state["config"])
    llama_config = LlamaConfig.model_validate(state["model_config"])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = Llama(llama_config)
        optimizer = build_optimizer(model, config, torch.device("cpu"))
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=full)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=full)
        scheduler = build_scheduler(optimizer, config)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": replaying, not training
            warnings.simplefilter("ignore")
            for _ in range(state["step"]):
                scheduler.step()
        progress = TrainProgress(state["step"], state["tokens_seen"], state["world_size"])
        states = training_states(model, optimizer, scheduler, dict(state["loader"]), progress, llama_config, rng)
        checkpointer = Checkpointer(layout, states, keep=None, staging_dir=Path(tempfile.gettempdir()) / "tinyllama-convert")
        checkpointer.save(state["step"], replace=True)
        checkpointer.close()
    finally:
        dist.destroy_process_group()
    return state["step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint folder URI (<run>/checkpoints/step-NNNNNNN) or a run URI")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        step = convert(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted the checkpoint at step {step} to the sharded format")
    return 0


if __name__ == "__main__":
    sys.exit(main())

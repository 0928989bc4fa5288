"""torchrun on several nodes: the run's local paths checked from every node before training.

No process outside the job can look at another node's disk, so the ranks do it when they start
(storage/reach.py): global rank 0 writes a marker into the folder of every local path of the run
config (the config itself, `output`, the manifests, `init_from` when a new run reads it), then
each node's local rank 0 looks for them. A node that misses one, or cannot read the config at
all, fails every rank alike with one line naming the key and the path, so the job ends at once
on every node (no rank left waiting in a collective) and the launching task reports that line.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from model.checkpoint import latest_checkpoint
from model.train_config import TrainConfig
from storage.reach import TOKEN_BYTES, SharedPath, Unreachable, missing_markers, place_markers, remove_markers
from storage.store import ObjectNotFound, open_store

NOTHING_MISSING = 2**62
CONFIG_MISSING = NOTHING_MISSING - 1  # a node that cannot read the config itself (the last path)
NO_MARKERS = -1


def spans_nodes() -> bool:
    """Whether this torchrun worker's job runs on several nodes (from torchrun's environment)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def read_config_on_every_node(config_uri: str) -> TrainConfig:
    """The run config at `config_uri`; on several nodes (the process group already joined), only
    once every node has found rank 0's markers in its local paths' folders."""
    config_path = SharedPath.of("config", config_uri, is_file=True)
    if not spans_nodes():
        return TrainConfig.from_yaml(config_uri)
    try:
        config = TrainConfig.from_yaml(config_uri)
    except ObjectNotFound:
        if config_path is None:  # on a remote store: the same for every node
            raise
        config = None  # a node of its own disk: the other nodes must hear of it
    paths = []
    if config is not None:
        new_run = bool(config.init_from) and latest_checkpoint(open_store(config.run_uri)) is None
        paths = config.shared_paths(with_init_from=new_run)
    paths += [config_path] if config_path else []
    if not paths:
        return config
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if dist.get_backend() == "nccl" else None

    token, own_error = None, None
    if dist.get_rank() == 0 and config is not None:
        try:
            token = place_markers(paths)
        except Unreachable as error:
            own_error = error
    shared = torch.tensor([int(token, 16) if token else NO_MARKERS], device=device)
    dist.broadcast(shared, src=0)
    value = int(shared.item())
    try:
        first_missing = NOTHING_MISSING
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            if config is None:
                first_missing = CONFIG_MISSING
            elif value != NO_MARKERS:
                missing = missing_markers(paths, f"{value:0{2 * TOKEN_BYTES}x}")
                first_missing = missing[0] if missing else NOTHING_MISSING
        found = torch.tensor([first_missing], device=device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
    finally:
        if token:
            remove_markers(paths, token)
    if own_error is not None:
        raise own_error
    if (index := int(found.item())) != NOTHING_MISSING:
        raise paths[min(index, len(paths) - 1)].refusal("this job")  # CONFIG_MISSING: the last
    if value == NO_MARKERS:
        raise Unreachable(f"{paths[0].key} {paths[0].uri}: rank 0 could not place the markers that check the "
                          "run's local paths from every node (its log says why)")
    return config

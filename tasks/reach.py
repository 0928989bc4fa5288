"""Refuse, before anything runs, a local path that the nodes of a Ray cluster do not all reach.

On one node (a local Ray, or none started yet without RAY_ADDRESS) every local path is fine. On a
cluster of several alive nodes, markers are written into the paths' folders here and one tiny Ray
task per alive node looks for them (storage/reach.py): a folder every node mounts passes, anything
else is refused with one line naming the config key and the path (a ValueError: exit 2, no retry).
"""

from __future__ import annotations

import dataclasses
import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from storage.reach import SharedPath, markers, missing_markers
from tasks.config import BuildConfig, Format
from tasks.fanout import ensure_ray, interrupts_unwrapped
from tasks.globs import GLOB_CHARS, split_glob


def alive_ray_nodes() -> list[str]:
    """Node ids of the Ray this process uses (joined or started here); none when no Ray runs yet
    and RAY_ADDRESS names none (the local Ray that would start is one node)."""
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        return []
    ensure_ray()
    return [node["NodeID"] for node in ray.nodes() if node["Alive"]]


def check_reach_on_ray(paths: list[SharedPath | None]) -> None:
    """Raise Unreachable for the first local path that some alive node of the Ray cluster does not see."""
    # An input missing here is left to the stage that reads it, which names it.
    local = [path for path in paths if path is not None and (path.output or path.folder.is_dir())]
    if not local or len(nodes := alive_ray_nodes()) < 2:
        return
    look = ray.remote(num_cpus=0, max_retries=0)(missing_markers)
    with markers(local) as token, interrupts_unwrapped():
        found = ray.get([
            look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(local, token)
            for node in nodes
        ])
    if missing := sorted({i for node_missing in found for i in node_missing}):
        raise local[missing[0]].refusal(f"the Ray cluster ({len(nodes)} nodes)")


def build_paths(config: BuildConfig) -> list[SharedPath | None]:
    """A build's local paths that every Ray node reads or writes: the output, each source's folder
    (a glob's folder before its first glob character), the tokenizer model."""
    paths = [SharedPath.of("output", config.output, output=True)]
    for i, source in enumerate(config.sources):
        if source.format is Format.hf:
            paths.append(SharedPath.of(f"sources.{i}.uri", source.uri))
        elif GLOB_CHARS.search(source.uri):
            folder = SharedPath.of(f"sources.{i}.uri", split_glob(source.uri)[0])
            paths.append(folder and dataclasses.replace(folder, uri=source.uri))
        else:
            paths.append(SharedPath.of(f"sources.{i}.uri", source.uri, is_file=True))
    if config.tokenizer.model:
        paths.append(SharedPath.of("tokenizer.model", config.tokenizer.model, is_file=True))
    return paths

"""Checkpoints on the store: commit markers, keep-last-k, safe loading, and RNG states."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from model.checkpoint import (
    COMMIT,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    CheckpointError,
    TrainState,
    checkpoint_prefix,
    commit_checkpoint,
    complete_checkpoints,
    fetch_file,
    latest_checkpoint,
    load_tensors,
    prune_checkpoints,
    restore_checkpoint,
    save_checkpoint,
    rng_state,
    set_rng_state,
)
from storage.store import join_key


def files(tmp_path: Path, step: int) -> dict[str, Path]:
    folder = tmp_path / f"files-{step}"
    folder.mkdir()
    out = {}
    for name in ("model.safetensors", "train_state.json"):
        out[name] = folder / name
        out[name].write_bytes(f"{name} of step {step}".encode())
    return out


def test_commit_marker_is_written_last_and_lists_every_file(store, tmp_path):
    checkpoint = commit_checkpoint(store, 7, files(tmp_path, 7))
    assert checkpoint.prefix == "checkpoints/step-0000007"
    marker = json.loads(store.get_text(join_key(checkpoint.prefix, COMMIT)))
    assert marker["step"] == 7
    assert sorted(f["key"] for f in marker["files"]) == ["model.safetensors", "train_state.json"]
    assert latest_checkpoint(store).step == 7


def test_checkpoints_without_commit_or_with_missing_files_are_ignored(store, tmp_path):
    commit_checkpoint(store, 1, files(tmp_path, 1))
    # A crash mid-save: files of step 2 uploaded, no COMMIT.
    for name, path in files(tmp_path, 2).items():
        store.put_file(join_key(checkpoint_prefix(2), name), path)
    # A COMMIT whose file was later truncated.
    commit_checkpoint(store, 3, files(tmp_path, 3))
    store.put_bytes(join_key(checkpoint_prefix(3), "model.safetensors"), b"short")
    # A COMMIT whose file was deleted.
    commit_checkpoint(store, 4, files(tmp_path, 4))
    store.delete(join_key(checkpoint_prefix(4), "train_state.json"))

    assert [c.step for c in complete_checkpoints(store)] == [1]
    assert latest_checkpoint(store).step == 1


def test_fetch_refuses_a_file_whose_content_changed(store, tmp_path):
    checkpoint = commit_checkpoint(store, 5, files(tmp_path, 5))
    key = join_key(checkpoint.prefix, "model.safetensors")
    store.put_bytes(key, store.get_bytes(key)[::-1])  # same size, other bytes
    assert latest_checkpoint(store).step == 5  # sizes match: only the sha256 can tell
    with pytest.raises(CheckpointError, match="sha256 differs"):
        fetch_file(store, checkpoint, "model.safetensors", tmp_path)


def test_keep_last_k_deletes_older_complete_and_stale_incomplete_checkpoints(store, tmp_path):
    for step in (10, 20, 30):
        commit_checkpoint(store, step, files(tmp_path, step))
    store.put_bytes(join_key(checkpoint_prefix(15), "model.safetensors"), b"crashed mid-save")
    store.put_bytes(join_key(checkpoint_prefix(40), "model.safetensors"), b"being written now")

    deleted = prune_checkpoints(store, keep=2)

    assert deleted == [10, 15]
    assert [c.step for c in complete_checkpoints(store)] == [30, 20]
    assert not list(store.list(checkpoint_prefix(10) + "/"))
    assert store.exists(join_key(checkpoint_prefix(40), "model.safetensors"))  # newer than any commit: untouched
    assert prune_checkpoints(store, keep=None) == []


class NotATensor:
    def __reduce__(self):
        return (print, ("this code would run on load",))


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "hook": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_tensors(path, "optimizer.pt")
    torch.save({"state": {"w": {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]}, path)
    assert torch.equal(load_tensors(path, "optimizer.pt")["state"]["w"]["exp_avg"], torch.ones(2))


@pytest.fixture
def lone_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_restore_refuses_a_committed_checkpoint_holding_a_pickled_object(store, tmp_path, lone_process_group):
    from safetensors.torch import save_file

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    folder = tmp_path / "evil"
    folder.mkdir()
    save_file(model.state_dict(), folder / MODEL_FILE)
    torch.save({"state": {}, "param_groups": [], "payload": NotATensor()}, folder / OPTIMIZER_FILE)
    torch.save({"rank-0": rng_state()}, folder / RNG_FILE)
    state = {"step": 3, "tokens_seen": 0, "loader": {"position": 0}, "world_size": 1, "model_config": {}, "config": {}}
    (folder / STATE_FILE).write_text(json.dumps(state))
    commit_checkpoint(store, 3, {name: folder / name for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)})

    with pytest.raises(CheckpointError, match="refused to load"):
        restore_checkpoint(store, model, optimizer, tmp_path / "staging")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_tensors(tmp_path / "rng.pt", "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_no_checkpoint_means_a_fresh_start(store, tmp_path, lone_process_group):
    model = torch.nn.Linear(2, 2)
    assert restore_checkpoint(store, model, torch.optim.AdamW(model.parameters()), tmp_path) is None
    assert not list(store.list())


def test_restore_skips_a_corrupt_newest_checkpoint(store, tmp_path, lone_process_group):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    saved = {}
    for step in (1, 2):
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
        state = TrainState(step, step * 10, {"position": step}, 1, {}, {})
        save_checkpoint(store, model, optimizer, state, keep=None, staging_dir=tmp_path / "staging")
    key = join_key(checkpoint_prefix(2), MODEL_FILE)
    data = bytearray(store.get_bytes(key))
    data[-1] ^= 0xFF  # flip a weight's bits, keep the size
    store.put_bytes(key, bytes(data))

    fresh = torch.nn.Linear(2, 2)
    restored = restore_checkpoint(store, fresh, torch.optim.AdamW(fresh.parameters()), tmp_path / "staging")

    assert restored.step == 1 and restored.loader == {"position": 1}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved[1].items())

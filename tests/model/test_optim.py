"""The optimizer policy of model/train.py: which parameters decay, and gradient clipping.

A tiny Llama on CPU in a lone gloo process group, fed by the real loader from a synthetic build.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from model.data import BlockLoader
from model.llama import Llama, RMSNorm
from model.train import build_optimizer, init_distributed, train_step
from tests.model.runs import short_documents_build, train_config

CPU = torch.device("cpu")
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture
def lone_process_group():
    _, created = init_distributed(CPU)
    yield
    if created:
        torch.distributed.destroy_process_group()


@pytest.fixture
def manifest(tmp_path) -> str:
    return short_documents_build(str(tmp_path / "store"))


def tiny_model(config) -> Llama:
    torch.manual_seed(config.seed)
    return Llama(config.llama_config(512))


def test_norms_take_no_weight_decay_and_every_matrix_does(tmp_path):
    config = train_config("optim", str(tmp_path), "unused", tmp_path, weight_decay=0.1, lr={"max": 0.5, "min": 0.5})
    model = tiny_model(config)
    optimizer = build_optimizer(model, config, CPU)
    norms = {id(p) for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay) == sum(len(g["params"]) for g in optimizer.param_groups)  # each parameter in one group
    names = dict(model.named_parameters())
    assert set(decay) == {id(p) for p in names.values()}
    for name, p in names.items():
        assert decay[id(p)] == (0.0 if id(p) in norms else 0.1), name
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= {n for n, p in names.items() if decay[id(p)] == 0.1}

    # What the groups do: with zero gradients AdamW's update is its decay alone.
    before = {n: p.detach().clone() for n, p in names.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in names.items():
        expected = before[name] if id(p) in norms else before[name] * (1 - 0.5 * 0.1)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


def reference_step(model, optimizer, batch, grad_clip: float) -> float:
    """One optimizer step the textbook way: backward, torch's clip_grad_norm_, AdamW."""
    _, loss = model(batch[:, :-1], batch[:, 1:], return_logits=False)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def test_a_step_clips_the_gradient_norm_to_grad_clip_as_clip_grad_norm_does(tmp_path, manifest, lone_process_group):
    grad_clip = 0.05  # far below this model's gradient norm, so every step is clipped
    # one micro-batch per step on one rank, so the reference sees the same batch
    config = train_config("optim", str(tmp_path), manifest, tmp_path, grad_clip=grad_clip, global_batch_tokens=4 * 32)
    model = tiny_model(config)
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model, config, CPU)
    # An independent AdamW with the same hyperparameters (decay on matrices only, as above).
    reference_optimizer = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=config.lr.max, betas=config.betas, eps=config.eps,
    )
    norms_seen = []  # the total gradient norm the optimizer steps with
    optimizer.register_step_pre_hook(
        lambda opt, *_: norms_seen.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for g in opt.param_groups for p in g["params"]])).item())
    )
    cache = tmp_path / "cache"
    with contextlib.closing(BlockLoader(config.data, config.seq_len, config.seed, cache_dir=cache)) as loader, \
         contextlib.closing(BlockLoader(config.data, config.seq_len, config.seed, cache_dir=cache)) as batches:
        for _ in range(3):  # Adam's first step is nearly scale-free; later steps are not
            _, norm = train_step(model, optimizer, loader, config, config.accum_steps(1), NO_AUTOCAST, CPU)
            batch = batches.next_batch(config.micro_batch)
            assert norm == pytest.approx(reference_step(reference, reference_optimizer, batch, grad_clip), rel=1e-5)
            assert norm > 10 * grad_clip  # the norm before clipping is returned
    assert all(n <= grad_clip * (1 + 1e-5) for n in norms_seen) and len(norms_seen) == 3
    for (name, p), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-7, msg=name)

"""Distributed data parallel set-up: the ranks torchrun started, the parameters DDP must not wait for, every
rank's RNG state for the checkpoint, and a clean exit. One process without torchrun is rank 0 of 1."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def init_ranks(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device); initialises the process group when launched with torchrun,
    one rank included (``--nproc 1``: the single-GPU DDP path, as a cluster job of one GPU runs it).

    CUDA ranks use NCCL and the GPU named by ``LOCAL_RANK``; CPU ranks use gloo.
    """
    if "WORLD_SIZE" not in os.environ:  # a plain process: no process group
        return 0, 1, device
    world = int(os.environ["WORLD_SIZE"])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world, device


def distributed() -> bool:
    """Whether this process is one rank of a process group (torchrun started it)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def leave_group() -> None:
    """Wait for rank 0's export, then close the process group on every rank.

    A rank that exits with the group still open can abort in gloo's teardown ("terminate called without an
    active exception"), and the launcher then kills rank 0 in the middle of its export.
    """
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def freeze_unused(student: torch.nn.Module, probe_loss: Callable[[], torch.Tensor]) -> None:
    """Freeze the parameters the loss never reaches (a vit's pooled head under ``token_mse``).

    DDP waits for a gradient of every trainable parameter; ``find_unused_parameters`` does not help, since
    it marks everything that feeds the student's outputs as used, including outputs the loss ignores.
    One probe step (``probe_loss``: the loss of the first batch) finds them (a parameter used on any rank
    stays trainable); frozen, they are what they would be anyway: AdamW leaves a parameter without gradient
    untouched.
    """
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(probe_loss(), params, allow_unused=True)
    used = torch.tensor([g is not None for g in grads], dtype=torch.int32)
    torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
    for p, u in zip(params, used.tolist(), strict=True):
        if not u:
            p.requires_grad_(False)
    log.info(
        "DDP: %d of %d parameter tensors get no gradient from the loss and are frozen",
        len(params) - int(used.sum()),
        len(params),
    )


def rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state (dropout differs per rank after the first step), gathered for rank 0.

    A collective when ``world`` > 1: every rank takes part.
    """
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if world == 1:
        return [mine]
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, mine)
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore one rank's RNG state as :func:`rng_states` took it."""
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

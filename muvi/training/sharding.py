"""Sharded data parallelism with torch's FSDP2 (``fully_shard``), for a loop written for DDP.

Each process holds one shard (dim 0) of every parameter, of its gradient and of AdamW's
moments, as DTensors. The recipe shards the model itself instead of handing it to
``accelerator.prepare`` (Accelerate keeps the process group, device, data and logging); the
parts that assumed whole parameters work on the shards:

- the EMA's shadow is sharded the same way, so :class:`~muvi.training.optim.EMA` averages the
  local shards of both (no communication);
- checkpoints hold whole tensors, gathered with :func:`full_state` (collective: every process
  calls it, the main one keeps the result), so a sharded run's ``state.pt`` has the format of
  an unsharded one; :func:`~muvi.training.checkpoints.restore` cuts whole optimizer states back
  to this process's shards (:func:`shard_optimizer_state`), and a model is loaded before it is
  sharded;
- what runs on the main process alone (audio samples, ``final/``) gets a whole copy,
  :func:`gather_module`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: nothing is ever sharded
    DTensor = ()

SHARDS = ("none", "fsdp")


def shard(model: nn.Module, units: Sequence[nn.Module], device: torch.device | str, world_size: int,
          entry_points: Sequence[tuple[nn.Module, str]] = ()) -> nn.Module:
    """``fully_shard`` each of ``units`` (each one all-gathered just for its own forward and
    backward), then the root (every parameter left over), over a 1-D mesh of ``world_size``
    processes on ``device``'s type; in place. ``entry_points`` names the methods other than
    ``forward`` by which a unit is called (they all-gather it too). Every process must hold the
    same weights before (the same seed or the same file), since each keeps its own slice."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(torch.device(device).type, (world_size,))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    for unit, method in entry_points:
        register_fsdp_forward_method(unit, method)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: in-place ops change the DTensor), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_numel(model: nn.Module) -> tuple[int, int]:
    """(parameter values this process holds, parameter values of the whole model)."""
    return sum(local(p).numel() for p in model.parameters()), sum(p.numel() for p in model.parameters())


def full_state(value: Any, keep: bool = True) -> Any:
    """``value`` (a state dict, nested) with every DTensor gathered to a whole CPU tensor and
    every other tensor moved to the CPU; collective when it holds DTensors (every process calls
    it with the same structure). Processes with ``keep`` False get None (they only take part)."""
    if isinstance(value, DTensor):
        whole = value.full_tensor()
        return whole.cpu() if keep else None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu() if keep else None
    if isinstance(value, dict):
        out = {k: full_state(v, keep) for k, v in value.items()}
        return out if keep else None
    if isinstance(value, (list, tuple)):
        out = [full_state(v, keep) for v in value]
        return type(value)(out) if keep else None
    return value if keep else None


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A whole optimizer state dict (as :func:`full_state` saved it) with each tensor of a
    sharded parameter's shape cut to that parameter's shard (Adam's moments; ``step`` stays);
    ``state`` itself when no parameter is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return state
    from torch.distributed.tensor import distribute_tensor

    per_param = {}
    for index, entry in state["state"].items():
        p = params[int(index)]
        per_param[index] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                            for k, v in entry.items()}
    return {**state, "state": per_param}


def gather_module(module: nn.Module, build: Callable[[], nn.Module], keep: bool,
                  device: torch.device | str = "cpu") -> Optional[nn.Module]:
    """A whole, unsharded copy of a sharded ``module`` (built by ``build``, then loaded strictly
    with the gathered weights; eval mode, frozen) on ``device`` on processes with ``keep``,
    None on the others; collective. An unsharded ``module`` is returned as it is."""
    if not is_sharded(module):
        return module
    state = full_state(module.state_dict(), keep)
    if not keep:
        return None
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the stream as it was
        whole = build()
    whole.load_state_dict(state)
    return whole.to(device).eval().requires_grad_(False)

"""Multi-process training under ``torchrun``: process group, FSDP2 sharding, collectives. One process = no-ops.

Sharding: every decoder layer (the HF model's ``_no_split_modules`` classes) is its own FSDP2 unit and a
``ModelRunner`` wrapping the model is the root unit. All model calls go through ``runner(fn, ...)``, so the root's
forward gathers the root-level parameters (embeddings, final norm, ``lm_head``) while ``fn`` runs: the fused
loss reads ``lm_head.weight`` directly, and outside a root forward it would be a sharded DTensor.

Generation calls the model once per decoded token and ranks stop at different lengths, so ``gathered_params``
unshards every unit up front and keeps them gathered until the end: no collective runs inside the decode loop,
and ranks may take different numbers of steps without deadlocking.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ModelRunner(torch.nn.Module):
    """``runner(fn, *args, **kwargs)`` = ``fn(model, *args, **kwargs)`` inside this module's forward (module doc)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        # Not an HF model: treat the elements of every ModuleList as the layers.
        layers = [child for m in model.modules() if isinstance(m, torch.nn.ModuleList) for child in m]
    return layers


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> ModelRunner:
    """``ModelRunner(model)``, sharded with FSDP2 over all ranks when there is more than one."""
    runner = ModelRunner(model)
    if not info.enabled:
        return runner
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (info.world_size,))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(runner, mesh=mesh)
    return runner


def _fsdp_units(module: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_params(runner: torch.nn.Module):
    """Inside a runner forward: every FSDP2 unit stays unsharded (no collectives) until the block ends."""
    units = _fsdp_units(runner)
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a float64 vector over ranks (metrics are summed as (value sum, count) pairs and divided afterwards)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Elementwise maximum of a float64 vector over ranks."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """``obj`` from rank 0 on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter or gradient."""
    return t.to_local() if hasattr(t, "to_local") else t


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (before sharding: ranks must start identical)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)

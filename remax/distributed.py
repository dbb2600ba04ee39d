"""Multi-process training under ``torchrun``: process group, FSDP2 sharding, collectives. One process = no-ops.

Sharding: every decoder layer (the HF model's ``_no_split_modules`` classes) is its own FSDP2 unit and a
``ModelRunner`` wrapping the model is the root unit. All model calls go through ``runner(fn, ...)``, so the root's
forward gathers the root-level parameters (embeddings, final norm, ``lm_head``) ONCE while ``fn`` runs: the fused
loss reads ``lm_head.weight`` directly, as the plain unsharded tensor of that one all-gather, however many token
chunks it streams (outside a root forward it would be a sharded DTensor, gathered again at every use). FSDP2 keeps
the root's parameters gathered from its forward to its backward, and the fused loss's backward only scales
gradients it computed in the forward, so a policy-loss call costs one all-gather per unit and one reduce-scatter per
unit (``tests/test_distributed.py`` counts them). The policy, the frozen reference and PPO's value model are all
sharded this way; with ``bf16`` on CUDA each unit computes in bf16 from fp32 master shards and reduces gradients in
fp32 (``MixedPrecisionPolicy``).

Gradient accumulation: ``gradient_sync(runner, False)`` before a micro-batch's backward keeps its gradients
unsharded and local (no reduce-scatter); the last micro-batch turns it back on and reduces the sum once.

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
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): nccl for CUDA tensors and gloo for
    CPU ones on a GPU machine (the metrics are summed as CPU tensors), gloo alone on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
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


def mixed_precision_policy(bf16: bool, device: torch.device):
    """FSDP2's ``MixedPrecisionPolicy`` for a run: bf16 parameters for compute and fp32 gradient reduction when
    ``bf16`` is on and the device is CUDA (``bf16`` is ignored on CPU), else None (fp32 throughout)."""
    if not (bf16 and device.type == "cuda"):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device, *, bf16: bool = False) -> ModelRunner:
    """``ModelRunner(model)``, sharded with FSDP2 over all ranks when there is more than one (``bf16``: see
    ``mixed_precision_policy``)."""
    runner = ModelRunner(model)
    if not info.enabled:
        return runner
    import dataclasses

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (info.world_size,))
    policy = mixed_precision_policy(bf16, device)
    layer_kwargs = {} if policy is None else {"mp_policy": policy}
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, **layer_kwargs)
    # The root's forward receives the loss inputs (advantages, log-probs): they must not be cast to bf16.
    root_kwargs = {} if policy is None else {"mp_policy": dataclasses.replace(policy, cast_forward_inputs=False)}
    fully_shard(runner, mesh=mesh, **root_kwargs)
    return runner


def gradient_sync(runner: torch.nn.Module, enabled: bool) -> None:
    """Whether the next backward reduce-scatters gradients (FSDP2's ``set_requires_gradient_sync``, every unit);
    no-op for an unsharded runner. Off, the micro-batch's gradients accumulate unsharded on each rank."""
    set_sync = getattr(runner, "set_requires_gradient_sync", None)
    if set_sync is not None:
        set_sync(enabled)


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
            # Back to FSDP2's defaults: layers reshard after their forward; the root keeps its parameters (the
            # embeddings and lm-head) gathered until its backward, which would otherwise gather them again.
            unit.set_reshard_after_forward(unit is not runner)


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

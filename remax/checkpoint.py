"""Atomic, resumable checkpoints: policy, optimizer, scheduler, RNG states, step and metric history.

Layout of ``RUN_DIR/checkpoints``::

    step_00000050/            one complete checkpoint
        .metadata, *.distcp   policy + optimizer, and every extra part's model + optimizer (PPO: the value model)
                              (torch.distributed.checkpoint; sharded when running FSDP2)
        scheduler.pt          LR scheduler state (scheduler_<part>.pt for an extra part)
        rng_rank{r}.pt        python / numpy / torch (+ CUDA) RNG states of rank r
        trainer_state.json    step, metric history, config; written last
    latest                    the name of the newest complete checkpoint, replaced atomically

A checkpoint is written into ``.tmp-step_XXXXXXXX`` and renamed (``os.replace``) only when every file is on disk,
then ``latest`` is swapped with another ``os.replace``. A crash or Ctrl-C at any point therefore leaves ``latest``
naming the previous complete checkpoint; a left-over ``.tmp-*`` directory is never read and is removed by the next
save. Old checkpoints are pruned the same way: renamed to ``.tmp-old-*`` first, then deleted. Every file is fsynced
before the rename. ``tests/test_crash_safety.py`` kills (``kill -9``) runs at each point of a save and resumes them.
The run directory must be on a filesystem all ranks share.

World size: the model and optimizer states are saved as global tensors with their sharding described in
``.metadata`` (``torch.distributed.checkpoint``), and ``load_checkpoint`` reads them into whatever sharding the
loading run has, so a run saved by N ranks resumes on M (1 included). Everything else is rank-independent except
the RNG states: ranks beyond those saved start from rank 0's (the trainer seeds every rollout row from the step and
row alone, so its results do not depend on them). ``tests/test_distributed.py`` resumes a 2-rank checkpoint in one
process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings

import numpy as np
import torch

from remax.distributed import DistInfo, barrier

LATEST = "latest"
STATE_FILE = "trainer_state.json"

# Fault injection for tests: REMAX_FAULT_PAUSE="point:n" makes the n-th arrival (default the first) at a named point of
# a save write RUN_DIR/fault-paused (holding the point's name) and sleep, so that a test can kill the process there.
FAULT_ENV = "REMAX_FAULT_PAUSE"
FAULT_POINTS = ("tmp_made", "model_saved", "state_written", "renamed", "latest_written", "pruning")
_fault_arrivals: dict[str, int] = {}


def _fault_point(name: str, root: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or spec.partition(":")[0] != name:
        return
    _fault_arrivals[name] = _fault_arrivals.get(name, 0) + 1
    if _fault_arrivals[name] == int(spec.partition(":")[2] or 1):
        write_atomic(os.path.join(os.path.dirname(root), "fault-paused"), name)
        time.sleep(600)


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a partial file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _torch_save_synced(obj, path: str) -> None:
    torch.save(obj, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_and_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    for name, (part_model, part_optimizer, _) in extra.items():
        state[f"{name}_model"], state[f"{name}_optim"] = get_state_dict(part_model, part_optimizer)
    return state


def _check_extra(extra: dict | None) -> dict:
    extra = extra or {}
    for name in extra:
        if not name.isidentifier() or name in ("model", "optim"):
            raise ValueError(f"extra: part names must be identifiers other than 'model'/'optim', got {name!r}")
    return extra


def save_checkpoint(
    run_dir: str,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    info: DistInfo,
    keep: int = 2,
    extra: dict | None = None,
) -> str:
    """Write checkpoint ``step`` atomically (every rank calls this); returns its directory.

    ``extra``: more trained parts, ``{name: (model, optimizer, scheduler)}`` (PPO's value model as ``"value"``).
    """
    import torch.distributed.checkpoint as dcp

    extra = _check_extra(extra)
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, _step_name(step))
    tmp = os.path.join(root, f".tmp-{_step_name(step)}")
    if info.is_main:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
        _fault_point("tmp_made", root)
    barrier(info)
    with warnings.catch_warnings():
        # One process without a process group is intended here; DCP warns about it on every call.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_model_and_optim_state(model, optimizer, extra), checkpoint_id=tmp)
    _torch_save_synced(rng_state(), os.path.join(tmp, f"rng_rank{info.rank}.pt"))
    barrier(info)
    if info.is_main:
        _fault_point("model_saved", root)
        _torch_save_synced(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        for name, (_, _, part_scheduler) in extra.items():
            _torch_save_synced(part_scheduler.state_dict(), os.path.join(tmp, f"scheduler_{name}.pt"))
        state = dict(trainer_state, step=step, world_size=info.world_size)
        write_atomic(os.path.join(tmp, STATE_FILE), json.dumps(state))
        _fsync_dir(tmp)
        _fault_point("state_written", root)
        if os.path.exists(final):
            # Re-saving a step (a resumed run passing it again): move the old copy aside before the rename.
            trash = os.path.join(root, f".tmp-old-{_step_name(step)}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _fault_point("renamed", root)
        write_atomic(os.path.join(root, LATEST), _step_name(step))
        _fault_point("latest_written", root)
        _prune(root, keep)
    barrier(info)
    return final


def _complete_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("step_") and os.path.isfile(os.path.join(root, n, STATE_FILE))]
    return sorted(names)


def _prune(root: str, keep: int) -> None:
    for name in _complete_checkpoints(root)[:-keep]:
        # Renamed first: a process killed mid-delete leaves a .tmp- directory (never read, removed by the next save),
        # not a step_* directory whose trainer_state.json outlived its weights.
        trash = os.path.join(root, f".tmp-old-{name}")
        os.replace(os.path.join(root, name), trash)
        _fault_point("pruning", root)
        shutil.rmtree(trash, ignore_errors=True)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint of ``run_dir`` (``latest``; else the highest complete ``step_*``), or None."""
    root = os.path.join(run_dir, "checkpoints")
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as fh:
            name = fh.read().strip()
        if name and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            return os.path.join(root, name)
    complete = _complete_checkpoints(root)
    return os.path.join(root, complete[-1]) if complete else None


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as fh:
        return json.load(fh)


def load_checkpoint(
    path: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    info: DistInfo,
    extra: dict | None = None,
) -> dict:
    """Restore everything ``save_checkpoint`` wrote (in place; ``extra`` as there) and return the trainer state
    (step, history, ``world_size`` of the saving run, ...), on any number of ranks (module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    extra = _check_extra(extra)
    state = _model_and_optim_state(model, optimizer, extra)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    for name, (part_model, part_optimizer, part_scheduler) in extra.items():
        set_state_dict(part_model, part_optimizer, model_state_dict=state[f"{name}_model"],
                       optim_state_dict=state[f"{name}_optim"])
        part_scheduler.load_state_dict(torch.load(os.path.join(path, f"scheduler_{name}.pt"), weights_only=False))
    rng_file = os.path.join(path, f"rng_rank{info.rank}.pt")
    if not os.path.isfile(rng_file):
        # Resumed on more ranks than were saved: the extra ranks continue from rank 0's RNG streams.
        rng_file = os.path.join(path, "rng_rank0.pt")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return read_trainer_state(path)

"""2 CPU processes (torchrun, gloo, FSDP2) reach the same result as 1 process on the same data."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--task.digits", "2", "--task.train_size", "64", "--eval_size", "8", "--eval_batch_size", "4",
        "--task.hidden_size", "32", "--task.layers", "2", "--task.heads", "2", "--task.sft_steps", "10",
        "--batch_size", "8", "--grad_accum", "2", "--steps", "3", "--save_every", "2", "--kl_coef", "0.1",
        "--lr", "1e-2", "--progress", "false", "--plot", "false", "--device", "cpu", "--track_grad_var", "true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> str:
    env = dict(os.environ, REMAX_KERNELS_BACKEND="torch", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_match_one_process(tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    _run([sys.executable, "-m", "remax", "train", *ARGS, "--run_dir", single])
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()), "-m", "remax", "train", *ARGS, "--run_dir", multi])

    assert "FSDP2: policy and reference sharded over 2 ranks" in out
    a, b = _metrics(single), _metrics(multi)
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if key.startswith("perf/") or not isinstance(value, float):
                continue
            if key == "grad_var":
                # Its two halves are each rank's first/second micro-batches: a different (equally valid) split.
                assert value > 0 and rb[key] > 0
                continue
            # Rewards are exact (same rollouts: per-row seeds); losses and gradients differ by summation order.
            assert math.isclose(value, rb[key], rel_tol=1e-4, abs_tol=1e-6), (ra["step"], key, value, rb[key])
    wa = load_file(os.path.join(single, "final", "model.safetensors"))
    wb = load_file(os.path.join(multi, "final", "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k
    # Sharded checkpoints (torch.distributed.checkpoint) from both ranks, and one RNG file per rank.
    names = os.listdir(os.path.join(multi, "checkpoints", "step_00000003"))
    assert {"rng_rank0.pt", "rng_rank1.pt", "scheduler.pt", "trainer_state.json", ".metadata"} <= set(names)

"""2 CPU processes (torchrun, gloo, FSDP2): a PPO run (policy, reference and value model sharded, 2 micro-batches
per update) reaches the same result as 1 process on the same data, its checkpoint resumes in 1 process, and the
collectives are the intended ones: one all-gather per FSDP unit for a policy-loss forward however many chunks the
fused loss streams, and one reduce-scatter per unit per optimizer step whatever the number of micro-batches. (One
test, so that the 2-rank processes are launched once: the collectives probe runs first in them, then the training.)
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Warm-up (50 steps) outlasts the run, so the learning rate does not depend on the run's length (3 or 4 steps).
ARGS = ["--task.digits", "2", "--task.train_size", "64", "--eval_size", "8", "--eval_batch_size", "4",
        "--task.hidden_size", "32", "--task.layers", "2", "--task.heads", "2", "--task.sft_steps", "10",
        "--batch_size", "8", "--grad_accum", "2", "--save_every", "2", "--kl_coef", "0.1", "--estimator", "ppo",
        "--ppo_mini_batch_size", "4", "--lr", "1e-2", "--progress", "false", "--plot", "false", "--device", "cpu",
        "--track_grad_var", "true"]

needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


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


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), *args]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _assert_records_match(a: list[dict], b: list[dict]) -> None:
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


PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    import remax_kernels.hf as hf
    from remax.config import TrainConfig
    from remax.data import addition_task, build_char_tokenizer
    from remax.distributed import init_distributed
    from remax.model import build_tiny_llama
    from remax.trainer import Trainer, _Stats

    info = init_distributed("cpu")
    counts = {"all_gather": 0, "reduce_scatter": 0}
    def counting(name, fn):
        def wrapped(*a, **k):
            counts[name] += 1
            return fn(*a, **k)
        return wrapped
    dist.all_gather_single = counting("all_gather", dist.all_gather_single)
    dist.reduce_scatter_single = counting("reduce_scatter", dist.reduce_scatter_single)
    heads = []
    fused = hf.fused_linear_policy_loss
    def spy(hidden, weight, *a, **k):
        heads.append(type(weight).__name__)
        return fused(hidden, weight, *a, **k)
    hf.fused_linear_policy_loss = spy

    config = TrainConfig(task=dict(digits=2, train_size=64, hidden_size=32, layers=2, heads=2, sft_steps=0),
                         estimator="ppo", kl_coef=0.1, batch_size=8, grad_accum=2, eval_size=8, max_new_tokens=4,
                         progress=False, plot=False, device="cpu", run_dir=sys.argv[1])
    tok = build_char_tokenizer()
    task = addition_task(digits=2, train_size=64, eval_size=8, error_rate=0.5, seed=0)
    reward = lambda p, r: torch.tensor([x.count("1") + 0.25 * len(x) for x in r])
    trainer = Trainer(build_tiny_llama(tok, config.task, seed=0), tok, reward, config=config, dist_info=info,
                      prompts=task["train_prompts"], eval_prompts=task["eval_prompts"], quiet=True)
    trainer.run_dir = sys.argv[1]
    out = {"units": {name: sum(isinstance(m, FSDPModule) for m in runner.modules()) for name, runner in (
        ("policy", trainer.runner), ("reference", trainer.ref_runner), ("value", trainer.value_runner))}}
    rows = trainer.step_prompt_indices(0)[:4].tolist()
    texts = [trainer.prompts[i] for i in rows]
    rollout = trainer._generate([(texts, [11, 12, 13, 14], 4)], greedy=False)[0]
    r_sampled, _, _ = trainer._score(texts, rollout)
    batch = trainer._prepare(rollout, r_sampled, None)

    # One policy-loss forward from sharded parameters, the fused loss streaming one token per chunk: every unit is
    # gathered once. (The rollout leaves the root gathered, as FSDP2 leaves a root after its forward.)
    for unit in trainer.runner.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    os.environ["REMAX_KERNELS_CHUNK_MB"] = "0.00001"
    counts.update(all_gather=0, reduce_scatter=0)
    idx = torch.arange(4)
    loss, _ = trainer.runner(trainer._policy_loss, batch["ids"][idx], batch["attn"][idx], batch["resp"][idx],
                             batch["advantages"][idx], batch["ref_logprobs"][idx], batch["rollout_logprobs"][idx],
                             batch["old_logprobs"][idx])
    out["forward"] = dict(counts, tokens=int(batch["resp"].sum()))
    loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    del os.environ["REMAX_KERNELS_CHUNK_MB"]

    # One optimizer step of each model in 2 micro-batches: gradients are reduced once, after the last.
    for name, update in (("policy_update", lambda: trainer._update_policy(batch, idx, _Stats(), track_var=False)),
                         ("value_update", lambda: trainer._update_value(batch, idx, _Stats()))):
        counts.update(all_gather=0, reduce_scatter=0)
        update()
        out[name] = dict(counts)
    out["heads"] = sorted(set(heads))
    if info.is_main:
        print("PROBE " + json.dumps(out), flush=True)
    hf.fused_linear_policy_loss = fused

    # Then, in the same processes (one torchrun launch less), the 2-rank run of the training test.
    from remax.cli import main
    sys.exit(main(["train", *sys.argv[2:]]))
""")


@needs_dist
def test_two_ranks_match_one_process_resume_on_one_and_collectives(tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    _run([sys.executable, "-m", "remax", "train", *ARGS, "--steps", "4", "--run_dir", single])
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = _run(_torchrun(str(script), str(tmp_path / "probe"), *ARGS, "--steps", "3", "--run_dir", multi))

    # The collectives (PROBE): per model, 2 decoder layers + the root are FSDP units.
    probe = json.loads(out.split("PROBE ", 1)[1].splitlines()[0])
    assert probe["units"] == {"policy": 3, "reference": 3, "value": 3}
    # The lm-head weight the fused loss reads is the plain tensor of the root's one all-gather, not a DTensor
    # (which would gather again at each of the many chunks).
    assert probe["heads"] and "DTensor" not in probe["heads"], probe["heads"]
    assert probe["forward"]["tokens"] > 4  # more chunks than units
    assert (probe["forward"]["all_gather"], probe["forward"]["reduce_scatter"]) == (3, 0)
    # Per micro-batch: 3 gathers in the forward, the 2 layers again in the backward (the root stays gathered from
    # its forward to its backward; the value model's was still gathered from the rollout's value forward). One
    # reduce-scatter per unit per optimizer step: none between the 2 micro-batches.
    assert probe["policy_update"] == {"all_gather": 2 * 5, "reduce_scatter": 3}
    assert probe["value_update"] == {"all_gather": 2 * 5 - 1, "reduce_scatter": 3}

    # The 2-rank run matches the 1-process run.
    assert "FSDP2: policy, reference, value model sharded over 2 ranks" in out
    a, b = _metrics(single), _metrics(multi)
    train = lambda records: [r for r in records if r["split"] == "train"]  # noqa: E731
    _assert_records_match(train(a)[:3], train(b))
    assert all(r["ppo/approx_kl"] != 0 for r in train(a))  # the second mini-batch sees a moved policy
    # Sharded checkpoints (torch.distributed.checkpoint) from both ranks, and one RNG file per rank.
    names = os.listdir(os.path.join(multi, "checkpoints", "step_00000003"))
    assert {"rng_rank0.pt", "rng_rank1.pt", "scheduler.pt", "scheduler_value.pt", "trainer_state.json",
            ".metadata"} <= set(names)

    # The 2-rank checkpoint (policy, value model, both optimizers) resumes in one process: step 4 as the single run.
    out = _run([sys.executable, "-m", "remax", "train", "--resume", multi, "--steps", "4"])
    assert "written by 2 rank(s), this run has 1: its model and optimizer states were resharded" in out
    _assert_records_match(train(a)[3:] + [a[-1]], train(_metrics(multi))[3:] + [_metrics(multi)[-1]])
    wa = load_file(os.path.join(single, "final", "model.safetensors"))
    wb = load_file(os.path.join(multi, "final", "model.safetensors"))
    assert wa.keys() == wb.keys()
    # 8 AdamW updates of ~lr = 1e-2 each: summation-order differences of near-zero gradient entries reach ~1e-5
    # through Adam's normalization; a missing or repeated update would move weights by ~1e-2.
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=5e-5), k

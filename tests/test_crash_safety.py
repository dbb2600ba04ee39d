"""A real ``remax train`` process, stopped by SIGTERM or killed by ``kill -9``, then resumed: the resumed run's
metrics, samples and final weights equal an uninterrupted run's.

The moments are chosen by watching the run, not by timing alone: a reward function that writes a gate file (and,
where asked, holds there) at its n-th call, and ``REMAX_FAULT_PAUSE`` (``remax.checkpoint``), which pauses a save at a
named point. Random choices (which point, which arrival, a short delay) come from a seeded generator.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from remax.checkpoint import FAULT_ENV, FAULT_POINTS, latest_checkpoint, load_checkpoint, read_trainer_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
# The embedded experiment, tiny: 10 steps, evaluations at 0, 3, 6, 9 and 10 (two reward calls each: 8 prompts, 4 a
# call).
TINY = ["--task.digits", "2", "--task.train_size", "64", "--eval_size", "8", "--eval_batch_size", "4",
        "--task.hidden_size", "32", "--task.layers", "1", "--task.heads", "2", "--task.sft_steps", "5",
        "--batch_size", "8", "--steps", str(STEPS), "--eval_every", "3", "--warmup_steps", "2", "--lr", "1e-2",
        "--progress", "false", "--device", "cpu", "--plot", "false", "--save_final_model", "true"]

# Reward calls of a fresh run: 1-2 the probes, 3-4 eval @ 0, 5-7 steps 1-3, 8-9 eval @ 3, 10-12 steps 4-6, ...
# A resumed run: 1-2 the probes, then the steps and evaluations from its checkpoint on.
REWARD = '''
import os, time
CALLS = [0]
def reward(prompts, responses):
    CALLS[0] += 1
    if os.environ.get("GATE_AT") == str(CALLS[0]):
        open(os.environ["GATE_FILE"], "w").close()
        if os.environ.get("GATE_HOLD"):
            time.sleep(120)  # held here until the test's signal arrives
    # varied whatever a barely warmed-up policy samples, so every step moves the policy
    return [r.count("1") + 0.25 * len(r) for r in responses]
'''


def _env(**extra) -> dict:
    env = dict(os.environ, REMAX_KERNELS_BACKEND="torch", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    for name in ("GATE_AT", "GATE_HOLD", FAULT_ENV):
        if name not in extra:
            env.pop(name, None)
    return env


def _start(argv: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "remax", "train", *argv], env=_env(**env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited with {proc.returncode} before {path} appeared:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.005)


def _finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _without_perf(path: str) -> list[dict]:
    with open(path) as fh:
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in map(json.loads, fh)]


def _assert_same_run(run: str, reference: str) -> None:
    from safetensors.torch import load_file

    assert _without_perf(os.path.join(run, "metrics.jsonl")) == _without_perf(os.path.join(reference, "metrics.jsonl"))
    with open(os.path.join(run, "samples.jsonl")) as a, open(os.path.join(reference, "samples.jsonl")) as b:
        assert a.read() == b.read()
    wa = load_file(os.path.join(run, "final", "model.safetensors"))
    wb = load_file(os.path.join(reference, "final", "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("reward") / "gate.py"
    path.write_text(REWARD)
    return f"{path}:reward"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, reward_file) -> str:
    """The uninterrupted run (save_every changes nothing that is measured)."""
    run = str(tmp_path_factory.mktemp("reference") / "run")
    rc, out, err = _finish(_start([*TINY, "--reward", reward_file, "--save_every", "0", "--run_dir", run]))
    assert rc == 0, out + err
    return run


def test_sigterm_checkpoints_and_exits_0_and_the_resumed_run_equals_an_uninterrupted_one(reference, reward_file,
                                                                                         tmp_path):
    run, gate = str(tmp_path / "run"), str(tmp_path / "gate")
    # save_every 0: any checkpoint before the end is the stop's own.
    fresh = [*TINY, "--reward", reward_file, "--save_every", "0", "--run_dir", run]

    def stop(argv, **env):
        if os.path.exists(gate):
            os.remove(gate)
        proc = _start(argv, GATE_FILE=gate, **env)
        _wait_for(gate, proc)
        proc.send_signal(signal.SIGTERM)
        rc, out, err = _finish(proc)
        assert rc == 0, out + err
        step = read_trainer_state(latest_checkpoint(run))["step"]
        assert (f"remax train: stopped by SIGTERM after step {step}; {run} holds a complete checkpoint at step "
                f"{step}: continue with `remax train --resume {run}`") in err, err
        assert "Traceback" not in err and not os.path.exists(os.path.join(run, "summary.json"))
        return step

    # Mid-rollout: held in step 3's reward (call 7); the step is abandoned, the checkpoint is of step 2.
    assert stop(fresh, GATE_AT="7", GATE_HOLD="1") == 2
    # Mid-evaluation: held in eval @ 3 (the resumed run's calls: probes 1-2, step 3, eval 4-5); the checkpoint is of
    # step 3 without that evaluation, which the next resume runs first.
    assert stop(["--resume", run], GATE_AT="4", GATE_HOLD="1") == 3
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        assert not [r for r in map(json.loads, fh) if r["split"] == "eval" and r["step"] == 3]
    # Not held: the signal lands after step 4's reward (call 5), in its update or later; the run stops at a boundary.
    assert 4 <= stop(["--resume", run], GATE_AT="5") < STEPS
    rc, out, err = _finish(_start(["--resume", run]))
    assert rc == 0, out + err
    _assert_same_run(run, reference)


def _load_latest(run: str) -> int | None:
    """Load the checkpoint ``--resume`` would pick (model, optimizer, scheduler, RNG states), as the trainer does;
    its step, or None when there is none."""
    from transformers import AutoModelForCausalLM

    from remax.config import TrainConfig
    from remax.distributed import DistInfo
    from remax.model import no_hf_progress_bars
    from remax.trainer import lr_lambda

    path = latest_checkpoint(run)
    if path is None:
        return None
    state = read_trainer_state(path)
    with no_hf_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(os.path.join(run, "initial_policy"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(TrainConfig.from_dict(state["config"])))
    rng = torch.get_rng_state()
    try:
        loaded = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, info=DistInfo())
    finally:
        torch.set_rng_state(rng)
    assert loaded["step"] == state["step"] and optimizer.state and scheduler.last_epoch == state["step"]
    return int(state["step"])


def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint_and_resumes_to_the_uninterrupted_run(
        reference, reward_file, tmp_path):
    rng = random.Random(19)
    run = str(tmp_path / "run")
    fresh = [*TINY, "--reward", reward_file, "--save_every", "1", "--run_dir", run]
    paused = os.path.join(run, "fault-paused")
    # Every point of a save once, at its first arrival (each round then runs at most one step past the previous
    # checkpoint, pruning's three: the run cannot end before the last), in a seeded order; then three kills at random
    # moments of the training (a seeded delay of up to a few steps after a new metrics line).
    rounds = [(point, 1) for point in rng.sample(FAULT_POINTS, len(FAULT_POINTS))]
    rounds += [("random", rng.uniform(0.0, 0.1)) for _ in range(3)]
    steps_seen, finished = [], False
    for point, arg in rounds:
        argv = ["--resume", run] if os.path.isfile(os.path.join(run, "config.yaml")) else fresh
        if os.path.exists(paused):
            os.remove(paused)
        if point == "random":
            before = _count_lines(os.path.join(run, "metrics.jsonl"))
            proc = _start(argv)
            while _count_lines(os.path.join(run, "metrics.jsonl")) <= before and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(arg)
        else:
            proc = _start(argv, **{FAULT_ENV: f"{point}:{arg}"})
            _wait_for(paused, proc)
        proc.send_signal(signal.SIGKILL)
        rc, out, err = _finish(proc)
        if rc == 0:  # a random moment after the run's end: nothing left to kill
            assert point == "random", out + err
            finished = True
            break
        assert rc == -signal.SIGKILL, out + err
        step = _load_latest(run)
        assert step is not None or not steps_seen, (point, arg)
        if step is not None:
            assert step >= max(steps_seen, default=0), (point, arg, steps_seen)  # never back to an older one
            steps_seen.append(step)
    assert len(steps_seen) >= len(FAULT_POINTS) - 1  # the rounds got past the first save
    if not finished:
        rc, out, err = _finish(_start(["--resume", run]))
        assert rc == 0, out + err
    _assert_same_run(run, reference)


def _count_lines(path: str) -> int:
    if not os.path.isfile(path):
        return 0
    with open(path) as fh:
        return sum(1 for _ in fh)

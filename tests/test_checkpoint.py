"""remax.checkpoint: exact round trips, atomic `latest`, crashes mid-save, pruning."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

import remax.checkpoint as ckpt
from remax.distributed import DistInfo


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _train(model, opt, sched, steps: int):
    for _ in range(steps):
        x = torch.randn(5, 4)
        model(x).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _save(run_dir, step, model, opt, sched, history=None, keep=2):
    return ckpt.save_checkpoint(str(run_dir), step, model=model, optimizer=opt, scheduler=sched,
                                trainer_state={"history": history or [{"step": step}]}, info=DistInfo(), keep=keep)


def test_round_trip_is_exact(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = _save(tmp_path, 3, model, opt, sched, history=[{"step": 1, "x": 0.5}])
    # The continuation of the original run...
    expected_draws = (random.random(), np.random.rand(), torch.rand(2))
    _train(model, opt, sched, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    # ...equals the continuation of a fresh process that loads the checkpoint.
    model2, opt2, sched2 = _setup(seed=123)
    random.seed(0)
    state = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, info=DistInfo())
    assert state["step"] == 3 and state["history"] == [{"step": 1, "x": 0.5}] and state["world_size"] == 1
    draws = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1]
    assert torch.equal(draws[2], expected_draws[2])
    assert sched2.last_epoch == 3
    _train(model2, opt2, sched2, 2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_latest_pointer_and_pruning(tmp_path):
    model, opt, sched = _setup()
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    for step in (1, 2, 3):
        _train(model, opt, sched, 1)
        _save(tmp_path, step, model, opt, sched, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_00000002", "step_00000003"]
    assert (root / "latest").read_text() == "step_00000003"
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(root / "step_00000003")
    # A corrupt pointer falls back to the newest complete checkpoint.
    (root / "latest").write_text("step_99999999")
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(root / "step_00000003")
    # Re-saving an existing step (a resumed run passing it again) replaces it.
    _save(tmp_path, 3, model, opt, sched, history=[{"again": True}])
    assert ckpt.read_trainer_state(str(root / "step_00000003"))["history"] == [{"again": True}]


@pytest.mark.parametrize("fail_on", ["rng_rank0.pt", "scheduler.pt", "trainer_state.json"])
def test_crash_mid_save_keeps_previous_latest(tmp_path, monkeypatch, fail_on):
    model, opt, sched = _setup()
    _save(tmp_path, 1, model, opt, sched)
    _train(model, opt, sched, 1)

    real_save, real_replace = torch.save, os.replace

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith(fail_on):
            raise KeyboardInterrupt("simulated Ctrl-C while writing")
        return real_save(obj, f, *args, **kwargs)

    def failing_replace(src, dst):
        if str(dst).endswith(fail_on):
            raise KeyboardInterrupt("simulated Ctrl-C while writing")
        return real_replace(src, dst)

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, opt, sched)
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(root / "step_00000001")
    assert not (root / "step_00000002").exists()
    assert any(n.startswith(".tmp-") for n in os.listdir(root))
    # The leftover is never loaded and the next save clears it.
    model2, opt2, sched2 = _setup(seed=9)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)), model=model2, optimizer=opt2,
                                 scheduler=sched2, info=DistInfo())
    assert state["step"] == 1
    _save(tmp_path, 2, model, opt, sched)
    assert not any(n.startswith(".tmp-") for n in os.listdir(root))
    assert json.loads((root / "step_00000002" / "trainer_state.json").read_text())["step"] == 2


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "f.txt"
    ckpt.write_atomic(str(path), "one")
    ckpt.write_atomic(str(path), "two")
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["f.txt"]


def test_extra_parts_round_trip(tmp_path):
    """A second trained model (PPO's value model) with its optimizer and schedule is saved and restored exactly."""
    model, opt, sched = _setup()
    value, value_opt, value_sched = _setup(seed=1)
    _train(model, opt, sched, 2)
    _train(value, value_opt, value_sched, 3)
    path = ckpt.save_checkpoint(str(tmp_path), 2, model=model, optimizer=opt, scheduler=sched,
                                trainer_state={"history": []}, info=DistInfo(),
                                extra={"value": (value, value_opt, value_sched)})
    assert os.path.isfile(os.path.join(path, "scheduler_value.pt"))
    _train(value, value_opt, value_sched, 1)
    expected = {k: v.clone() for k, v in value.state_dict().items()}

    model2, opt2, sched2 = _setup(seed=5)
    value2, value_opt2, value_sched2 = _setup(seed=6)
    ckpt.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, info=DistInfo(),
                         extra={"value": (value2, value_opt2, value_sched2)})
    assert value_sched2.last_epoch == 3 and sched2.last_epoch == 2
    _train(value2, value_opt2, value_sched2, 1)  # same random inputs: the draws were restored too
    for k, v in value2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    with pytest.raises(ValueError, match="extra"):
        ckpt.save_checkpoint(str(tmp_path), 3, model=model, optimizer=opt, scheduler=sched, trainer_state={},
                             info=DistInfo(), extra={"model": (value, value_opt, value_sched)})

"""remax.config: defaults, YAML + --key value overrides, and one clear error per bad field."""

from __future__ import annotations

import math

import pytest
import torch

from remax.config import TrainConfig, load_config, parse_overrides
from remax.trainer import lr_lambda


def test_defaults_are_valid_and_documented():
    config = TrainConfig()
    assert config.model is None and config.estimator == "remax"
    assert config.response_budget == 256 and config.with_task_defaults().response_budget == config.task_digits + 2
    assert TrainConfig(model="x").with_task_defaults().response_budget == 256
    assert TrainConfig(max_new_tokens=9).with_task_defaults().max_new_tokens == 9
    text = TrainConfig.help()
    for name in config.to_dict():
        assert f"--{name} (" in text


def test_parse_overrides_types():
    out = parse_overrides(["--lr", "1e-4", "--bf16", "false", "--clip_reward", "none", "--steps=7",
                           "--run-dir", "runs/x", "--top_p", "0.9"])
    assert out == {"lr": 1e-4, "bf16": False, "clip_reward": None, "steps": 7, "run_dir": "runs/x", "top_p": 0.9}
    assert isinstance(out["lr"], float) and isinstance(out["steps"], int)


@pytest.mark.parametrize(
    ("argv", "exc", "needle"),
    [
        (["--bogus", "1"], ValueError, "--bogus"),
        (["--steps", "ten"], TypeError, "steps"),
        (["--steps", "1.5"], TypeError, "steps"),
        (["--bf16", "maybe"], TypeError, "bf16"),
        (["--steps"], ValueError, "missing value"),
        (["steps", "3"], ValueError, "unexpected argument"),
        (["--steps", "none"], TypeError, "steps"),
    ],
)
def test_parse_overrides_errors(argv, exc, needle):
    with pytest.raises(exc, match=needle):
        parse_overrides(argv)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nsteps: 12\nestimator: rloo\ngroup_size: 2\nclip_reward: 5\n")
    config = load_config(str(path), {"steps": 3})
    assert config.lr == 1e-4 and config.steps == 3 and config.estimator == "rloo"
    assert config.clip_reward == 5.0 and isinstance(config.clip_reward, float)


@pytest.mark.parametrize(
    ("text", "exc", "needle"),
    [
        ("stepz: 3\n", ValueError, "stepz"),
        ("steps: abc\n", TypeError, "steps"),
        ("bf16: 3\n", TypeError, "bf16"),
        ("steps: true\n", TypeError, "steps"),
        ("model: 3\n", TypeError, "model"),
        ("- 1\n- 2\n", TypeError, "mapping"),
    ],
)
def test_yaml_errors(tmp_path, text, exc, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(exc, match=needle):
        load_config(str(path))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"estimator": "ppo"}, "estimator"),
        ({"batch_size": 0}, "batch_size"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"gamma": 1.5}, "gamma"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"estimator": "rloo", "group_size": 1}, "group_size"),
        ({"estimator": "grpo", "group_size": 3, "batch_size": 8}, "batch_size"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"loss_agg_mode": "mean"}, "loss_agg_mode"),
        ({"clip_reward": 0.0}, "clip_reward"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"tiny_hidden_size": 30, "tiny_heads": 4}, "tiny_hidden_size"),
    ],
)
def test_range_errors_name_the_field(changes, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**changes)


def test_world_checks():
    TrainConfig(batch_size=8).check_world(2)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=6).check_world(4)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=8, estimator="rloo", group_size=8).check_world(2)
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(batch_size=8, grad_accum=3).check_world(2)
    with pytest.raises(ValueError, match="whiten"):
        TrainConfig(batch_size=8, whiten=True).check_world(2)


def test_path_checks(tmp_path):
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model=str(tmp_path / "missing")).check_paths()
    with pytest.raises(ValueError, match="prompts"):
        TrainConfig(model=str(tmp_path), prompts=str(tmp_path / "none.jsonl")).check_paths()
    with pytest.raises(ValueError, match="prompts"):
        TrainConfig(prompts=str(tmp_path)).check_paths()  # a prompt file needs --model


def test_lr_schedules():
    const = lr_lambda(TrainConfig(steps=10, warmup_steps=2, lr_schedule="constant"))
    assert [const(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = lr_lambda(TrainConfig(steps=10, warmup_steps=0, lr_schedule="cosine", min_lr_ratio=0.1))
    assert cos(0) == 1.0 and math.isclose(cos(10), 0.1) and math.isclose(cos(5), 0.1 + 0.9 * 0.5)
    lin = lr_lambda(TrainConfig(steps=10, warmup_steps=0, lr_schedule="linear", min_lr_ratio=0.0))
    assert math.isclose(lin(5), 0.5) and lin(10) == 0.0


def test_example_configs_load():
    import glob
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert len(files) >= 3
    for path in files:
        load_config(path)
    # examples/default.yaml spells out the embedded experiment: it must equal the defaults.
    assert load_config(os.path.join(root, "default.yaml")) == TrainConfig()


def test_example_reward_fn():
    import os

    from remax.rewards import import_callable

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    fn = import_callable(os.path.join(root, "reward_fn.py") + ":length_and_keyword_reward")
    out = fn(["Why do cats purr?", "Why do cats purr?"], ["Cats purr when content.", "No idea."])
    assert out.tolist() == [1.0, 0.0]


def test_attention_implementation_prefers_flash_attn_only_when_installed_and_on_cuda(monkeypatch):
    import importlib.util

    from remax.model import attention_implementation

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_implementation("eager", cuda) == "eager"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert attention_implementation("auto", cuda) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert attention_implementation("auto", cuda) == "flash_attention_2"
    assert attention_implementation("auto", cpu) == "sdpa"

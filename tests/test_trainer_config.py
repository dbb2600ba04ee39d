"""remax.config: defaults, YAML + --key value overrides, and one clear error per bad field."""

from __future__ import annotations

import math

import pytest
import torch

from remax.config import TaskConfig, TrainConfig, config_fields, load_config, parse_overrides
from remax.trainer import lr_lambda


def test_defaults_are_valid_and_documented():
    config = TrainConfig()
    assert config.model is None and config.estimator == "remax" and config.task == TaskConfig()
    assert config.response_budget == 256 and config.with_task_defaults().response_budget == config.task.digits + 2
    assert TrainConfig(model="x").with_task_defaults().response_budget == 256
    assert TrainConfig(max_new_tokens=9).with_task_defaults().max_new_tokens == 9
    for name, (f, _) in config_fields().items():
        assert f.metadata["help"], name
    assert set(config.flat_dict()) == set(config_fields()) and "task.digits" in config_fields()


def test_parse_overrides_types():
    out = parse_overrides(["--lr", "1e-4", "--bf16", "false", "--clip_reward", "none", "--steps=7",
                           "--run-dir", "runs/x", "--top_p", "0.9", "--task.digits", "2", "--task.sft_steps=30"])
    assert out == {"lr": 1e-4, "bf16": False, "clip_reward": None, "steps": 7, "run_dir": "runs/x", "top_p": 0.9,
                   "task": {"digits": 2, "sft_steps": 30}}
    assert isinstance(out["lr"], float) and isinstance(out["steps"], int)
    # A negative number is a value; a value starting with "-" otherwise is written --key=value (argparse's rule).
    assert parse_overrides(["--eval_seed", "-3", "--model=-dir"]) == {"eval_seed": -3, "model": "-dir"}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bogus", "1"], "--bogus: unknown option"),
        (["--task_digits", "2"], "did you mean --task.digits"),
        (["--sft_steps", "2"], "did you mean --task.sft_steps"),
        (["--steps", "ten"], "--steps: expected int, got 'ten'"),
        (["--steps", "1.5"], "--steps: expected int"),
        (["--bf16", "maybe"], "--bf16: expected bool"),
        (["--steps"], "--steps: expected one argument"),
        (["steps", "3"], "unexpected argument 'steps'"),
        (["--steps", "none"], "--steps: expected int"),
        (["--estimator", "a2c"], "--estimator: invalid choice: 'a2c'"),
    ],
)
def test_parse_overrides_errors(argv, needle):
    with pytest.raises(ValueError) as info:
        parse_overrides(argv)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_yaml_sections_and_did_you_mean(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task:\n  digits: 2\n  sft_steps: 7\nsteps: 3\n")
    config = load_config(str(path), {"task": {"digits": 4}})
    assert config.task.digits == 4 and config.task.sft_steps == 7 and config.steps == 3
    assert config.replace(task={"layers": 3}).task == TaskConfig(digits=4, sft_steps=7, layers=3)
    assert TrainConfig(task={"digits": 5}).task.digits == 5
    path.write_text("task_digits: 2\n")
    with pytest.raises(ValueError, match="did you mean 'task.digits'"):
        load_config(str(path))
    path.write_text("task:\n  hidden_size: 30\n  heads: 4\n")
    with pytest.raises(ValueError, match="task.hidden_size"):
        load_config(str(path))


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
        ("task: addition\n", TypeError, "section 'task' must be a mapping"),
        ("steps: [1,\nlr: 3\n", ValueError, r"not valid YAML at line \d+, column \d+"),
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
        ({"estimator": "a2c"}, "estimator"),
        ({"batch_size": 0}, "batch_size"),
        ({"estimator": "ppo", "clip_ratio": 1.5}, "clip_ratio"),
        ({"estimator": "ppo", "clip_ratio_c": 0.5}, "clip_ratio_c"),
        ({"value_clip": 0.0}, "value_clip"),
        ({"gae_lambda": 1.5}, "gae_lambda"),
        ({"critic_lr": 0.0}, "critic_lr"),
        ({"ppo_epochs": 0}, "ppo_epochs"),
        ({"estimator": "ppo", "batch_size": 8, "ppo_mini_batch_size": 3}, "ppo_mini_batch_size"),
        ({"estimator": "ppo", "whiten": True}, "whiten"),
        ({"task": {"heads": 4, "kv_heads": 3}}, "task.kv_heads"),
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
        ({"task": {"hidden_size": 30, "heads": 4}}, "task.hidden_size"),
        ({"task": {"demo_error_rate": 1.5}}, "task.demo_error_rate"),
        ({"lr_decay_steps": -1}, "lr_decay_steps"),
        ({"report_to": "wandb"}, "report_to"),
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
    # PPO mini-batches split over ranks and into grad_accum micro-batches too.
    TrainConfig(batch_size=16, estimator="ppo", ppo_mini_batch_size=8, grad_accum=2).check_world(2)
    with pytest.raises(ValueError, match="ppo_mini_batch_size"):
        TrainConfig(batch_size=16, estimator="ppo", ppo_mini_batch_size=4, grad_accum=4).check_world(2)


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

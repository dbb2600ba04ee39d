"""A tiny ``remax.Trainer`` on the embedded addition task (1-layer Llama, hidden 32, CPU), shared by the trainer,
PPO and logging tests: a few steps run in about a second."""

from __future__ import annotations

import torch

from remax.config import TrainConfig
from remax.data import addition_task, build_char_tokenizer
from remax.model import build_tiny_llama
from remax.trainer import Trainer


def tiny_config(tmp_path, **changes) -> TrainConfig:
    values = dict(task=dict(digits=2, train_size=64, hidden_size=32, layers=1, heads=2, sft_steps=0), eval_size=8,
                  eval_batch_size=8, steps=2, batch_size=8, lr=1e-2, progress=False, plot=False, save_every=0,
                  run_dir=str(tmp_path / "run"), device="cpu", max_grad_norm=0.0, max_new_tokens=4)
    values.update(changes)
    return TrainConfig(**values)


def varied_reward(prompts, responses):
    """Deterministic, varied rewards for a random policy (the addition reward would be ~0 everywhere)."""
    return torch.tensor([r.count("1") + 0.25 * len(r) - 0.1 * r.count("+") for r in responses])


def make_trainer(config: TrainConfig, reward=varied_reward, **kwargs) -> Trainer:
    tok = build_char_tokenizer()
    task = addition_task(digits=config.task.digits, train_size=config.task.train_size, eval_size=config.eval_size,
                         error_rate=0.5, seed=config.seed)
    policy = build_tiny_llama(tok, config.task, seed=config.seed)
    kwargs.setdefault("quiet", True)
    return Trainer(policy, tok, reward, config=config, prompts=task["train_prompts"],
                   eval_prompts=task["eval_prompts"], **kwargs)

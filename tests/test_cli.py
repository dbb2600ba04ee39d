"""The ``remax`` command: train / resume / eval / plot / compare, user models and rewards, one-line config errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from remax.cli import main
from remax.config import TrainConfig

TINY = ["--task_digits", "2", "--task_train_size", "64", "--eval_size", "8", "--eval_batch_size", "4",
        "--tiny_hidden_size", "32", "--tiny_layers", "1", "--tiny_heads", "2", "--sft_steps", "5",
        "--batch_size", "8", "--progress", "false", "--save_every", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _fast_and_isolated(monkeypatch):
    # Torch kernels (the interpreter is for the kernel tests); the CLI lowers torch's thread count: restore it.
    monkeypatch.setenv("REMAX_KERNELS_BACKEND", "torch")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _records(run_dir, split):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["split"] == split]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--bogus", "1"], "--bogus: unknown config key"),
        (["train", "--steps", "ten"], "steps: expected int"),
        (["train", "--estimator", "ppo"], "estimator: must be one of"),
        (["train", "--model", "/nonexistent/model"], "model: '/nonexistent/model' is not a local directory"),
        (["train", "--resume", "/nonexistent/run"], "resume: '/nonexistent/run' has no config.yaml"),
        (["train", "--config", "/nonexistent.yaml"], "--config"),
        (["compare", "--estimators", "remax,ppo"], "--estimators"),
        (["eval"], "model: give a run directory"),
    ],
)
def test_config_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{name} (" in out for name in TrainConfig().to_dict())


def test_train_resume_eval_plot(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--steps", "2", "--run_dir", run]) == 0
    out = capsys.readouterr().out
    assert "before RL" in out and "after RL" in out and "greedy reward" in out and "sampled reward" in out
    assert os.path.isfile(os.path.join(run, "reward_curves.png"))
    assert os.path.isdir(os.path.join(run, "initial_policy"))
    assert [r["step"] for r in _records(run, "train")] == [1, 2]

    # A finished run continues when resumed with more steps; the warm-start is not redone.
    assert main(["train", "--resume", run, "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "warm-start:" not in out
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3]
    assert [r["step"] for r in _records(run, "eval")] == [0, 2, 3]

    # A fresh run into a directory that holds checkpoints is refused (no silent overwrite).
    assert main(["train", *TINY, "--steps", "2", "--run_dir", run]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err

    assert main(["eval", run]) == 0
    out = capsys.readouterr().out
    final = _records(run, "eval")[-1]
    assert f"greedy reward {final['eval/reward_greedy']:.4f}" in out
    assert f"sampled reward {final['eval/reward_sampled']:.4f}" in out

    png = str(tmp_path / "again.png")
    assert main(["plot", run, "--out", png]) == 0 and os.path.getsize(png) > 10_000


def test_user_model_prompts_and_reward_module(tmp_path, capsys):
    from remax.data import build_char_tokenizer
    from remax.model import build_tiny_llama

    tok = build_char_tokenizer()
    model_dir = str(tmp_path / "policy")
    build_tiny_llama(tok, TrainConfig(tiny_hidden_size=32, tiny_layers=1, tiny_heads=2)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"q": f"{i}+{i}="}) + "\n" for i in range(40)))
    rewards = tmp_path / "my_reward.py"
    rewards.write_text(
        "import torch\n"
        "def ones(prompts, responses, *, prompt_ids, response_ids):\n"
        "    return torch.tensor([float(r.count('1')) + 0.1 * len(ids) for r, ids in zip(responses, response_ids)])\n"
        "def bad(prompts, responses):\n"
        "    return torch.zeros(len(prompts), 2)\n"
    )
    common = ["--model", model_dir, "--prompts", str(prompts), "--prompt_field", "q", "--batch_size", "4",
              "--steps", "2", "--max_new_tokens", "4", "--eval_size", "4", "--progress", "false", "--device", "cpu",
              "--kl_coef", "0.05", "--kl_penalty", "loss"]
    run = str(tmp_path / "run")
    assert main(["train", *common, "--reward", f"{rewards}:ones", "--run_dir", run]) == 0
    assert len(_records(run, "train")) == 2 and "kl" in _records(run, "train")[0]
    assert os.path.isfile(os.path.join(run, "final", "model.safetensors"))

    # A reward returning the wrong shape fails in one line, before any model is loaded.
    assert main(["train", *common, "--reward", f"{rewards}:bad", "--run_dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "reward:" in err and "shape (2, 2)" in err
    assert not os.path.exists(tmp_path / "r2")


def test_compare_writes_plot_and_table(tmp_path, capsys):
    root = str(tmp_path / "cmp")
    argv = ["compare", *TINY, "--estimators", "remax,reinforce,rloo", "--group_size", "2", "--steps", "2",
            "--save_every", "0", "--run_dir", root]
    assert main(argv) == 0
    out = capsys.readouterr().out
    with open(os.path.join(root, "compare.json")) as fh:
        result = json.load(fh)
    assert set(result["runs"]) == {"remax", "reinforce", "rloo"}
    for name, summary in result["runs"].items():
        assert summary["mean_grad_var"] > 0 and name in out
        # Same task, same budget: every estimator starts from the same warm-started policy.
        assert summary["before"] == result["runs"]["remax"]["before"]
    assert os.path.getsize(os.path.join(root, "compare.png")) > 10_000


def test_default_experiment_is_wired(tmp_path, capsys):
    """`remax train` with the defaults (shortened: 2 RL steps, 30 warm-start steps): the documented experiment runs."""
    run = str(tmp_path / "default")
    assert main(["train", "--steps", "2", "--sft_steps", "30", "--progress", "false", "--run_dir", run]) == 0
    out = capsys.readouterr().out
    defaults = TrainConfig()
    with open(os.path.join(run, "initial_policy", "config.json")) as fh:
        llama = json.load(fh)
    assert llama["model_type"] == "llama" and llama["hidden_size"] == defaults.tiny_hidden_size
    assert llama["num_hidden_layers"] == defaults.tiny_layers and llama["vocab_size"] == 16
    evals = _records(run, "eval")
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval/response_length_greedy"] <= defaults.task_digits + 2
    assert "warm-start" in out and "before RL" in out
    with open(os.path.join(run, "config.yaml")) as fh:
        assert "estimator: remax" in fh.read()
